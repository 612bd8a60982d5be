import Atomics
import Dispatch
import Synchronization

/// Where shards send the records of their changes. ``StockadeJournal``'s journal writes them to disk;
/// ``MemoryChangeLog`` keeps nothing (the engine without durability, for tests and benchmarks).
public protocol ChangeLog: AnyObject, Sendable {
    /// Queues encoded records and returns the log position (sequence number) of the last one.
    /// Called inside a shard's isolation with a whole batch: it copies bytes and never waits on I/O.
    func append(_ records: RecordBuffer) throws(Rejection) -> UInt64
    /// Returns once every record up to `lsn` is as durable as the configured policy promises;
    /// throws ``Rejection/unavailable(_:)`` when it never will be.
    func waitDurable(_ lsn: UInt64) async throws(Rejection)
    /// false while the queue of records not yet written is over its bound: changes get ``Rejection/busy``.
    var admitsChanges: Bool { get }
    /// Why the log stopped accepting records (a write or sync failed), or nil. Once set it stays set:
    /// memory may then hold changes that are not in the log, so every shard refuses every command.
    var failureReason: String? { get }
}

/// What any thread may read of a shard without entering it: published by the shard, read lock-free
/// by the engine's sold-out fast path and its expiry pre-pass.
///
/// The atomics are stored inline (`Synchronization.Atomic`), not as objects of their own: both event
/// loops read them for every sold-out answer, and a reference to an atomic object would be retained
/// and released on each read, a write to a cache line both loops share. The engine reads them
/// through unretained references (``Engine``'s gauge table) for the same reason.
public final class ShardGauges: Sendable {
    /// Even between runs, odd while a run (or a prepare) changes state. A reader that sees the same even
    /// value before and after reading a counter read a state whose records are all appended.
    let runEpoch = Atomic<UInt64>(0)
    /// ``Shard/visiblePosition`` as of the last completed run.
    let visibleLSN = Atomic<UInt64>(0)
    /// Basket holds placed here and not yet committed or released, and effects of another shard's
    /// run on their way here (an expired, cancelled or paid basket's release or sale of this shard's
    /// stock: see ``Shard/effectsArrived()``). Runs here wait while it is above 0, and the sold-out
    /// fast path answers nothing here: either would show a state that is about to change.
    let preparing = Atomic<Int>(0)
    /// ``ShardState/nextDeadlineMillis`` and ``ShardState/nextForeignDeadlineMillis`` after the last run.
    let nextDeadlineMillis = Atomic<Int64>(.max)
    let nextForeignDeadlineMillis = Atomic<Int64>(.max)

    init() {}
}

/// One shard: the only writer of its SKUs and orders. Work arrives in batches (one actor hop per
/// batch, not per command), and no method awaits while it changes state.
///
/// A shard runs on the executor it is given: in the server, one of the event loops, so a connection on
/// that loop enters it synchronously (``Engine/executeLocally(_:now:localShards:)``) and the rest hop
/// to it once per batch. Without one it gets a serial queue of its own.
public actor Shard {
    public nonisolated let index: Int
    /// Where the shard's work runs (see the type's documentation).
    public nonisolated let executor: any SerialExecutor
    public nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }
    private(set) var state: ShardState
    /// SKU id -> counter, for lock-free reads from any thread.
    public nonisolated let directory: SkuDirectory
    /// Published position, epoch and deadlines (see ``ShardGauges``).
    public nonisolated let gauges: ShardGauges
    /// Every shard's gauges, by shard index (empty for a shard made on its own): a run whose effects
    /// reach other shards marks them there as arriving before it publishes its own state.
    private nonisolated let peers: [ShardGauges]
    private let log: any ChangeLog
    /// Read-only (a replica): no changes, no expiry here; the primary's records move the state.
    private let role: EngineRole
    private var scratch = RecordBuffer()
    /// The log position every reply from this shard waits for: the last record this shard appended,
    /// or the record of another shard's order whose effect (a release or sale of this shard's stock)
    /// was applied here, whichever is later. Reads wait for it too, so no client is shown a change
    /// that a crash could still take back.
    private var visibleLSN: UInt64 = 0
    /// Set once an append failed: from then on every command is refused with this reason.
    private var failure: String?
    /// Tasks waiting in ``settled()`` for the basket holds placed here to settle. Joined in the
    /// continuation's body, under a lock, with the count checked again there: other jobs of this shard
    /// can run between the first check and the body (a round task prefers its connection's loop, and
    /// the runtime then suspends the `await withCheckedContinuation` before its body and queues the
    /// body on this shard's executor again), and a waiter that joined after the last hold settled
    /// would wait for good (a connection left without replies; `SettleWaitTests`).
    private nonisolated let settleWaiters = Mutex<[CheckedContinuation<Void, Never>]>([])

    public init(
        state: ShardState, log: any ChangeLog, executor: (any SerialExecutor)? = nil, role: EngineRole = EngineRole(),
        gauges: ShardGauges? = nil, peers: [ShardGauges] = []
    ) {
        index = state.shard
        self.gauges = gauges ?? ShardGauges()
        self.peers = peers
        self.executor = executor ?? QueueExecutor(label: "stockade-shard-\(state.shard)")
        self.state = state
        self.log = log
        self.role = role
        directory = SkuDirectory()
        directory.publish(state.counters)
        self.gauges.nextDeadlineMillis.store(state.nextDeadlineMillis, ordering: .relaxed)
        self.gauges.nextForeignDeadlineMillis.store(state.nextForeignDeadlineMillis, ordering: .relaxed)
    }

    /// What a batch did: a reply per command (by its position in the caller's list), effects on other
    /// shards' SKUs to apply, and the log position the replies must wait for.
    public struct BatchResult: Sendable {
        public var replies: [(slot: Int, reply: Reply)] = []
        public var effects: [ShardState.ForeignEffect] = []
        public var lsn: UInt64 = 0
        /// Nothing ran: basket holds are being placed here. Wait with ``Shard/settled()`` and run again.
        public var deferred = false
        /// The shard refused the run (its log failed): nothing changed, and nothing will.
        public var refused = false
    }

    /// Whether confirming or cancelling order `id` here may change stock on another shard (the order is
    /// a basket). For the engine's synchronous path, which must not reach other shards.
    func mayAffectOtherShards(_ id: OrderID) -> Bool { state.isMultiShardOrder(id) }

    /// Why this shard refuses everything, if it does: its own append failed, or the log's did.
    private var refusal: String? { failure ?? log.failureReason }

    /// Runs a batch of commands that all belong to this shard, in order. Orders due at `now` expire first.
    /// While a basket's holds are being placed here, nothing runs (``BatchResult/deferred``): a reply
    /// could otherwise show a hold that is not logged yet.
    /// The batch is `commands[slot]` for each of `slots`, in that order; each reply is given with its
    /// slot. The commands are read in place: none is copied out of the caller's array.
    public func run(_ commands: [Command], slots: [Int], now: Int64) -> BatchResult {
        run(commands, slots: slots, now: now, expiryLimit: .max)
    }

    private func run(_ commands: [Command], slots: [Int], now: Int64, expiryLimit: Int) -> BatchResult {
        var result = BatchResult()
        if gauges.preparing.load(ordering: .relaxed) > 0 {
            result.deferred = true
            return result
        }
        if let refusal = refusal {
            result.replies = slots.map { ($0, .rejected(.unavailable(refusal))) }
            result.lsn = visibleLSN
            result.refused = true
            return result
        }
        beginChange()
        defer { endChange() }
        scratch.removeAll()
        result.replies.reserveCapacity(slots.count)
        let readOnly = role.isReadOnly
        if !readOnly { result.effects = state.expireDue(now: now, limit: expiryLimit, log: &scratch) }
        let admits = log.admitsChanges
        var added: [(Name, StockCounter)] = []
        if slots.count > 1 {
            // Each reservation looks its user (and its request id, if any) up in a table too large for
            // the cache, most of them new: the loads start here together, so their misses overlap.
            for slot in slots {
                if case let .reserve(user, _, requestId, _) = commands[slot] { state.prefetch(user: user, requestId: requestId) }
            }
        }
        for slot in slots {
            if commands[slot].isChange && (readOnly || !admits) {
                result.replies.append((slot, .rejected(readOnly ? .readOnly : .busy)))
                continue
            }
            let reply: Reply
            switch commands[slot] {
            case let .addSku(sku, total, limit):
                reply = state.addSku(sku, total: total, limit: limit, log: &scratch)
                if reply == .done, let counter = state.counter(sku) { added.append((sku, counter)) }
            case let .restock(sku, delta): reply = state.restock(sku, delta: delta, log: &scratch)
            case let .setPaused(sku, paused): reply = state.setPaused(sku, paused: paused, log: &scratch)
            case let .stock(sku): reply = state.stock(sku).map(Reply.stock) ?? .rejected(.noSuchSku)
            case let .audit(sku):
                // An audit of every SKU is routed to every shard a slice at a time (``audit(from:limit:)``).
                guard let sku else { preconditionFailure("an AUDIT of every SKU in a shard's batch") }
                reply = state.audit(sku).map { .audit(AuditFindings($0)) } ?? .rejected(.noSuchSku)
            case let .reserve(user, lines, requestId, ttlMillis):
                reply = state.reserve(
                    user: user, lines: lines, requestId: requestId, ttlMillis: ttlMillis ?? Limits.ttlMillisDefault,
                    now: now, log: &scratch)
            case let .confirm(id):
                let (r, effects) = state.confirm(id, now: now, log: &scratch)
                reply = r
                result.effects += effects
            case let .cancel(id):
                let (r, effects) = state.cancel(id, now: now, log: &scratch)
                reply = r
                result.effects += effects
            case let .order(id): reply = state.order(id).map(Reply.order) ?? .rejected(.noSuchOrder)
            case .orders:
                // A page of a user's orders is routed to every shard, a walk at a time (``orders(ofUser:afterSequence:count:bytesBefore:walk:steps:budgetNanos:)``).
                preconditionFailure("ORDERS in a shard's batch")
            case let .deduct(sku, quantity): reply = state.deduct(sku, quantity: quantity, log: &scratch)
            }
            result.replies.append((slot, reply))
        }
        if !added.isEmpty { directory.publish(added) }
        if !flush() {
            // Nothing of this run may be seen: not its replies, not its effects on other shards.
            result.replies = slots.map { ($0, .rejected(.unavailable(failure ?? "journal failed"))) }
            result.effects = []
            result.refused = true
        }
        // The effects reach their shards after this run (``Engine``'s applyEffects, which then calls
        // ``effectsArrived()`` there). Until then runs there wait and their counters answer nothing:
        // marked before this run publishes its state (``endChange()``, its deadlines stored with
        // release ordering after this), so whoever sees this shard's order gone, expired for one,
        // sees its stock on the way too (found by review: for a few milliseconds after a basket
        // expired, the other shard still showed its units held, and answered SOLDOUT).
        if !result.effects.isEmpty, !peers.isEmpty {
            for target in Set(result.effects.map(\.shard)) { peers[target].preparing.wrappingAdd(1, ordering: .relaxed) }
        }
        result.lsn = visibleLSN
        return result
    }

    /// Marks a change in progress for lock-free readers (``ShardGauges/runEpoch`` odd).
    private func beginChange() { gauges.runEpoch.wrappingAdd(1, ordering: .acquiringAndReleasing) }

    /// Publishes the position and deadlines, then ends the change (epoch even again).
    private func endChange() {
        gauges.visibleLSN.store(visibleLSN, ordering: .releasing)
        publishDeadlines()
        gauges.runEpoch.wrappingAdd(1, ordering: .acquiringAndReleasing)
    }

    private func publishDeadlines() {
        gauges.nextDeadlineMillis.store(state.nextDeadlineMillis, ordering: .relaxed)
        // Release: a reader that sees a basket no longer due sees its effects marked arriving on
        // their shards (``run``), when it reads those after this (acquiring).
        gauges.nextForeignDeadlineMillis.store(state.nextForeignDeadlineMillis, ordering: .releasing)
    }

    /// Appends what the scratch buffer holds. false when the log refused it: the shard then stops
    /// accepting anything, since its memory is ahead of what can be made durable.
    private func flush() -> Bool {
        guard !scratch.isEmpty else { return true }
        do {
            visibleLSN = max(visibleLSN, try log.append(scratch))
            return true
        } catch {
            if case .unavailable(let reason) = error { failure = reason } else { failure = "journal refused a write: \(error)" }
            return false
        }
    }

    /// Expires due orders (the engine calls this before a batch for shards whose baskets are due, and a
    /// timer for shards that see no traffic). Does nothing once the log has failed: a change that cannot
    /// be logged must not be made.
    public func expire(now: Int64) -> BatchResult { run([], slots: [], now: now) }

    /// Expires at most `limit` due orders (``ShardState/expireDue(now:limit:log:)``), so one call keeps
    /// the shard's executor (an event loop, in the server) for a bounded time; more may stay due.
    public func expire(now: Int64, limit: Int) -> BatchResult { run([], slots: [], now: now, expiryLimit: limit) }

    /// Applies effects of another shard's orders on this shard's SKUs; `lsn` is the position of the
    /// record that caused them, which replies from this shard then wait for.
    public func apply(_ effects: [ShardState.ForeignEffect], causedAt lsn: UInt64) {
        beginChange()
        for effect in effects { state.apply(effect) }
        visibleLSN = max(visibleLSN, lsn)
        endChange()
    }

    /// Returns once no basket holds are being placed here (at once when none are).
    public func settled() async {
        guard gauges.preparing.load(ordering: .acquiring) > 0 else { return }
        await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
            let settledMeanwhile = settleWaiters.withLock { waiters in
                guard gauges.preparing.load(ordering: .acquiring) > 0 else { return true }
                waiters.append(waiter)
                return false
            }
            if settledMeanwhile { waiter.resume() }
        }
    }

    /// Effects of another shard's run (``run``, which marked them arriving here) have been applied here
    /// (``apply(_:causedAt:)``): runs here go on once nothing else is arriving or being placed.
    public nonisolated func effectsArrived() { endPrepare() }

    private nonisolated func endPrepare() {
        let left = gauges.preparing.wrappingSubtract(1, ordering: .relaxed).newValue
        precondition(left >= 0, "more basket holds settled (or effects arrived) than placed (or sent)")
        if left == 0 {
            let waiters = settleWaiters.withLock { waiters in
                defer { waiters.removeAll() }
                return waiters
            }
            for waiter in waiters { waiter.resume() }
        }
    }

    // MARK: Multi-shard orders

    public func beginRequest(user: Name, requestId: Name?, lines: [OrderLine]) -> Reply? {
        if let refusal = refusal { return .rejected(.unavailable(refusal)) }
        if role.isReadOnly { return .rejected(.readOnly) }
        return state.beginRequest(user: user, requestId: requestId, lines: lines)
    }

    public func abortRequest(user: Name, requestId: Name?) {
        state.abortRequest(user: user, requestId: requestId)
    }

    /// Holds this shard's lines of a basket. On success the holds count as being placed (runs here
    /// wait) until ``settle(user:items:internedUser:committedAt:)`` commits or releases them.
    public func prepareHold(
        user: Name, lines: [OrderLine]
    ) -> Result<(items: [Record.Item], internedUser: Bool, visible: UInt64), Rejection> {
        if let refusal = refusal { return .failure(.unavailable(refusal)) }
        // Checked at each step of a basket, not only at its start: a basket that was begun when the
        // node took changes may resume after its lease lapsed (a process frozen, then woken).
        if role.isReadOnly { return .failure(.readOnly) }
        beginChange()
        defer { endChange() }
        var interned = false
        switch state.prepareHold(user: user, lines: lines, internedUser: &interned) {
        case .failure(let rejection): return .failure(rejection)
        case .success(let items):
            gauges.preparing.wrappingAdd(1, ordering: .relaxed)
            return .success((items, interned, visibleLSN))
        }
    }

    /// Ends a prepared hold: with a position, the order was recorded there (replies here wait for it);
    /// with nil, the basket failed and the holds are given back.
    public func settle(user: Name, items: [Record.Item], internedUser: Bool, committedAt lsn: UInt64?) {
        beginChange()
        if let lsn {
            visibleLSN = max(visibleLSN, lsn)
        } else {
            state.releasePrepared(user: user, items: items, internedUser: internedUser)
        }
        endChange()
        endPrepare()
    }

    /// Records the order and returns its id and the log position to wait for.
    public func commitOrder(
        user: Name, requestId: Name?, items: [Record.Item], skus: [Name], deadlineMillis: Int64
    ) -> Result<(OrderID, UInt64), Rejection> {
        if let refusal = refusal {
            state.abortRequest(user: user, requestId: requestId)
            return .failure(.unavailable(refusal))
        }
        // The fence, again at the commit: nothing is logged once the node stopped taking changes (a
        // newer primary may exist, and a term started since would find an order of the old one after it).
        if role.isReadOnly {
            state.abortRequest(user: user, requestId: requestId)
            return .failure(.readOnly)
        }
        beginChange()
        defer { endChange() }
        scratch.removeAll()
        let id = state.commitOrder(
            user: user, requestId: requestId, items: items, skus: skus, deadlineMillis: deadlineMillis, log: &scratch)
        guard flush() else { return .failure(.unavailable(failure ?? "journal failed")) }
        return .success((id, visibleLSN))
    }

    // MARK: Reads for the engine and tests

    /// A step of a page of this shard's orders of a user (``ShardState/OrdersWalk``): starts the walk
    /// when `walk` is nil, or when the state was replaced whole since it started (`generation`), then
    /// visits `steps` orders at a time until it is done or has taken `budgetNanos` (at least once).
    /// Once the walk is done, the page (``ShardState/ordersPage(_:bytesBefore:)``); and the position
    /// the reply must wait for.
    public func orders(
        ofUser user: Name, afterSequence: UInt32, count: Int, bytesBefore: Int, walk: OrdersStep?, steps: Int,
        budgetNanos: UInt64
    ) -> Result<OrdersStep, Rejection> {
        if let refusal = refusal { return .failure(.unavailable(refusal)) }
        let started = EngineRole.monotonicNanos()
        var step = walk.flatMap { $0.generation == generation ? $0 : nil }
            ?? OrdersStep(walk: state.ordersWalk(ofUser: user, afterSequence: afterSequence, count: count), generation: generation)
        while !state.advance(&step.walk, steps: steps) {
            guard EngineRole.monotonicNanos() &- started < budgetNanos else { break }
        }
        if step.walk.isDone { step.page = state.ordersPage(step.walk, bytesBefore: bytesBefore) }
        step.lsn = visibleLSN
        return .success(step)
    }

    /// Where a walk over a user's orders stands (``orders(ofUser:afterSequence:count:bytesBefore:walk:steps:budgetNanos:)``).
    public struct OrdersStep: Sendable {
        var walk: ShardState.OrdersWalk
        let generation: UInt64
        /// The page, once the walk is done.
        public var page: [OrderInfo]?
        public var lsn: UInt64 = 0
    }

    /// A slice of the audit of every SKU (``ShardState/audit(from:limit:)``), the index the next slice
    /// starts at (nil: this was the last), the ``generation`` it was taken in, and the position the
    /// reply must wait for; waits while basket holds are placed.
    public func audit(from index: Int, limit: Int) async -> Result<AuditSlice, Rejection> {
        while gauges.preparing.load(ordering: .relaxed) > 0 { await settled() }
        if let refusal = refusal { return .failure(.unavailable(refusal)) }
        let findings = state.audit(from: index, limit: limit)
        let next = index + findings.count
        return .success(AuditSlice(findings: findings, next: next < state.skuCount ? next : nil, generation: generation, lsn: visibleLSN))
    }

    /// A slice of a shard's audit (``audit(from:limit:)``).
    public struct AuditSlice: Sendable {
        public var findings: [AuditFinding]
        public var next: Int?
        public var generation: UInt64
        public var lsn: UInt64
    }

    /// How many times the state was replaced whole (a replica's full copy, ``install(_:at:)``). Work
    /// that reads the state a slice at a time starts over when it changed between its slices: SKU
    /// indices of one state mean other SKUs in the next.
    public private(set) var generation: UInt64 = 0

    // MARK: Replication

    /// Applies a primary's records `lsn + 1 ...` to the states of `shards` (this one among them, all
    /// on this shard's executor) and to `epochs` with ``EngineState/apply(_:)``, in this one run: each state is moved
    /// out of its shard (no copy), the records applied, and the states moved back and published.
    /// Stops at the first record that does not fit; returns the position reached and that error.
    func applyReplicated(
        _ records: [Record], at lsn: UInt64, epochs: EpochHistory, across shards: [Shard]
    ) -> (lsn: UInt64, epochs: EpochHistory, error: EngineState.ReplayError?) {
        var states: [ShardState] = []
        states.reserveCapacity(shards.count)
        for shard in shards {
            precondition(shard === self || shard.executor === executor, "a replica's shards share one executor")
            states.append(shard === self ? lendState() : shard.assumeIsolated { $0.lendState() })
        }
        var replay = EngineState(shards: states, lsn: lsn, epochs: epochs)
        states = []
        var failure: EngineState.ReplayError?
        for record in records {
            do throws(EngineState.ReplayError) { try replay.apply(record) } catch {
                failure = error
                break
            }
        }
        let reached = replay.lsn
        for (i, shard) in shards.enumerated() {
            let state = replay.shards[i]
            if shard === self { takeBack(state, visibleAt: reached) } else { shard.assumeIsolated { $0.takeBack(state, visibleAt: reached) } }
        }
        return (reached, replay.epochs, failure)
    }

    /// Replaces this shard's state with `replacement` (a full copy at `lsn`) and every shard's on this
    /// executor in the same run (see ``Engine/installReplicated(_:)``).
    func installReplicated(_ replacement: EngineState, across shards: [Shard]) {
        for (i, shard) in shards.enumerated() {
            precondition(shard === self || shard.executor === executor, "a replica's shards share one executor")
            let state = replacement.shards[i]
            if shard === self { install(state, at: replacement.lsn) } else { shard.assumeIsolated { $0.install(state, at: replacement.lsn) } }
        }
    }

    private func install(_ replacement: ShardState, at lsn: UInt64) {
        beginChange()
        state = replacement
        generation += 1
        directory.replaceAll(state.counters)
        // The copy's position, even below this one's: a node that starts over goes back.
        visibleLSN = lsn
        endChange()
    }

    /// SKUs the state had when it was lent: those after it are published when it comes back.
    private var lentSkuCount = 0

    /// Moves the state out, leaving an empty one (only within ``applyReplicated(_:at:across:)``'s run).
    private func lendState() -> ShardState {
        beginChange()
        lentSkuCount = state.skus.count
        var lent = ShardState(shard: index)
        swap(&lent, &state)
        return lent
    }

    /// Takes the state back after records were applied to it: publishes SKUs added, the position
    /// replies wait for, and the deadlines; ends the change ``lendState()`` began.
    private func takeBack(_ applied: ShardState, visibleAt lsn: UInt64) {
        state = applied
        if state.skus.count > lentSkuCount {
            directory.publish(state.skus[lentSkuCount...].map { ($0.name, $0.counter) })
        }
        visibleLSN = max(visibleLSN, lsn)
        endChange()
    }

    /// Orders placed from now on carry `idTag` in their ids: the tag of the term being started
    /// (``Engine/startEpoch(_:)``, before the engine takes changes).
    func startTerm(idTag: UInt32) {
        state.idTag = idTag
    }

    /// A copy of the state. Costly while the shard keeps changing: its next change then copies every
    /// array the copy shares (copy on write). For counts, use ``counts``.
    public func snapshotState() -> ShardState { state }
    /// SKUs and orders held, without copying anything.
    public var counts: (skus: Int, orders: Int) { (state.skuCount, state.orderCount) }
    /// The position a reply must wait for to show only durable state (see ``visibleLSN``).
    public var visiblePosition: UInt64 { visibleLSN }
}

/// A serial executor on a dispatch queue of its own: what a shard runs on when it is given no executor
/// (tests, tools), and what the simulator gives all its shards (a stand-in for one event loop).
public final class QueueExecutor: SerialExecutor, @unchecked Sendable {
    private let queue: DispatchQueue

    public init(label: String) { queue = DispatchQueue(label: label) }

    /// For tests: jobs wait in the queue until ``resume()`` (a shard whose loop is busy elsewhere).
    func suspend() { queue.suspend() }
    func resume() { queue.resume() }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedSerialExecutor()
        queue.async { job.runSynchronously(on: executor) }
    }
}
