/// The state of an order, as ORDER names it.
public enum OrderState: String, Sendable {
    case pending = "PENDING", paid = "PAID", cancelled = "CANCELLED", expired = "EXPIRED"
}

/// What one batch of events does to the tables, as rows to insert and changes guarded per row.
/// Pure (no clock, no I/O): ``SinkSQL`` turns it into a few statements whose count does not grow
/// with the batch, and the tests compare it with a reference.
///
/// Exactly once rests on positions, twice over. A plan starts right after the stored position and
/// the transaction that applies it stores ``lastPosition``, so a restart resumes after it. And every
/// row records the position of the last event that changed it (`changed_position`, `added_position`,
/// `created_position`, the `events` key): an event at or before that position was applied to that
/// row already and is a no-op for it. So a stored position moved back by hand (the TRIMMED
/// recovery has operators write it) replays events without applying any of them twice.
public struct BatchPlan: Equatable, Sendable {
    /// A SKU added in this batch, as its `sku-added` made it; its later events are ``SkuChange``s.
    public struct SkuRow: Equatable, Sendable {
        public var sku: ID
        public var total: Int64
        public var limit: Int64
        public var addedPosition: UInt64
    }

    /// One event's change to one SKU: applied only if the SKU's row was last changed before
    /// ``position``. Counters move by the amounts (which keep `available + reserved + sold = total`).
    public struct SkuChange: Equatable, Sendable {
        public var sku: ID
        public var position: UInt64
        public var total: Int64 = 0
        public var available: Int64 = 0
        public var reserved: Int64 = 0
        public var sold: Int64 = 0
        /// A pause or resume; nil: unchanged.
        public var paused: Bool?
    }

    /// An order created in this batch, as created (PENDING); its end, if in the batch, is a ``Transition``.
    public struct OrderRow: Equatable, Sendable {
        public var id: UInt64
        public var user: ID
        public var deadlineMillis: Int64
        public var items: [SinkEvent.Item]
        public var createdPosition: UInt64
    }

    /// A PENDING order paid, cancelled or expired. Its stock moves by the items stored with it
    /// (reserved to sold, or back to available), only while the order is still PENDING.
    public struct Transition: Equatable, Sendable {
        public var order: UInt64
        public var state: OrderState
        public var position: UInt64
    }

    /// The position stored before this batch (the transaction checks it is still the stored one).
    public var previousPosition: UInt64
    /// The position of the batch's last event, stored by the same transaction.
    public var lastPosition: UInt64
    /// ``SinkEvent/fingerprint`` of the event at ``lastPosition``, stored with it: on start the sink
    /// compares it with the server's event at that position, to tell another server's log.
    public var lastFingerprint: Int64
    /// The server's term in force at ``lastPosition`` (nil: unknown), stored with it: the sink
    /// compares it with LOG.TERM there after a reconnect, which tells a log that went another way
    /// before that position even where the event at it is the same.
    public var lastTerm: LogTerm?
    public var newSkus: [SkuRow] = []
    public var skuChanges: [SkuChange] = []
    public var newOrders: [OrderRow] = []
    public var transitions: [Transition] = []
    /// The events themselves, for the `events` table (`--keep-events`); empty otherwise.
    public var events: [SinkEvent] = []

    /// Events applied by this plan.
    public var eventCount: Int { Int(lastPosition - previousPosition) }

    /// Folds `events` (one EVENTS reply, in log order) into a plan applied after `stored`. Events at
    /// or before `stored` are dropped (already applied); the rest must follow `stored` with no gap.
    /// nil when nothing is left to apply. A log no server writes (an order ending twice, a counter
    /// past 64 bits) is an error, never a trap. `termBefore`: the server's term in force just before
    /// the first of `events` (nil: unknown); the plan's ``lastTerm`` follows from it and the `epoch`
    /// events among them, those at or before `stored` included.
    public static func fold(_ events: [SinkEvent], after stored: UInt64, termBefore: LogTerm? = nil, keepEvents: Bool = false) throws(SinkError) -> BatchPlan? {
        let fresh = events.drop { $0.position <= stored }
        guard let first = fresh.first, let last = fresh.last else { return nil }
        var expected = stored + 1
        for event in fresh {
            guard event.position == expected else {
                throw SinkError(.gap, "events are not consecutive: after position \(expected - 1) the server sent position \(event.position); the sink stops rather than skip or repeat a change")
            }
            expected += 1
        }
        assert(first.position == stored + 1)
        var folder = Folder()
        for event in fresh { try folder.apply(event) }
        var plan = BatchPlan(previousPosition: stored, lastPosition: last.position, lastFingerprint: last.fingerprint)
        plan.lastTerm = LogTerm.after(events, from: termBefore)
        plan.newSkus = folder.newSkus
        plan.skuChanges = folder.skuChanges
        plan.newOrders = folder.newOrderOrder.map { folder.newOrders[$0]! }
        plan.transitions = folder.transitions
        if keepEvents { plan.events = Array(fresh) }
        return plan
    }

    /// The counters of a SKU added in this batch, known exactly, so an amount that would carry
    /// one past 64 bits is caught here with a message (the database would refuse it too, for SKUs
    /// it held before the batch: a bigint out of range).
    struct Counters {
        var total: Int64, available: Int64, reserved: Int64, sold: Int64

        mutating func apply(_ change: SkuChange) throws(SinkError) {
            func add(_ a: Int64, _ b: Int64, _ what: String) throws(SinkError) -> Int64 {
                let (sum, overflow) = a.addingReportingOverflow(b)
                guard !overflow else {
                    throw SinkError(.badEvent, "the event at position \(change.position) takes SKU \(change.sku)'s \(what) from \(a) by \(b), past what 64 bits hold: no server logs that; the sink stops rather than store a wrong count")
                }
                return sum
            }
            total = try add(total, change.total, "total")
            available = try add(available, change.available, "available")
            reserved = try add(reserved, change.reserved, "reserved")
            sold = try add(sold, change.sold, "sold")
            guard available >= 0, reserved >= 0, sold >= 0 else {
                throw SinkError(.badEvent, "the event at position \(change.position) takes SKU \(change.sku)'s counts below zero (available \(available), reserved \(reserved), sold \(sold)): no server logs that; the sink stops rather than store it")
            }
        }
    }

    /// The fold's working state, in first-seen order (so a plan is the same for the same events,
    /// and its statements too).
    private struct Folder {
        var newSkus: [SkuRow] = []
        /// SKUs added in this batch and their counters as of the event being folded.
        var added: [ID: Counters] = [:]
        /// SKUs changed in this batch (an add after a change is not a log a server writes).
        var touched: Set<ID> = []
        var skuChanges: [SkuChange] = []
        var newOrders: [UInt64: OrderRow] = [:]
        var newOrderOrder: [UInt64] = []
        var transitions: [Transition] = []
        var ended: [UInt64: UInt64] = [:]

        mutating func change(_ change: SkuChange) throws(SinkError) {
            touched.insert(change.sku)
            if var counters = added[change.sku] {
                try counters.apply(change)
                added[change.sku] = counters
            }
            skuChanges.append(change)
        }

        /// `-amount`, for amounts the decoder bounds to at least 1 (so it cannot overflow).
        func negated(_ amount: Int64, at position: UInt64) throws(SinkError) -> Int64 {
            let (value, overflow) = Int64(0).subtractingReportingOverflow(amount)
            guard !overflow else { throw SinkError(.badEvent, "the event at position \(position) has an amount of \(amount), which has no negative in 64 bits") }
            return value
        }

        mutating func apply(_ event: SinkEvent) throws(SinkError) {
            let position = event.position
            switch event.change {
            case let .skuAdded(sku, total, limit):
                guard added[sku] == nil, !touched.contains(sku) else {
                    throw SinkError(.diverged, "SKU \(sku) is added at position \(position) but was already changed earlier in the same batch")
                }
                added[sku] = Counters(total: total, available: total, reserved: 0, sold: 0)
                touched.insert(sku)
                newSkus.append(SkuRow(sku: sku, total: total, limit: limit, addedPosition: position))
            case let .restocked(sku, delta):
                try change(SkuChange(sku: sku, position: position, total: delta, available: delta))
            case let .pausedChanged(sku, paused):
                try change(SkuChange(sku: sku, position: position, paused: paused))
            case let .deducted(sku, quantity):
                try change(SkuChange(sku: sku, position: position, available: try negated(quantity, at: position), sold: quantity))
            case let .created(order, user, deadlineMillis, items):
                guard newOrders[order] == nil, ended[order] == nil else {
                    throw SinkError(.diverged, "order \(order) is created at position \(position) but was already seen earlier in the same batch")
                }
                for item in items {
                    try change(SkuChange(sku: item.sku, position: position, available: try negated(item.quantity, at: position), reserved: item.quantity))
                }
                newOrders[order] = OrderRow(id: order, user: user, deadlineMillis: deadlineMillis, items: items, createdPosition: position)
                newOrderOrder.append(order)
            case .paid(let order): try end(order, .paid, at: position)
            case .cancelled(let order): try end(order, .cancelled, at: position)
            case .expired(let order): try end(order, .expired, at: position)
            case .epoch: break  // a new primary term: nothing in the tables changes
            }
        }

        /// A PENDING order is paid, cancelled or expired. The database moves its stock by its stored
        /// items; here only the counters of SKUs added in this batch follow, for the overflow check.
        mutating func end(_ order: UInt64, _ state: OrderState, at position: UInt64) throws(SinkError) {
            if let earlier = ended[order] {
                throw SinkError(.diverged, "order \(order) changes state at position \(earlier) and again at \(position) in the same batch")
            }
            ended[order] = position
            transitions.append(Transition(order: order, state: state, position: position))
            for item in newOrders[order]?.items ?? [] where added[item.sku] != nil {
                var move = SkuChange(sku: item.sku, position: position, reserved: try negated(item.quantity, at: position))
                if state == .paid { move.sold = item.quantity } else { move.available = item.quantity }
                try added[item.sku]!.apply(move)
            }
        }
    }
}
