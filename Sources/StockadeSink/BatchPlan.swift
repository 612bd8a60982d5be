/// The state of an order, as ORDER names it.
public enum OrderState: String, Sendable {
    case pending = "PENDING", paid = "PAID", cancelled = "CANCELLED", expired = "EXPIRED"
}

/// What one batch of events does to the tables, folded in memory: new rows whole, and for rows that
/// existed before the batch the net change. Pure (no clock, no I/O): ``SinkSQL`` turns it into a few
/// statements whose count does not grow with the batch, and the tests compare it with a reference.
///
/// Exactly once rests on positions: a plan starts right after the stored position and the
/// transaction that applies it stores ``lastPosition``; events at or before the stored position were
/// applied already and are left out, so replaying them changes nothing.
public struct BatchPlan: Equatable, Sendable {
    /// A SKU first seen in this batch, as it stands at its end.
    public struct SkuRow: Equatable, Sendable {
        public var sku: ID
        public var total: Int64
        public var available: Int64
        public var reserved: Int64
        public var sold: Int64
        public var limit: Int64
        public var paused: Bool
        public var addedPosition: UInt64
        public var changedPosition: UInt64
    }

    /// The net change of a SKU that existed before this batch (its order transitions' share apart:
    /// those are worked out by the database from the stored items, see ``transitions``).
    public struct SkuDelta: Equatable, Sendable {
        public var sku: ID
        public var total: Int64 = 0
        public var available: Int64 = 0
        public var reserved: Int64 = 0
        public var sold: Int64 = 0
        /// The last pause or resume of the batch; nil: unchanged.
        public var paused: Bool?
        public var changedPosition: UInt64
    }

    /// An order created in this batch, in its state at the end of the batch.
    public struct OrderRow: Equatable, Sendable {
        public var id: UInt64
        public var user: ID
        public var deadlineMillis: Int64
        public var items: [SinkEvent.Item]
        public var state: OrderState
        public var createdPosition: UInt64
        public var changedPosition: UInt64
    }

    /// A PENDING order created before this batch that is paid, cancelled or expired in it. Its
    /// stock moves by the items stored with it (reserved to sold, or back to available).
    public struct Transition: Equatable, Sendable {
        public var order: UInt64
        public var state: OrderState
        public var position: UInt64
    }

    /// The position stored before this batch (the transaction checks it is still the stored one).
    public var previousPosition: UInt64
    /// The position of the batch's last event, stored by the same transaction.
    public var lastPosition: UInt64
    public var newSkus: [SkuRow] = []
    public var skuDeltas: [SkuDelta] = []
    public var newOrders: [OrderRow] = []
    public var transitions: [Transition] = []
    /// The events themselves, for the `events` table (`--keep-events`); empty otherwise.
    public var events: [SinkEvent] = []

    /// Events applied by this plan.
    public var eventCount: Int { Int(lastPosition - previousPosition) }

    /// Folds `events` (one EVENTS reply, in log order) into a plan applied after `stored`. Events at
    /// or before `stored` are dropped (already applied); the rest must follow `stored` with no gap.
    /// nil when nothing is left to apply.
    public static func fold(_ events: [SinkEvent], after stored: UInt64, keepEvents: Bool = false) throws(SinkError) -> BatchPlan? {
        let fresh = events.drop { $0.position <= stored }
        guard let first = fresh.first else { return nil }
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
        var plan = BatchPlan(previousPosition: stored, lastPosition: expected - 1)
        plan.newSkus = folder.newSkuOrder.map { folder.newSkus[$0]! }
        plan.skuDeltas = folder.deltaOrder.map { folder.deltas[$0]! }
        plan.newOrders = folder.newOrderOrder.map { folder.newOrders[$0]! }
        plan.transitions = folder.transitions
        if keepEvents { plan.events = Array(fresh) }
        for row in plan.newSkus {
            assert(row.available + row.reserved + row.sold == row.total, "a fold keeps every SKU's sum")
        }
        return plan
    }

    /// The fold's working state: rows by key, and keys in first-seen order (so a plan is the same
    /// for the same events, and its statements too).
    private struct Folder {
        var newSkus: [ID: SkuRow] = [:]
        var newSkuOrder: [ID] = []
        var deltas: [ID: SkuDelta] = [:]
        var deltaOrder: [ID] = []
        var newOrders: [UInt64: OrderRow] = [:]
        var newOrderOrder: [UInt64] = []
        var transitions: [Transition] = []
        var transitioned: [UInt64: UInt64] = [:]

        /// Applies a change to a SKU: to its new row if it was added in this batch, else to its delta.
        mutating func touch(_ sku: ID, at position: UInt64, _ change: (inout Int64, inout Int64, inout Int64, inout Int64, inout Bool?) -> Void) {
            if var row = newSkus[sku] {
                var paused: Bool? = row.paused
                change(&row.total, &row.available, &row.reserved, &row.sold, &paused)
                row.paused = paused ?? row.paused
                row.changedPosition = position
                newSkus[sku] = row
                return
            }
            var delta = deltas[sku] ?? {
                deltaOrder.append(sku)
                return SkuDelta(sku: sku, changedPosition: position)
            }()
            change(&delta.total, &delta.available, &delta.reserved, &delta.sold, &delta.paused)
            delta.changedPosition = position
            deltas[sku] = delta
        }

        mutating func apply(_ event: SinkEvent) throws(SinkError) {
            let position = event.position
            switch event.change {
            case let .skuAdded(sku, total, limit):
                guard newSkus[sku] == nil, deltas[sku] == nil else {
                    throw SinkError(.diverged, "SKU \(sku) is added at position \(position) but was already changed earlier in the same batch")
                }
                newSkus[sku] = SkuRow(sku: sku, total: total, available: total, reserved: 0, sold: 0, limit: limit,
                                      paused: false, addedPosition: position, changedPosition: position)
                newSkuOrder.append(sku)
            case let .restocked(sku, delta):
                touch(sku, at: position) { total, available, _, _, _ in total += delta; available += delta }
            case let .pausedChanged(sku, paused):
                touch(sku, at: position) { _, _, _, _, p in p = paused }
            case let .deducted(sku, quantity):
                touch(sku, at: position) { _, available, _, sold, _ in available -= quantity; sold += quantity }
            case let .created(order, user, deadlineMillis, items):
                guard newOrders[order] == nil, transitioned[order] == nil else {
                    throw SinkError(.diverged, "order \(order) is created at position \(position) but was already seen earlier in the same batch")
                }
                for item in items {
                    touch(item.sku, at: position) { _, available, reserved, _, _ in available -= item.quantity; reserved += item.quantity }
                }
                newOrders[order] = OrderRow(id: order, user: user, deadlineMillis: deadlineMillis, items: items, state: .pending,
                                            createdPosition: position, changedPosition: position)
                newOrderOrder.append(order)
            case .paid(let order): try end(order, .paid, at: position)
            case .cancelled(let order): try end(order, .cancelled, at: position)
            case .expired(let order): try end(order, .expired, at: position)
            }
        }

        /// A PENDING order is paid, cancelled or expired: its hold becomes sold or goes back.
        mutating func end(_ order: UInt64, _ state: OrderState, at position: UInt64) throws(SinkError) {
            if var row = newOrders[order] {
                guard row.state == .pending else {
                    throw SinkError(.diverged, "order \(order) becomes \(state.rawValue) at position \(position) but is already \(row.state.rawValue) (since position \(row.changedPosition))")
                }
                row.state = state
                row.changedPosition = position
                newOrders[order] = row
                for item in row.items {
                    touch(item.sku, at: position) { _, available, reserved, sold, _ in
                        reserved -= item.quantity
                        if state == .paid { sold += item.quantity } else { available += item.quantity }
                    }
                }
                return
            }
            if let earlier = transitioned[order] {
                throw SinkError(.diverged, "order \(order) changes state at position \(earlier) and again at \(position) in the same batch")
            }
            transitioned[order] = position
            transitions.append(Transition(order: order, state: state, position: position))
        }
    }
}
