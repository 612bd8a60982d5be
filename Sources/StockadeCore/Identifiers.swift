/// A 64-bit order id. The top byte is the owning shard plus one, the low 56 bits the order's sequence
/// number within that shard (starting at 1), so any thread can tell which shard owns an order from the id alone.
public struct OrderID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public init(shard: Int, sequence: UInt32) {
        precondition(shard >= 0 && shard < Limits.shardCountMax && sequence > 0)
        rawValue = (UInt64(shard + 1) << 56) | UInt64(sequence)
    }

    /// The shard that owns the order; `nil` when the id cannot be one Stockade issued.
    @inlinable public var shard: Int? {
        let top = Int(rawValue >> 56)
        return top == 0 ? nil : top - 1
    }

    /// The order's sequence number within its shard; 0 for an id that is not ours.
    @inlinable public var sequence: UInt32 {
        let low = rawValue & ((1 << 56) - 1)
        return low > UInt64(UInt32.max) ? 0 : UInt32(low)
    }

    /// Parses a decimal order id as clients send it back.
    public init?(_ text: String) {
        guard let value = UInt64(text) else { return nil }
        rawValue = value
    }

    public var description: String { String(rawValue) }
    public static func < (a: OrderID, b: OrderID) -> Bool { a.rawValue < b.rawValue }
}

/// Where an order stands. PENDING moves once, to one of the three final states.
public enum OrderState: UInt8, Sendable, CustomStringConvertible {
    case pending = 1, paid = 2, cancelled = 3, expired = 4

    public var description: String {
        switch self {
        case .pending: "PENDING"
        case .paid: "PAID"
        case .cancelled: "CANCELLED"
        case .expired: "EXPIRED"
        }
    }
}

/// One line of an order as a client states it.
public struct OrderLine: Hashable, Sendable {
    public var sku: Name
    public var quantity: Int64
    public init(sku: Name, quantity: Int64) {
        self.sku = sku
        self.quantity = quantity
    }
}

/// An order as clients see it.
public struct OrderInfo: Equatable, Sendable {
    public var id: OrderID
    public var user: Name
    public var lines: [OrderLine]
    public var state: OrderState
    public var deadlineMillis: Int64

    public init(id: OrderID, user: Name, lines: [OrderLine], state: OrderState, deadlineMillis: Int64) {
        self.id = id
        self.user = user
        self.lines = lines
        self.state = state
        self.deadlineMillis = deadlineMillis
    }
}

/// A SKU's numbers as clients see them. Always `available + reserved + sold == total`.
public struct SkuInfo: Equatable, Sendable {
    public var sku: Name
    public var total: Int64
    public var available: Int64
    public var reserved: Int64
    public var sold: Int64
    /// Per-user limit on PENDING + PAID units; 0 means none.
    public var limit: Int64
    public var paused: Bool

    public init(sku: Name, total: Int64, available: Int64, reserved: Int64, sold: Int64, limit: Int64, paused: Bool) {
        self.sku = sku
        self.total = total
        self.available = available
        self.reserved = reserved
        self.sold = sold
        self.limit = limit
        self.paused = paused
    }
}

/// The result of checking one SKU's invariant.
public struct AuditFinding: Equatable, Sendable {
    public var sku: Name
    public var ok: Bool
    /// Empty when ``ok``; otherwise what does not add up.
    public var problem: String

    public init(sku: Name, ok: Bool, problem: String) {
        self.sku = sku
        self.ok = ok
        self.problem = problem
    }
}
