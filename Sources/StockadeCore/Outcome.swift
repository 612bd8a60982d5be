/// Why the engine declined a request. Every case is a defined business outcome that changes nothing
/// and is not logged; a client can branch on it.
public enum Rejection: Error, Equatable, Sendable {
    /// Available stock is 0.
    case soldOut
    /// Some stock is left, but less than asked for.
    case insufficient(available: Int64)
    /// The user already holds or bought `bought` units of a SKU limited to `limit` per user.
    case limitReached(bought: Int64, limit: Int64)
    case noSuchSku
    case paused
    /// Quantity is zero, negative or above ``Limits/quantityMax``.
    case badQuantity
    /// An argument is malformed; the message says which and why.
    case badArgument(String)
    case skuExists
    /// A restock would take total below reserved + sold (`committed`).
    case belowCommitted(committed: Int64)
    case noSuchOrder
    /// The order's payment deadline passed; its stock has been returned.
    case expired
    /// The order already reached another final state (confirm of a cancelled order, cancel of a paid one).
    case wrongState(OrderState)
    /// The same request id is being placed right now on another connection; retry to get its order.
    case requestInFlight
    /// The request id was used before, for this user, with other SKUs or quantities (the order it names):
    /// a request id stands for one request, as with Stripe's idempotency keys.
    case requestConflict(OrderID)
    /// The journal cannot take more work right now; retry later.
    case busy
    /// The engine stopped accepting changes (a log write or fsync failed); the message says why.
    case unavailable(String)
    /// This engine is a replica: its state changes only by the primary's log.
    case readOnly
    /// Semi-synchronous replication: the change is durable here, but only `acknowledged` of the
    /// `wanted` replicas had it durably in time, so a failover may lose it.
    case notReplicated(acknowledged: Int, wanted: Int)
    /// Semi-synchronous replication: the change is durable here, and replicas acknowledged it, but
    /// only after this node stopped taking changes (its lease lapsed, or it stepped down): a newer
    /// primary may have been chosen without it, so a failover may lose it.
    case replicatedTooLate(wanted: Int)
}

/// A reply from the engine to one ``Command``.
public enum Reply: Equatable, Sendable {
    /// The change was applied (SKU added, paused, resumed).
    case done
    case stock(SkuInfo)
    /// A hold was placed, or, with `replayed`, an earlier one with the same request id was found.
    case reserved(OrderID, deadlineMillis: Int64, replayed: Bool)
    /// The order is now (or already was) in this state.
    case orderState(OrderID, OrderState)
    case order(OrderInfo)
    case orders([OrderInfo])
    /// The Redis stock script's answer: 1 deducted, 0 not enough stock (or paused), -1 no such SKU.
    case deducted(Int)
    case audit(AuditFindings)
    case rejected(Rejection)
}

/// A request to the engine. Commands on one SKU are applied in the order they are given.
public enum Command: Sendable, Equatable {
    case addSku(sku: Name, total: Int64, limit: Int64)
    case restock(sku: Name, delta: Int64)
    case setPaused(sku: Name, paused: Bool)
    case stock(sku: Name)
    case audit(sku: Name?)
    /// Reserve one or more lines, all or nothing. `ttlMillis` nil means ``Limits/ttlMillisDefault``.
    case reserve(user: Name, lines: [OrderLine], requestId: Name?, ttlMillis: Int64?)
    case confirm(OrderID)
    case cancel(OrderID)
    case order(OrderID)
    /// A page of a user's orders by order id: up to `count` orders with ids after `after` (nil: from the first).
    case orders(user: Name, after: OrderID?, count: Int)
    case deduct(sku: Name, quantity: Int64)

    /// Whether the command can change state (and so must be refused while the journal is overloaded).
    public var isChange: Bool {
        switch self {
        case .stock, .audit, .order, .orders: false
        default: true
        }
    }
}
