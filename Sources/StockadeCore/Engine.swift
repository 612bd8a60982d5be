import Atomics
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The shards and the log together: routes each command to the shard that owns its SKU or order,
/// coordinates orders that span shards, and answers only once the changes are durable.
public final class Engine: Sendable {
    public let shards: [Shard]
    /// Whether the engine follows a primary's log (read-only) or takes changes; shared with every shard.
    public let role: EngineRole
    private let log: any ChangeLog
    /// The latest "now" any caller passed: time as the engine sees it never goes back, so a wall clock
    /// stepped backwards cannot make an expired hold pending again on a shard that has not expired it yet.
    private let clockMillis = Atomic<Int64>(.min)
    /// The primary terms of the log this engine's state is at (``EpochHistory``): from recovery, then
    /// moved by ``startEpoch(_:)`` and by a primary's records on a replica.
    private let epochHistory: Mutex<EpochHistory>
    /// The epoch ``startEpoch(_:)`` is logging now, if any: one term starts at a time.
    private let epochStarting = Mutex<UInt64?>(nil)

    /// Gives an executor back to its other work until a later turn: the pause long engine work takes
    /// between its slices on a shard (an AUDIT of every SKU, a backlog of due holds). Called with the
    /// index of the shard's executor (``executorIndex(ofShard:executorCount:)``) and how long the slice
    /// before it kept that executor busy. A task that only re-enqueued itself would not do in the
    /// server: a SwiftNIO loop runs queued work until none is left before it polls its sockets again.
    public typealias LaterTurn = @Sendable (_ executorIndex: Int, _ busyNanos: UInt64) async -> Void

    private let laterTurn: LaterTurn
    private let executorCount: Int
    private let slicing: Slicing

    /// How much unbounded work (an AUDIT of every SKU, an ORDERS' walk) one call into a shard does
    /// before it pauses (``LaterTurn``). The defaults are the server's; the simulator uses tiny
    /// slices, so that the work it checks against its model is cut and resumed at every step.
    public struct Slicing: Sendable {
        /// SKUs audited per call (``Engine/auditChunk``).
        public var auditSKUs = Engine.auditChunk
        /// A user's orders walked between looks at the clock (``Engine/ordersWalkChunk``).
        public var ordersWalkSteps = Engine.ordersWalkChunk
        /// How long a call may go on with work sliced by time (``Engine/sliceNanosDefault``); 0: one
        /// chunk a call.
        public var nanos = Engine.sliceNanosDefault

        public init(auditSKUs: Int = Engine.auditChunk, ordersWalkSteps: Int = Engine.ordersWalkChunk, nanos: UInt64 = Engine.sliceNanosDefault) {
            precondition(auditSKUs >= 1 && ordersWalkSteps >= 1, "a slice does some work")
            (self.auditSKUs, self.ordersWalkSteps, self.nanos) = (auditSKUs, ordersWalkSteps, nanos)
        }
    }

    /// Starts the engine on a recovered (or empty) state. Shard `i` runs on `executors[i % count]` (the
    /// server's event loops), or on a queue of its own when `executors` is empty. `laterTurn`: how
    /// long work pauses between slices (``LaterTurn``); by default it yields. `slicing`: how large
    /// those slices are (``Slicing``).
    public init(
        state: EngineState, log: any ChangeLog, executors: [any SerialExecutor] = [], laterTurn: LaterTurn? = nil,
        readOnly: Bool = false, slicing: Slicing = Slicing()
    ) {
        self.laterTurn = laterTurn ?? { _, _ in await Task.yield() }
        self.slicing = slicing
        executorCount = max(1, executors.count)
        let role = EngineRole(readOnly: readOnly)
        let gauges = state.shards.map { _ in ShardGauges() }
        shards = state.shards.map {
            Shard(
                state: $0, log: log,
                executor: executors.isEmpty ? nil : executors[Self.executorIndex(ofShard: $0.shard, executorCount: executors.count)],
                role: role, gauges: gauges[$0.shard], peers: gauges)
        }
        self.role = role
        self.log = log
        epochHistory = Mutex(state.epochs)
        untouched = [Bool](repeating: false, count: state.shards.count)
        let table = UnsafeMutableBufferPointer<Unmanaged<ShardGauges>>.allocate(capacity: shards.count)
        _ = table.initialize(from: shards.lazy.map { Unmanaged.passUnretained($0.gauges) })
        gaugeTable = table
    }

    deinit { gaugeTable.deallocate() }

    /// Each shard's gauges, unretained: `shards` keeps them alive as long as the engine. The sold-out
    /// fast path reads them for every command, from both event loops; through a retained reference
    /// each read would also write the reference count, a cache line the loops would then pass back
    /// and forth (measured: about a tenth of the server's samples under sold-out DEDUCT -P16).
    nonisolated(unsafe) private let gaugeTable: UnsafeMutableBufferPointer<Unmanaged<ShardGauges>>

    /// Reads shard `s`'s gauges without retaining them.
    @inline(__always)
    private func withGauges<Result>(_ s: Int, _ body: (ShardGauges) -> Result) -> Result {
        gaugeTable[s]._withUnsafeGuaranteedRef(body)
    }

    /// No shard touched yet: a batch's first routing, shared (copied, never written) by one-command batches.
    private let untouched: [Bool]

    /// The primary terms of the log so far.
    public var epochs: EpochHistory { epochHistory.withLock { $0 } }

    /// The term in force at `position` (``EpochHistory/term(at:)``), or nil while a term is being
    /// started: its record is durable a moment before the history has it.
    public func term(at position: UInt64) -> (term: EpochHistory.Term?, undecided: Bool)? {
        epochStarting.withLock { starting in starting == nil ? epochs.term(at: position) : nil }
    }

    /// Starts a primary term: logs ``Record/epochStarted(epoch:)`` and waits until it is durable,
    /// so every change of the term comes after it in the log. Call it while the engine takes no
    /// changes (read-only: a replica being promoted); returns the record's position. Refused with
    /// ``Rejection/badArgument(_:)``, logging nothing, when `epoch` is not newer than the log's last
    /// one (or is past ``EpochHistory/epochMax``) or another term is being started.
    public func startEpoch(_ epoch: UInt64) async throws(Rejection) -> UInt64 {
        precondition(role.isFollower, "a term starts before the engine takes changes")
        let admitted = epochStarting.withLock { starting in
            guard starting == nil, epoch > epochs.lastEpoch, epoch <= EpochHistory.epochMax else { return false }
            starting = epoch
            return true
        }
        guard admitted else {
            throw .badArgument("epoch \(epoch) is not newer than the log's epoch \(epochs.lastEpoch), or another term is starting")
        }
        defer { epochStarting.withLock { $0 = nil } }
        var buffer = RecordBuffer(capacity: 16)
        buffer.epochStarted(epoch)
        let lsn = try log.append(buffer)
        try await log.waitDurable(lsn)
        for shard in shards { await shard.startTerm(idTag: OrderID.tag(ofEpoch: epoch)) }
        epochHistory.withLock { $0.append(EpochHistory.Term(epoch: epoch, start: lsn)) }
        return lsn
    }

    /// Replaces the whole state with a primary's (a full copy: its snapshot), every shard in one run
    /// on the shards' one executor. Read-only engines only, with the shard count of the copy. The
    /// positions replies wait for become the copy's, even when lower (a node starting over).
    public func installReplicated(_ state: EngineState) async {
        precondition(role.isReadOnly && state.shards.count == shards.count)
        await shards[0].installReplicated(state, across: shards)
        epochHistory.withLock { $0 = state.epochs }
    }

    /// Applies records of a primary's log, in order, to every shard, through recovery's replay
    /// (``EngineState/apply(_:)``): the same checks, so a record that does not fit this state stops
    /// replication instead of corrupting it. `lsn` is the position the state is at (the records are
    /// `lsn + 1 ...`); returns the position after the records applied, with the error that stopped
    /// them, if any. The engine must be read-only and every shard must run on one executor (a
    /// replica's shards share one loop): the records are applied in one run there, so no reader sees
    /// a record half applied across shards.
    public func applyReplicated(_ records: [Record], at lsn: UInt64) async -> (lsn: UInt64, error: EngineState.ReplayError?) {
        precondition(role.isReadOnly, "only a read-only engine applies another's log")
        guard !records.isEmpty else { return (lsn, nil) }
        let applied = await shards[0].applyReplicated(records, at: lsn, epochs: epochs, across: shards)
        epochHistory.withLock { $0 = applied.epochs }
        return (applied.lsn, applied.error)
    }

    /// Which of `executorCount` executors shard `shard` runs on: the one place that says so.
    public static func executorIndex(ofShard shard: Int, executorCount: Int) -> Int { shard % executorCount }

    public var shardCount: Int { shards.count }

    /// The shard that owns a SKU: FNV-1a of its UTF-8 bytes, modulo the shard count. Stable across
    /// processes and builds, so a data directory always maps SKUs the same way.
    public static func shardIndex(of sku: Name, shardCount: Int) -> Int {
        sku.withBytes { bytes in
            var hash: UInt64 = 0xcbf2_9ce4_8422_2325
            for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
            return Int(hash % UInt64(shardCount))
        }
    }

    public func shardIndex(of sku: Name) -> Int { Self.shardIndex(of: sku, shardCount: shards.count) }

    /// Available stock of a SKU read from its published counter, without entering the shard.
    public func available(_ sku: Name) -> Int64? {
        shards[shardIndex(of: sku)].directory.counter(sku)?.available
    }

    private enum Route {
        case shard(Int)
        /// Needs several shards: runs alone, after everything before it.
        case global
        /// Answered without entering a shard; the reply waits for `lsn` to be durable.
        case immediate(Reply, lsn: UInt64)
    }

    /// What earlier commands of the same batch did, which decides whether a later one may be answered
    /// from the published counters (it may only answer what it would have got in order).
    fileprivate struct BatchProgress {
        /// Shards that earlier commands of the batch go to.
        var touched: [Bool]
        /// An earlier command may change stock on any shard (confirm, cancel, a multi-shard command).
        var crossShard = false
        /// What the last sold-out check read, and under which run epoch of its shard: while the epoch
        /// is the same, no run has changed the shard since, so the counter and the visible position
        /// are what they were. A batch of commands on one SKU (a pipeline of the same request) reads
        /// the shard's directory and the counter once, not once a command: a directory read is an
        /// atomic load of a shared reference (a compare-and-swap on a line both loops read), and a
        /// counter held here would be retained and released for every command.
        /// Kept only within a batch that runs without waiting (``executeLocally(_:now:localShards:)``).
        var lastCheck: SoldOutCheck?
    }

    /// One read of a SKU's counter for the sold-out fast path (``BatchProgress/lastCheck``), made while
    /// the log had not failed: the log's state is read with the counter, once, so a failure later in
    /// the same batch comes after these commands, as a failure just after any single check does.
    fileprivate struct SoldOutCheck {
        var owner: Int
        var sku: Name
        var epoch: UInt64
        var available: Int64
        var lsn: UInt64
    }

    /// Where `commands[i]` goes. Given the array and an index, not the command: the switch then reads
    /// the element in place, where a command passed by value was copied out of the array first (a
    /// retain and a release of each of its references).
    private func route(_ commands: [Command], at i: Int, now: Int64, progress: inout BatchProgress) -> Route {
        switch commands[i] {
        case let .addSku(sku, _, _), let .restock(sku, _), let .setPaused(sku, _), let .stock(sku):
            return .shard(shardIndex(of: sku))
        case let .deduct(sku, quantity):
            let owner = shardIndex(of: sku)
            // The same fast path for the seed's own operation: a deduction the counter cannot cover
            // answers 0 whether or not the SKU is paused (``ShardState/deduct(_:quantity:log:)``).
            if quantity >= 1, quantity <= Limits.quantityMax, !progress.touched[owner], !progress.crossShard,
               let lsn = soldOutWithoutEntering(owner: owner, sku: sku, now: now, needed: quantity, progress: &progress)
            {
                return .immediate(.deducted(0), lsn: lsn)
            }
            return .shard(owner)
        case let .audit(sku):
            return sku.map { .shard(shardIndex(of: $0)) } ?? .global
        case let .reserve(user, lines, requestId, ttlMillis):
            if let rejection = ShardState.validateReserve(
                user: user, lines: lines, requestId: requestId, ttlMillis: ttlMillis ?? Limits.ttlMillisDefault)
            {
                return .immediate(.rejected(rejection), lsn: 0)
            }
            let owner = shardIndex(of: lines[0].sku)
            if lines.count == 1 {
                // Sold-out fast path, no shard hop: not for requests with an id (a retry must find its
                // order), and only when nothing earlier in this batch could have changed the SKU.
                if requestId == nil, !progress.touched[owner], !progress.crossShard,
                   let lsn = soldOutWithoutEntering(owner: owner, sku: lines[0].sku, now: now, needed: 1, progress: &progress)
                {
                    return .immediate(.rejected(.soldOut), lsn: lsn)
                }
                return .shard(owner)
            }
            return lines.allSatisfy({ shardIndex(of: $0.sku) == owner }) ? .shard(owner) : .global
        case let .confirm(id), let .cancel(id), let .order(id):
            guard let shard = id.shard, shard < shards.count else { return .immediate(.rejected(.noSuchOrder), lsn: 0) }
            return .shard(shard)
        case let .orders(user, _, _):
            return isValidName(user)
                ? .global : .immediate(.rejected(.badArgument("user id must be 1 to \(Limits.nameBytesMax) bytes")), lsn: 0)
        }
    }

    /// The position to wait for when the SKU's published counter shows a state, with every record behind
    /// it appended, in which a reservation is sold out; nil when the shard must decide (stock left, a run
    /// or a basket in progress, a hold due to expire, the log failed).
    private func soldOutWithoutEntering(owner: Int, sku: Name, now: Int64, needed: Int64, progress: inout BatchProgress) -> UInt64? {
        withGauges(owner) { gauges in
            let epoch = gauges.runEpoch.load(ordering: .acquiring)
            guard epoch & 1 == 0, gauges.preparing.load(ordering: .acquiring) == 0,
                  gauges.nextDeadlineMillis.load(ordering: .relaxed) > now
            else { return nil }
            let check: SoldOutCheck
            if let last = progress.lastCheck, last.epoch == epoch, last.owner == owner, last.sku == sku {
                check = last
            } else {
                guard let counter = shards[owner].directory.counter(sku) else { return nil }
                let available = counter.available
                let lsn = gauges.visibleLSN.load(ordering: .acquiring)
                guard gauges.runEpoch.load(ordering: .acquiring) == epoch, log.failureReason == nil else { return nil }
                check = SoldOutCheck(owner: owner, sku: sku, epoch: epoch, available: available, lsn: lsn)
                progress.lastCheck = check
            }
            guard check.available < needed else { return nil }
            return check.lsn
        }
    }

    /// What ``soldOutAnswer(to:memo:)`` keeps between the commands of one read: the time they are
    /// answered at, whether a basket is due to expire, and the last counter read. Made by
    /// ``soldOutMemo(now:)`` for one read's commands and dropped with them: it is valid only while
    /// they are parsed, on one thread, with nothing awaited in between.
    public struct SoldOutMemo {
        let now: Int64
        /// A basket owned by some shard is due to expire: its release may add stock to any shard,
        /// so no counter answers for it. Looked at once, by the read's first DEDUCT or RESERVE, before
        /// any counter (see ``Shard``'s run: what a basket seen expired releases is marked arriving).
        var basketsDue: Bool?
        fileprivate var progress: BatchProgress

        fileprivate init(now: Int64, progress: BatchProgress) {
            self.now = now
            self.progress = progress
        }
    }

    /// A memo for the sold-out answers of one read's commands, at wall-clock time `now` (milliseconds).
    /// Cheap: the engine's clock is read, not advanced (a time behind it is taken as it), and nothing
    /// else is looked at until a DEDUCT or RESERVE is asked about.
    public func soldOutMemo(now: Int64) -> SoldOutMemo {
        SoldOutMemo(now: max(now, clockMillis.load(ordering: .relaxed)), progress: BatchProgress(touched: untouched))
    }

    /// Whether a basket of any shard is due to expire at `now` (``SoldOutMemo/basketsDue``).
    private func basketsDue(_ memo: inout SoldOutMemo) -> Bool {
        if let due = memo.basketsDue { return due }
        let now = memo.now
        let due = shards.indices.contains { s in withGauges(s) { $0.nextForeignDeadlineMillis.load(ordering: .acquiring) <= now } }
        memo.basketsDue = due
        return due
    }

    /// A command that may be answered from its SKU's counter (``soldOutAnswer(to:memo:)``), in the
    /// form a front reads it from a request's arguments: no ``Command`` (and for a RESERVE, no
    /// array of order lines) is built for a request answered this way.
    public enum SoldOutCandidate: Sendable {
        /// `DEDUCT sku quantity`.
        case deduct(sku: Name, quantity: Int64)
        /// `RESERVE user sku quantity [TTL ms]`: one SKU, no request id.
        case reserve(user: Name, sku: Name, quantity: Int64, ttlMillis: Int64?)

        /// The command it is.
        public var command: Command {
            switch self {
            case let .deduct(sku, quantity): .deduct(sku: sku, quantity: quantity)
            case let .reserve(user, sku, quantity, ttlMillis):
                .reserve(user: user, lines: [OrderLine(sku: sku, quantity: quantity)], requestId: nil, ttlMillis: ttlMillis)
            }
        }
    }

    /// The reply to `candidate` when its SKU's published counter shows it cannot be covered, decided
    /// without the shard and without a batch, and the log position the reply waits for; nil when the
    /// shard must decide. The same answer ``executeLocally(_:now:localShards:)`` and
    /// ``execute(_:now:)`` give a batch that starts with the command (their sold-out fast path): for
    /// a DEDUCT of a valid quantity, or a valid one-line RESERVE without a request id, of a SKU whose
    /// counter cannot cover it, with no run or basket in progress on its shard, no hold due there
    /// and no basket due anywhere, and the log not failed. Nothing changes.
    ///
    /// A caller answering a read's commands in order may use it for a command only while nothing
    /// before it in that read joined a batch (a batch runs after the read is parsed: a command
    /// answered here would be answered before the state the commands before it leave).
    public func soldOutAnswer(to candidate: borrowing SoldOutCandidate, memo: inout SoldOutMemo) -> (reply: Reply, lsn: UInt64)? {
        switch candidate {
        case let .deduct(sku, quantity):
            // Baskets first, the SKU's shard after: a basket seen expired has its release marked
            // arriving on that shard by then (``Shard``'s run), so the shard's gauges decline.
            guard quantity >= 1, quantity <= Limits.quantityMax, !basketsDue(&memo),
                  let lsn = soldOutWithoutEntering(
                      owner: shardIndex(of: sku), sku: sku, now: memo.now, needed: quantity, progress: &memo.progress)
            else { return nil }
            return (.deducted(0), lsn)
        case let .reserve(user, sku, quantity, ttlMillis):
            // Baskets first, as for DEDUCT; then the counter, before the validation: most reservations
            // that get this far are not sold out, and are validated where they run.
            guard !basketsDue(&memo),
                  let lsn = soldOutWithoutEntering(
                      owner: shardIndex(of: sku), sku: sku, now: memo.now, needed: 1, progress: &memo.progress),
                  ShardState.isValidReserveOfOne(user: user, sku: sku, quantity: quantity, ttlMillis: ttlMillis ?? Limits.ttlMillisDefault)
            else { return nil }
            return (.rejected(.soldOut), lsn)
        }
    }

    /// Whether a command can change stock on a shard other than the one it runs on (a basket's
    /// confirm or cancel releases or sells its items on their shards).
    private static func mayAffectOtherShards(_ command: Command) -> Bool {
        switch command {
        case .confirm, .cancel: true
        default: false
        }
    }

    /// Executes commands with the effect of running them one by one in order, and returns their
    /// replies in the same order. Consecutive commands are grouped per shard (one hop per shard), which
    /// is the same as running them in order because commands on different shards do not interact; a
    /// command that can (confirm, cancel) closes its group and runs last in it, its effects on other
    /// shards are applied before the next group, and a command that needs several shards runs alone.
    /// Replies come back once every change they show is durable.
    public func execute(_ commands: [Command], now: Int64) async -> [Reply] {
        let now = monotonic(now)
        var replies = [Reply](repeating: .done, count: commands.count)
        var waitFor = await expireBaskets(now: now)
        var perShard = [[Int]](repeating: [], count: shards.count)
        var progress = BatchProgress(touched: [Bool](repeating: false, count: shards.count))
        var position = 0
        while position < commands.count {
            var pending = false
            var closing: Int?
            while position < commands.count {
                // Groups may run (and wait) between two commands here: no counter is kept across them.
                progress.lastCheck = nil
                let route = route(commands, at: position, now: now, progress: &progress)
                if case .global = route { break }
                position += 1
                switch route {
                case .shard(let s):
                    perShard[s].append(position - 1)
                    progress.touched[s] = true
                    pending = true
                    if Self.mayAffectOtherShards(commands[position - 1]) {
                        progress.crossShard = true
                        closing = s
                    }
                case .immediate(let reply, let lsn):
                    replies[position - 1] = reply
                    waitFor = max(waitFor, lsn)
                case .global: break
                }
                if closing != nil { break }
            }
            if pending {
                for s in perShard.indices where !perShard[s].isEmpty && s != closing {
                    waitFor = max(waitFor, await runGroup(s, commands, perShard[s], now: now, into: &replies))
                    perShard[s].removeAll(keepingCapacity: true)
                }
                if let s = closing {
                    waitFor = max(waitFor, await runGroup(s, commands, perShard[s], now: now, into: &replies))
                    perShard[s].removeAll(keepingCapacity: true)
                }
            }
            if closing == nil, position < commands.count {
                let (reply, lsn) = await executeGlobal(commands[position], now: now)
                replies[position] = reply
                waitFor = max(waitFor, lsn)
                progress.crossShard = true
                position += 1
            }
        }
        return await repliesWhenDurable(replies, waitFor: waitFor)
    }

    /// Returns `replies` once position `waitFor` is durable, or every one of them refused
    /// (``Rejection/unavailable(_:)``) when the log fails first: a reply is never shown before what it
    /// shows can survive a crash. (The server waits for ``executeLocally(_:now:localShards:)``'s
    /// replies its own way, per event loop, with the same outcome.)
    public func repliesWhenDurable(_ replies: [Reply], waitFor: UInt64) async -> [Reply] {
        guard waitFor > 0 else { return replies }
        do {
            try await log.waitDurable(waitFor)
        } catch {
            let reason: String
            if case .unavailable(let why) = error { reason = why } else { reason = "\(error)" }
            return replies.map { _ in .rejected(.unavailable(reason)) }
        }
        return replies
    }

    /// What ``executeLocally(_:now:localShards:)`` did.
    public enum LocalOutcome: Sendable {
        /// Every command ran: the replies, and the log position they wait for (0: none).
        case answered([Reply], waitFor: UInt64)
        /// Nothing ran: the batch needs several shards at once (a basket, ORDERS, AUDIT) or a wait
        /// (basket holds being placed, a basket due to expire). Use ``execute(_:now:)``.
        case needsAsync
        /// Nothing ran: shard `shard`, which is not local, is the first the batch needs. Running it where
        /// that shard is local may succeed.
        case needsShard(Int)
        /// Part of the batch ran: a shard it had checked turned out, when its group came to run, to be
        /// waiting for effects that another loop's run marked arriving there meanwhile (a basket on
        /// that loop cancelled, confirmed or expired). Nothing waits in place, so the commands that
        /// did not run are left to ``executeRest(_:_:)``.
        case partlyRan(PartialRun)
    }

    /// What ran of a batch that ``executeLocally(_:now:localShards:)`` could not finish in place.
    public struct PartialRun: Sendable {
        /// The replies of the commands that ran (the others' entries are placeholders).
        public let replies: [Reply]
        /// The log position the replies that ran wait for.
        public let waitFor: UInt64
        /// The slots of the commands that did not run, in the order sent. They run after the ones that
        /// ran: every command of `rest` either came after all of those or is on a shard none of those
        /// before it touched in its stretch (and so commutes with them).
        public let rest: [Int]
        /// The batch's "now".
        public let now: Int64
    }

    /// Finishes a batch that ``executeLocally(_:now:localShards:)`` ran in part: runs the commands it
    /// left, in order, with ``execute(_:now:)``, and returns every reply of the batch once all it shows
    /// is durable (or all refused if the log fails first).
    public func executeRest(_ commands: [Command], _ partial: PartialRun) async -> [Reply] {
        let rest = partial.rest.map { commands[$0] }
        let restReplies = await execute(rest, now: partial.now)
        var replies = partial.replies
        for (i, slot) in partial.rest.enumerated() { replies[slot] = restReplies[i] }
        return await repliesWhenDurable(replies, waitFor: partial.waitFor)
    }

    /// Tests only: called on the caller's thread with a shard's index just before a batch run in place
    /// enters that shard, where another loop may mark effects arriving there (the race that
    /// ``LocalOutcome/partlyRan(_:)`` answers).
    nonisolated(unsafe) var beforeRunInPlace: ((Int) -> Void)?

    /// Runs a batch synchronously, on the caller's thread, when every shard it enters runs on the
    /// caller's executor (`localShards[s]` true: the event loop the caller is on): no task, no hop, no
    /// suspension. Replies are the ones ``execute(_:now:)`` would give, in the same order; the caller
    /// answers once `waitFor` is durable (or refuses them all if the log fails first). Decides before
    /// anything runs, so ``LocalOutcome/needsAsync`` and ``LocalOutcome/needsShard(_:)`` change
    /// nothing; a shard that another loop marks waiting after that decision stops the run there
    /// (``LocalOutcome/partlyRan(_:)``, or ``LocalOutcome/needsAsync`` when nothing had run yet).
    ///
    /// It declines what could reach beyond the local shards or wait: a multi-shard command, a shard on
    /// another executor, basket holds being placed, a basket of any shard due to expire (its expiry
    /// changes other shards), the confirm or cancel of a basket, and a shard whose holds are overdue by
    /// more than ``inPlaceOverdueMillisMax`` (a backlog, expired a chunk at a time on the general path).
    public func executeLocally(_ commands: [Command], now: Int64, localShards: [Bool]) -> LocalOutcome {
        precondition(localShards.count == shards.count, "a local flag per shard")
        let now = monotonic(now)
        // Before any shard's own gauges (acquiring): a basket seen no longer due has its effects on
        // other shards marked arriving there already (``Shard``'s run), which ``runsInPlace`` then sees.
        for s in shards.indices where withGauges(s, { $0.nextForeignDeadlineMillis.load(ordering: .acquiring) <= now }) {
            return .needsAsync
        }
        if commands.count == 1 { return executeOneLocally(commands, now: now, localShards: localShards) }
        // Route everything first (nothing runs yet), exactly as `execute` would.
        var routes = [Route]()
        routes.reserveCapacity(commands.count)
        var progress = BatchProgress(touched: [Bool](repeating: false, count: shards.count))
        // By index: the commands are read in the array, not copied out of it.
        for i in commands.indices {
            let route = route(commands, at: i, now: now, progress: &progress)
            switch route {
            case .global: return .needsAsync
            case .immediate: break
            case .shard(let s):
                guard localShards[s] else { return .needsShard(s) }
                guard runsInPlace(s, now: now) else { return .needsAsync }
                progress.touched[s] = true
                if Self.mayAffectOtherShards(commands[i]) {
                    progress.crossShard = true
                    if case let .confirm(id) = commands[i], shards[s].assumeIsolated({ $0.mayAffectOtherShards(id) }) { return .needsAsync }
                    if case let .cancel(id) = commands[i], shards[s].assumeIsolated({ $0.mayAffectOtherShards(id) }) { return .needsAsync }
                }
            }
            routes.append(route)
        }
        // Run: the same stretches and groups as `execute`, each group entered in place.
        var replies = [Reply](repeating: .done, count: commands.count)
        var waitFor: UInt64 = 0
        var perShard = [[Int]](repeating: [], count: shards.count)
        var position = 0
        var ranAny = false
        // A group found its shard waiting (``LocalOutcome/partlyRan(_:)``): what has not run goes on elsewhere.
        func stopped() -> LocalOutcome {
            guard ranAny else { return .needsAsync }
            let rest = (perShard.flatMap { $0 } + Array(position..<commands.count)).sorted()
            return .partlyRan(PartialRun(replies: replies, waitFor: waitFor, rest: rest, now: now))
        }
        while position < commands.count {
            var closing: Int?
            while position < commands.count {
                let slot = position
                position += 1
                switch routes[slot] {
                case .shard(let s):
                    perShard[s].append(slot)
                    if Self.mayAffectOtherShards(commands[slot]) { closing = s }
                case .immediate(let reply, let lsn):
                    replies[slot] = reply
                    waitFor = max(waitFor, lsn)
                case .global:
                    preconditionFailure("declined above")
                }
                if closing != nil { break }
            }
            for s in perShard.indices where !perShard[s].isEmpty && s != closing {
                guard let lsn = runGroupInPlace(s, commands, perShard[s], now: now, into: &replies) else { return stopped() }
                waitFor = max(waitFor, lsn)
                ranAny = true
                perShard[s].removeAll(keepingCapacity: true)
            }
            if let s = closing {
                guard let lsn = runGroupInPlace(s, commands, perShard[s], now: now, into: &replies) else { return stopped() }
                waitFor = max(waitFor, lsn)
                ranAny = true
                perShard[s].removeAll(keepingCapacity: true)
            }
        }
        return .answered(replies, waitFor: waitFor)
    }

    /// ``executeLocally(_:now:localShards:)`` for a batch of one command (every round at pipeline 1):
    /// the same decisions and the same run, without the batch's routes, groups and flags.
    private func executeOneLocally(_ commands: [Command], now: Int64, localShards: [Bool]) -> LocalOutcome {
        var progress = BatchProgress(touched: untouched)
        switch route(commands, at: 0, now: now, progress: &progress) {
        case .global:
            return .needsAsync
        case .immediate(let reply, let lsn):
            return .answered([reply], waitFor: lsn)
        case .shard(let s):
            guard localShards[s] else { return .needsShard(s) }
            guard runsInPlace(s, now: now) else { return .needsAsync }
            if case let .confirm(id) = commands[0], shards[s].assumeIsolated({ $0.mayAffectOtherShards(id) }) { return .needsAsync }
            if case let .cancel(id) = commands[0], shards[s].assumeIsolated({ $0.mayAffectOtherShards(id) }) { return .needsAsync }
            var replies: [Reply] = [.done]
            guard let waitFor = runGroupInPlace(s, commands, Self.firstSlot, now: now, into: &replies) else { return .needsAsync }
            return .answered(replies, waitFor: waitFor)
        }
    }

    /// Whether shard `s` can run a group in place: no basket holds being placed there, and no backlog
    /// of overdue holds (``inPlaceOverdueMillisMax``).
    private func runsInPlace(_ s: Int, now: Int64) -> Bool {
        withGauges(s) {
            $0.preparing.load(ordering: .relaxed) == 0
                && $0.nextDeadlineMillis.load(ordering: .relaxed) > now - Self.inPlaceOverdueMillisMax
        }
    }

    /// The slots of a batch of one command (no array made per round).
    private static let firstSlot = [0]

    /// ``runGroup(_:_:_:now:into:)`` for a shard on the caller's executor, which the caller checked
    /// reaches no other shard. nil, having run nothing, when the shard waits after all: another loop's
    /// run marked effects arriving here after ``runsInPlace(_:now:)`` looked (found by review: this was
    /// a precondition, and the race stopped the server).
    private func runGroupInPlace(
        _ s: Int, _ commands: [Command], _ slots: [Int], now: Int64, into replies: inout [Reply]
    ) -> UInt64? {
        beforeRunInPlace?(s)
        let result = shards[s].assumeIsolated { $0.run(commands, slots: slots, now: now) }
        if result.deferred { return nil }
        precondition(result.effects.isEmpty, "a batch run in place reached beyond its shards")
        for (slot, reply) in result.replies { replies[slot] = reply }
        return result.lsn
    }

    /// Runs one shard's group, waiting first while basket holds are placed there, applies its effects on
    /// other shards, and returns the position its replies wait for.
    private func runGroup(
        _ s: Int, _ commands: [Command], _ slots: [Int], now: Int64, into replies: inout [Reply]
    ) async -> UInt64 {
        // A backlog of due orders goes a chunk at a time first, not all at once inside the run.
        var expiredAt: UInt64 = 0
        if shards[s].gauges.nextDeadlineMillis.load(ordering: .relaxed) <= now { expiredAt = await expire(shards[s], now: now) }
        var result = await shards[s].run(commands, slots: slots, now: now)
        while result.deferred {
            await shards[s].settled()
            result = await shards[s].run(commands, slots: slots, now: now)
        }
        for (slot, reply) in result.replies { replies[slot] = reply }
        await applyEffects(result.effects, causedAt: result.lsn)
        return max(expiredAt, result.lsn)
    }

    /// Expires, before a batch runs, the due baskets whose items lie on other shards: at `now` they are
    /// expired, and a command on another shard must see their stock back. Returns the position to wait for.
    private func expireBaskets(now: Int64) async -> UInt64 {
        var lsn: UInt64 = 0
        for shard in shards where shard.gauges.nextForeignDeadlineMillis.load(ordering: .acquiring) <= now {
            lsn = max(lsn, await expire(shard, now: now))
        }
        return lsn
    }

    /// Due orders expired per call into a shard: a shard runs on an event loop in the server, and a
    /// backlog of due holds (a restart after their deadlines, a clock step forward, a burst sharing one
    /// deadline) is expired a chunk at a time with that loop's other work in between. About a
    /// millisecond of work a chunk.
    public static let expiryChunk = 4096

    /// A user's orders an ORDERS visits between looks at the clock (a page is the oldest after a
    /// point, and a user's orders link newest to oldest, so a page walks every newer one); it goes on
    /// in one call into the shard for ``sliceNanosDefault``, so a user with millions of orders takes the
    /// shard's loop a slice at a time. (Time, not a count: a walk in order of memory costs about
    /// 4 ns an order, one that misses the cache each step 20 times that.)
    public static let ordersWalkChunk = 4096

    /// How long a call into a shard may go on with work sliced by time (an ORDERS' walk) by default.
    public static let sliceNanosDefault: UInt64 = 500_000

    /// SKUs audited per call into a shard by an AUDIT of every SKU: the audit of a store of any size
    /// takes its shards' loops a slice at a time, about a millisecond of work a slice, with their
    /// other work in between.
    public static let auditChunk = 4096

    /// Holds overdue by more than this send a batch down the general path, which expires them a chunk
    /// at a time before the batch runs, instead of all at once in place. Below it, what is due is what
    /// came due since the housekeeping timer (every 10 ms) last ran: bounded by how fast holds are
    /// placed.
    public static let inPlaceOverdueMillisMax: Int64 = 50

    /// Waits for a later turn of `shard`'s executor (``LaterTurn``), after a slice of work there that
    /// started at `busySince`.
    private func pause(_ shard: Shard, busySince: UInt64) async {
        let busy = EngineRole.monotonicNanos() &- busySince
        await laterTurn(Self.executorIndex(ofShard: shard.index, executorCount: executorCount), busy)
    }

    /// Expires everything due on `shard` at `now`, ``expiryChunk`` orders per call, pausing between
    /// calls (``LaterTurn``).
    private func expire(_ shard: Shard, now: Int64) async -> UInt64 {
        // A replica's holds expire by the primary's records, never by its own clock.
        guard !role.isReadOnly else { return 0 }
        var lsn: UInt64 = 0
        var started: UInt64?
        while true {
            if let started { await pause(shard, busySince: started) }
            started = EngineRole.monotonicNanos()
            var result = await shard.expire(now: now, limit: Self.expiryChunk)
            while result.deferred {
                await shard.settled()
                result = await shard.expire(now: now, limit: Self.expiryChunk)
            }
            await applyEffects(result.effects, causedAt: result.lsn)
            lsn = max(lsn, result.lsn)
            // Done when nothing is due any more, or when the shard refuses (its log failed).
            guard !result.refused, shard.gauges.nextDeadlineMillis.load(ordering: .relaxed) <= now else { return lsn }
        }
    }

    /// `now`, or the latest time seen when `now` is earlier.
    private func monotonic(_ now: Int64) -> Int64 {
        var seen = clockMillis.load(ordering: .relaxed)
        while now > seen {
            let (exchanged, original) = clockMillis.compareExchange(expected: seen, desired: now, ordering: .relaxed)
            if exchanged { return now }
            seen = original
        }
        return seen
    }

    /// One command, for callers that have no batch.
    public func execute(_ command: Command, now: Int64) async -> Reply {
        await execute([command], now: now)[0]
    }

    private func executeGlobal(_ command: Command, now: Int64) async -> (Reply, UInt64) {
        switch command {
        case let .reserve(user, lines, requestId, ttlMillis):
            return await reserveAcrossShards(
                user: user, lines: lines, requestId: requestId, now: now,
                deadlineMillis: now + (ttlMillis ?? Limits.ttlMillisDefault))
        case let .orders(user, after, count):
            // A page is the shards' orders in shard order, then sequence (an id's low 32 bits).
            var page: [OrderInfo] = []
            var pageBytes = 0
            var lsn: UInt64 = 0
            // Every shard is asked (with 0 wanted when the page is full or it is before `after`), so
            // a refusal (a log failure) is answered whatever the page holds.
            for (index, shard) in shards.enumerated() {
                lsn = max(lsn, await expire(shard, now: now))
                let wanted = index >= (after?.shard ?? 0) && pageBytes < Limits.pageBytesMax ? count - page.count : 0
                let afterSequence = index == after?.shard ? after!.sequence : 0
                // The walk over the user's orders takes about ``Slicing/nanos`` per call into the
                // shard (``Slicing/ordersWalkSteps`` orders at a time), with its loop's other work in
                // between.
                var walk: Shard.OrdersStep?
                while true {
                    let started = EngineRole.monotonicNanos()
                    switch await shard.orders(
                        ofUser: user, afterSequence: afterSequence, count: wanted, bytesBefore: pageBytes, walk: walk,
                        steps: slicing.ordersWalkSteps, budgetNanos: slicing.nanos)
                    {
                    case .success(let step): walk = step
                    case .failure(let rejection): return (.rejected(rejection), 0)
                    }
                    lsn = max(lsn, walk!.lsn)
                    if let orders = walk!.page {
                        page += orders
                        pageBytes += orders.reduce(0) { $0 + $1.pageBytes }
                        break
                    }
                    await pause(shard, busySince: started)
                }
            }
            return (.orders(page), lsn)
        case .audit:
            var all = AuditFindings()
            var lsn: UInt64 = 0
            for shard in shards {
                lsn = max(lsn, await expire(shard, now: now))
                // A slice per call into the shard: its loop's other work runs in between. If the
                // shard's state was replaced whole meanwhile (a replica's full copy), its audit
                // starts over on the new state.
                var mine = AuditFindings()
                var generation: UInt64?
                var next: Int? = 0
                while let from = next {
                    let started = EngineRole.monotonicNanos()
                    switch await shard.audit(from: from, limit: slicing.auditSKUs) {
                    case .success(let slice):
                        if let generation, generation != slice.generation {
                            (mine, next) = (AuditFindings(), 0)
                        } else {
                            mine.append(slice.findings)
                            next = slice.next
                        }
                        generation = slice.generation
                        lsn = max(lsn, slice.lsn)
                    case .failure(let rejection): return (.rejected(rejection), 0)
                    }
                    if next != nil { await pause(shard, busySince: started) }
                }
                all.append(contentsOf: mine)
            }
            return (.audit(all), lsn)
        default:
            preconditionFailure("\(command) is not a multi-shard command")
        }
    }

    /// All-or-nothing across shards: mark the request id on the owner (the first SKU's shard), hold
    /// each shard's lines in shard order, and either record the order on the owner or give every hold
    /// back. Holds are in memory only until the owner's single record makes the order durable; while
    /// they are, commands on their shards wait (``Shard/settled()``), so no reply shows them early.
    private func reserveAcrossShards(
        user: Name, lines: [OrderLine], requestId: Name?, now: Int64, deadlineMillis: Int64
    ) async -> (Reply, UInt64) {
        if let reason = log.failureReason { return (.rejected(.unavailable(reason)), 0) }
        guard log.admitsChanges else { return (.rejected(.busy), 0) }
        let owner = shardIndex(of: lines[0].sku)
        var byShard: [Int: [OrderLine]] = [:]
        for line in lines { byShard[shardIndex(of: line.sku), default: []].append(line) }
        // A retry that lists the basket's SKUs in another order names another first SKU, so another
        // owner: the order it retries is kept by the shard of one of its SKUs, looked up there too (a
        // client that builds a basket from a hash map lists its SKUs in another order each time). The
        // request is marked in flight on each of them until this basket is placed or refused, in shard
        // order whatever the basket's order, so of retries at once in different orders one marks them
        // all and the others meet its mark and get INFLIGHT (marked in the basket's order, each could
        // meet another's mark and all give up). An order of these lines under the id is the reply
        // wherever it is kept; else REQCONFLICT for the owner's order, or the first shard's (the same
        // id may name two orders whose SKUs lie on different shards).
        var marked: [Int] = []
        func unmark() async {
            for s in marked { await shards[s].abortRequest(user: user, requestId: requestId) }
        }
        var conflicts: [Int: Reply] = [:]
        for s in requestId == nil ? [owner] : byShard.keys.sorted() {
            switch await shards[s].beginRequest(user: user, requestId: requestId, lines: lines) {
            case nil:
                marked.append(s)
            case .rejected(.requestConflict(let id))?:
                conflicts[s] = .rejected(.requestConflict(id))
            case let reply?:
                await unmark()
                return (reply, await shards[s].visiblePosition)
            }
        }
        if let s = conflicts[owner] != nil ? owner : conflicts.keys.min() {
            await unmark()
            return (conflicts[s]!, await shards[s].visiblePosition)
        }
        // Holds due at `now` are expired first, so that the basket sees the stock they return.
        var expiredAt: UInt64 = 0
        for s in byShard.keys.sorted() where shards[s].gauges.nextDeadlineMillis.load(ordering: .relaxed) <= now {
            expiredAt = max(expiredAt, await expire(shards[s], now: now))
        }
        var held: [Int: (items: [Record.Item], internedUser: Bool, visible: UInt64)] = [:]
        func settleAll(committedAt lsn: UInt64?) async {
            for (h, prepared) in held {
                await shards[h].settle(user: user, items: prepared.items, internedUser: prepared.internedUser, committedAt: lsn)
            }
        }
        for s in byShard.keys.sorted() {
            switch await shards[s].prepareHold(user: user, lines: byShard[s]!) {
            case .success(let prepared):
                held[s] = prepared
            case .failure(let rejection):
                // The refusal shows this shard's state (a SKU missing, paused, sold out), and that the
                // shards before it could hold their lines: it waits for all of theirs.
                var shown = await shards[s].visiblePosition
                for h in held.keys { shown = max(shown, held[h]!.visible) }
                await settleAll(committedAt: nil)
                await unmark()
                return (.rejected(rejection), max(expiredAt, shown))
            }
        }
        // Items in the client's order, for the record and for display.
        var next: [Int: Int] = [:]
        var items: [Record.Item] = []
        for line in lines {
            let s = shardIndex(of: line.sku)
            items.append(held[s]!.items[next[s, default: 0]])
            next[s, default: 0] += 1
        }
        switch await shards[owner].commitOrder(
            user: user, requestId: requestId, items: items, skus: lines.map(\.sku), deadlineMillis: deadlineMillis)
        {
        case .success(let (id, lsn)):
            await settleAll(committedAt: lsn)
            await unmark()  // the owner's index holds the request id now (its own mark went with the commit)
            return (.reserved(id, deadlineMillis: deadlineMillis, replayed: false), lsn)
        case .failure(let rejection):
            await settleAll(committedAt: nil)
            await unmark()
            return (.rejected(rejection), 0)
        }
    }

    private func applyEffects(_ effects: [ShardState.ForeignEffect], causedAt lsn: UInt64) async {
        guard !effects.isEmpty else { return }
        var byShard: [Int: [ShardState.ForeignEffect]] = [:]
        for effect in effects { byShard[effect.shard, default: []].append(effect) }
        for s in byShard.keys.sorted() {
            await shards[s].apply(byShard[s]!, causedAt: lsn)
            // The run that made them marked them arriving there (``Shard``'s run): runs there go on.
            shards[s].effectsArrived()
        }
    }

    /// Expires due orders on every shard; a timer calls this so holds on idle SKUs still come back.
    public func expire(now: Int64) async {
        let now = monotonic(now)
        for shard in shards { _ = await expire(shard, now: now) }
    }

    /// Copies every shard's state. A consistent cut only while no commands run (tests, shutdown).
    public func captureState(lsn: UInt64) async -> EngineState {
        var states: [ShardState] = []
        for shard in shards { states.append(await shard.snapshotState()) }
        return EngineState(shards: states, lsn: lsn, epochs: epochs)
    }
}

/// Whether an engine takes changes (a primary) or only reads, its state moved by another's log (a
/// replica). Shared by the engine and its shards; read on every shard run, lock-free.
///
/// Every change checks it, from every event loop: its atomics are stored inline, so a check reads
/// them without retaining an atomic object of their own (a write to a cache line the loops share).
public final class EngineRole: Sendable {
    private let readOnly: Atomic<Bool>
    /// CLOCK_MONOTONIC nanoseconds after which changes are refused (a coordinator's lease: see
    /// ``setWritableUntil(_:)``); `.max`: no such bound.
    private let writableUntil = Atomic<UInt64>(.max)

    public init(readOnly: Bool = false) { self.readOnly = Atomic(readOnly) }

    /// Changes are refused with ``Rejection/readOnly`` and holds are not expired here: a replica, or
    /// a primary past the end of its lease.
    public var isReadOnly: Bool {
        if readOnly.load(ordering: .acquiring) { return true }
        let until = writableUntil.load(ordering: .acquiring)
        return until != .max && Self.monotonicNanos() > until
    }

    /// A replica (its state moved by another's log), whatever the lease says.
    public var isFollower: Bool { readOnly.load(ordering: .acquiring) }

    /// Promotes a replica (false) or makes an engine follow another's log (true).
    public func setReadOnly(_ value: Bool) { readOnly.store(value, ordering: .releasing) }

    /// Fencing: changes are taken only until `nanos` (CLOCK_MONOTONIC, ``monotonicNanos()``), the
    /// earliest moment the primary's lease could have lapsed; checked on every change, so a primary
    /// that was frozen or cut off past it refuses changes the moment it runs again. 0: none now.
    public func setWritableUntil(_ nanos: UInt64) { writableUntil.store(nanos, ordering: .releasing) }

    /// CLOCK_MONOTONIC in nanoseconds (it keeps counting while the process is stopped).
    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// A ``ChangeLog`` that keeps nothing: positions advance, everything is "durable" at once.
public final class MemoryChangeLog: ChangeLog {
    private let position = Mutex<UInt64>(0)

    public init() {}

    public func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 {
        position.withLock { lsn in
            lsn += UInt64(records.count)
            return lsn
        }
    }

    public func waitDurable(_ lsn: UInt64) async throws(Rejection) {}
    public var admitsChanges: Bool { true }
    public var failureReason: String? { nil }
}
