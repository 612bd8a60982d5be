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
}

/// One shard: the only writer of its SKUs and orders. Work arrives in batches (one actor hop per
/// batch, not per command), and no method awaits while it changes state.
public actor Shard {
    public nonisolated let index: Int
    private(set) var state: ShardState
    /// SKU id -> counter, for lock-free reads from any thread.
    public nonisolated let directory: SkuDirectory
    private let log: any ChangeLog
    private var scratch = RecordBuffer()
    /// Position of the last record this shard appended. Replies wait for it to be durable, reads
    /// included, so no client is shown a change that a crash could still take back.
    private var lastAppendedLSN: UInt64 = 0
    /// Set once an append failed: from then on every change is refused with this reason.
    private var failure: String?

    public init(state: ShardState, log: any ChangeLog) {
        index = state.shard
        self.state = state
        self.log = log
        directory = SkuDirectory()
        directory.publish(state.counters)
    }

    /// What a batch did: a reply per command (by its position in the caller's list), effects on other
    /// shards' SKUs to apply, and the log position the replies must wait for.
    public struct BatchResult: Sendable {
        public var replies: [(slot: Int, reply: Reply)] = []
        public var effects: [ShardState.ForeignEffect] = []
        public var lsn: UInt64 = 0
    }

    /// Runs a batch of commands that all belong to this shard, in order. Orders due at `now` expire first.
    public func run(_ batch: [(slot: Int, command: Command)], now: Int64) -> BatchResult {
        scratch.removeAll()
        var result = BatchResult()
        result.replies.reserveCapacity(batch.count)
        result.effects = state.expireDue(now: now, log: &scratch)
        let admits = log.admitsChanges
        var added: [(String, StockCounter)] = []
        for (slot, command) in batch {
            if command.isChange {
                if let failure {
                    result.replies.append((slot, .rejected(.unavailable(failure))))
                    continue
                }
                if !admits {
                    result.replies.append((slot, .rejected(.busy)))
                    continue
                }
            }
            let reply: Reply
            switch command {
            case let .addSku(sku, total, limit):
                reply = state.addSku(sku, total: total, limit: limit, log: &scratch)
                if reply == .done, let counter = state.counter(sku) { added.append((sku, counter)) }
            case let .restock(sku, delta): reply = state.restock(sku, delta: delta, log: &scratch)
            case let .setPaused(sku, paused): reply = state.setPaused(sku, paused: paused, log: &scratch)
            case let .stock(sku): reply = state.stock(sku).map(Reply.stock) ?? .rejected(.noSuchSku)
            case let .audit(sku): reply = state.audit(sku).map(Reply.audit) ?? .rejected(.noSuchSku)
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
            case let .orders(user, _, count): reply = .orders(state.orders(ofUser: user, afterSequence: 0, count: count))
            case let .deduct(sku, quantity): reply = state.deduct(sku, quantity: quantity, log: &scratch)
            }
            result.replies.append((slot, reply))
        }
        if !added.isEmpty { directory.publish(added) }
        if !flush() {
            for i in result.replies.indices where batch[i].command.isChange {
                result.replies[i].reply = .rejected(.unavailable(failure ?? "journal failed"))
            }
        }
        result.lsn = lastAppendedLSN
        return result
    }

    /// Appends what the scratch buffer holds. false when the log refused it: the shard then stops
    /// accepting changes, since its memory is ahead of what can be made durable.
    private func flush() -> Bool {
        guard !scratch.isEmpty else { return true }
        do {
            lastAppendedLSN = try log.append(scratch)
            return true
        } catch {
            if case .unavailable(let reason) = error { failure = reason } else { failure = "journal refused a write: \(error)" }
            return false
        }
    }

    /// Expires due orders (the engine's timer calls this for shards that see no traffic).
    public func expire(now: Int64) -> BatchResult { run([], now: now) }

    /// Applies effects of other shards' orders on this shard's SKUs.
    public func apply(_ effects: [ShardState.ForeignEffect]) {
        for effect in effects { state.apply(effect) }
    }

    // MARK: Multi-shard orders

    public func beginRequest(user: String, requestId: String?) -> Reply? {
        if let failure { return .rejected(.unavailable(failure)) }
        return state.beginRequest(user: user, requestId: requestId)
    }

    public func abortRequest(user: String, requestId: String?) {
        state.abortRequest(user: user, requestId: requestId)
    }

    public func prepareHold(user: String, lines: [OrderLine]) -> Result<[Record.Item], Rejection> {
        if let failure { return .failure(.unavailable(failure)) }
        return state.prepareHold(user: user, lines: lines)
    }

    public func releasePrepared(user: String, items: [Record.Item]) {
        state.releasePrepared(user: user, items: items)
    }

    /// Records the order and returns its id and the log position to wait for.
    public func commitOrder(
        user: String, requestId: String?, items: [Record.Item], skus: [String], deadlineMillis: Int64
    ) -> Result<(OrderID, UInt64), Rejection> {
        scratch.removeAll()
        let id = state.commitOrder(
            user: user, requestId: requestId, items: items, skus: skus, deadlineMillis: deadlineMillis, log: &scratch)
        guard flush() else { return .failure(.unavailable(failure ?? "journal failed")) }
        return .success((id, lastAppendedLSN))
    }

    // MARK: Reads for the engine and tests

    public func orders(ofUser user: String) -> [OrderInfo] { state.orders(ofUser: user) }
    /// A page of ``ShardState/orders(ofUser:afterSequence:count:)``.
    public func orders(ofUser user: String, afterSequence: UInt32, count: Int) -> [OrderInfo] {
        state.orders(ofUser: user, afterSequence: afterSequence, count: count)
    }
    public func audit() -> [AuditFinding] { state.audit(nil) ?? [] }
    public func snapshotState() -> ShardState { state }
    /// The position a reply must wait for to show only durable state (see ``lastAppendedLSN``).
    public var lastAppendedPosition: UInt64 { lastAppendedLSN }
}
