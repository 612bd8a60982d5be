/// A 64-bit order id: the top byte is the owning shard plus one, the next 24 bits the tag of the
/// primary term the order was placed in (``tag(ofEpoch:)``; 0 on a node that never had a term), the low
/// 32 bits the order's sequence within its shard (starting at 1). Any thread can tell which shard owns
/// an order from the id alone. The tag keeps ids unique across a failover: a promoted replica that
/// never received the old primary's last orders gives their sequences to new orders under its own
/// term's tag, so an id the old primary issued names no order there rather than another user's.
public struct OrderID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64

    /// The largest tag: tags take 24 bits.
    public static let tagMax: UInt32 = 0xFF_FFFF

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public init(shard: Int, tag: UInt32 = 0, sequence: UInt32) {
        precondition(shard >= 0 && shard < Limits.shardCountMax && tag <= Self.tagMax && sequence > 0)
        rawValue = (UInt64(shard + 1) << 56) | UInt64(tag) << 32 | UInt64(sequence)
    }

    /// The tag of the ids of orders placed in the term of `epoch`: 1 ... ``tagMax``, or 0 for no term
    /// (epoch 0). Two terms' tags are equal only when their epochs are equal modulo 2^24 - 1: a chance
    /// of 1 in 16.7 million for the random epochs of ``EpochHistory/next(after:using:)``, and for an
    /// etcd coordinator's epochs (revisions) only when 16.7 million revisions separate the terms.
    @inlinable public static func tag(ofEpoch epoch: UInt64) -> UInt32 {
        epoch == 0 ? 0 : UInt32(epoch % UInt64(tagMax)) + 1
    }

    /// The shard that owns the order; `nil` when the id cannot be one Stockade issued.
    @inlinable public var shard: Int? {
        let top = Int(rawValue >> 56)
        return top == 0 ? nil : top - 1
    }

    /// The tag of the term the order was placed in (see ``tag(ofEpoch:)``).
    @inlinable public var tag: UInt32 { UInt32(truncatingIfNeeded: rawValue >> 32) & Self.tagMax }

    /// The order's sequence number within its shard; 0 for an id that is not ours.
    @inlinable public var sequence: UInt32 { UInt32(truncatingIfNeeded: rawValue) }

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

    /// Whether two orders' lines hold the same SKUs with the same quantities, in whatever order they
    /// are listed (a basket's SKUs are each listed once): what a retried request id is checked by.
    public static func sameItems(_ a: [OrderLine], _ b: [OrderLine]) -> Bool {
        guard a.count == b.count else { return false }
        if a.count == 1 || a == b { return a == b }
        return a.sorted { $0.sku < $1.sku } == b.sorted { $0.sku < $1.sku }
    }
}

/// An order as clients see it.
public struct OrderInfo: Equatable, Sendable {
    /// About the bytes of this order's reply in a page of ORDERS (``Limits/pageBytesMax``), a little
    /// more than its RESP2 array takes: an order joins a page while the page's orders before it
    /// count less than that.
    public var pageBytes: Int { 144 + user.count + lines.reduce(0) { $0 + $1.sku.count + 16 } }

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

/// The findings of an AUDIT in the slices they were gathered in (at most ``Engine/auditChunk`` SKUs
/// of one shard each): the audit of a million SKUs is never one array that grows by copying itself
/// or is let go of at once, and its reply is encoded and released a slice at a time.
public struct AuditFindings: Sequence, Equatable, Sendable {
    /// Non-empty slices, in SKU order within each shard, shards in order.
    public private(set) var slices: [[AuditFinding]] = []
    /// Findings in all slices.
    public private(set) var count = 0

    public init(_ findings: [AuditFinding] = []) { append(findings) }

    public var isEmpty: Bool { count == 0 }

    /// Adds a slice after the others (nothing if it is empty).
    public mutating func append(_ slice: [AuditFinding]) {
        guard !slice.isEmpty else { return }
        slices.append(slice)
        count += slice.count
    }

    /// Adds another's slices after these.
    public mutating func append(contentsOf other: AuditFindings) {
        slices += other.slices
        count += other.count
    }

    /// Takes the first slice out, nil when none is left.
    public mutating func popFirstSlice() -> [AuditFinding]? {
        guard !slices.isEmpty else { return nil }
        let slice = slices.removeFirst()
        count -= slice.count
        return slice
    }

    public func makeIterator() -> FlattenSequence<[[AuditFinding]]>.Iterator { slices.joined().makeIterator() }

    /// The same findings in the same order, however they are sliced.
    public static func == (lhs: AuditFindings, rhs: AuditFindings) -> Bool {
        lhs.count == rhs.count && lhs.elementsEqual(rhs)
    }
}
