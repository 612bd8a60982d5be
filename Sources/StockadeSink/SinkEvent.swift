import StockadeWire

/// An id as Stockade keeps it: 1 to 64 bytes, compared byte for byte (never as a `String`, which
/// would call `caf\u{E9}` and `cafe\u{301}` the same and replace bytes that are not UTF-8).
public struct ID: Hashable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public init(stringLiteral value: String) { bytes = Array(value.utf8) }

    /// The id as text for the `sku`/`user_id` columns: nil when it is not UTF-8 or holds a NUL byte
    /// (PostgreSQL text can hold neither); the `_bytes` column has it exactly either way.
    public var text: String? {
        guard !bytes.contains(0) else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }

    public var description: String { text ?? bytes.map { String($0, radix: 16) }.joined(separator: " ") }
}

/// A primary term of the server's log, as LOG.TERM names it: its epoch and the position of its
/// `epoch` event; ``noEpoch`` (0, 0) before any term. One primary writes each epoch, so two logs with
/// the same term at a position hold the same events up to it: the sink stores the term of its last
/// position and compares it with the server's after a reconnect (docs/OPERATIONS.md).
public struct LogTerm: Equatable, Sendable, CustomStringConvertible {
    public var epoch: UInt64
    public var start: UInt64

    public init(epoch: UInt64, start: UInt64) {
        self.epoch = epoch
        self.start = start
    }

    public static let noEpoch = LogTerm(epoch: 0, start: 0)

    /// The term in force after `events` (in log order) when `before` was in force before them
    /// (nil: unknown, until an `epoch` event among them says).
    public static func after(_ events: some BidirectionalCollection<SinkEvent>, from before: LogTerm?) -> LogTerm? {
        for event in events.reversed() {
            if case .epoch(let epoch) = event.change { return LogTerm(epoch: epoch, start: event.position) }
        }
        return before
    }

    public var description: String { epoch == 0 ? "no epoch" : "epoch \(epoch) (begun at position \(start))" }
}

/// One EVENTS entry: a change at a position of the server's log (docs/PROTOCOL.md, "Events").
public struct SinkEvent: Equatable, Sendable {
    /// Positions are consecutive from 1.
    public var position: UInt64
    public var change: Change

    public init(position: UInt64, change: Change) {
        self.position = position
        self.change = change
    }

    /// What changed.
    public enum Change: Equatable, Sendable {
        case skuAdded(sku: ID, total: Int64, limit: Int64)
        case restocked(sku: ID, delta: Int64)
        case pausedChanged(sku: ID, paused: Bool)
        case deducted(sku: ID, quantity: Int64)
        case created(order: UInt64, user: ID, deadlineMillis: Int64, items: [Item])
        case paid(order: UInt64)
        case cancelled(order: UInt64)
        case expired(order: UInt64)
        /// A node became primary for this term (docs/REPLICATION.md): no stock or order changed.
        case epoch(UInt64)
    }

    /// One SKU of an order and its quantity.
    public struct Item: Equatable, Sendable {
        public var sku: ID
        public var quantity: Int64

        public init(sku: ID, quantity: Int64) {
            self.sku = sku
            self.quantity = quantity
        }
    }

    /// The event type as EVENTS names it (and the `events` table stores it).
    public var type: String {
        switch change {
        case .skuAdded: "sku-added"
        case .restocked: "restocked"
        case .pausedChanged(_, let paused): paused ? "paused" : "resumed"
        case .deducted: "deducted"
        case .created: "created"
        case .paid: "paid"
        case .cancelled: "cancelled"
        case .expired: "expired"
        case .epoch: "epoch"
        }
    }

    /// Decodes a RESP2 entry, `[pos, type, fields...]`, read with bulk strings as bytes
    /// (``RESPReplyParser/bulkAsBytes``); text bulks are accepted too.
    public static func decode(_ reply: RESPReply) throws(SinkError) -> SinkEvent {
        guard case .array(let fields?) = reply, fields.count >= 3 else { throw bad(reply, "not an array of at least 3") }
        guard case .integer(let rawPosition) = fields[0], rawPosition >= 1 else { throw bad(reply, "no position") }
        guard let type = text(fields[1]) else { throw bad(reply, "no type") }
        let position = UInt64(rawPosition)
        func id(_ i: Int) throws(SinkError) -> ID {
            guard i < fields.count, let value = bytes(fields[i]), !value.isEmpty else { throw bad(reply, "field \(i) is not an id") }
            return ID(value)
        }
        func integer(_ i: Int) throws(SinkError) -> Int64 {
            guard i < fields.count, case .integer(let value) = fields[i] else { throw bad(reply, "field \(i) is not an integer") }
            return value
        }
        func order(_ i: Int) throws(SinkError) -> UInt64 {
            guard i < fields.count, let digits = text(fields[i]), let value = UInt64(digits) else { throw bad(reply, "field \(i) is not an order id") }
            return value
        }
        func count(_ expected: Int) throws(SinkError) {
            guard fields.count == expected else { throw bad(reply, "\(fields.count) fields, expected \(expected) for \(type)") }
        }
        let change: Change
        switch type {
        case "sku-added":
            try count(5)
            let total = try integer(3), limit = try integer(4)
            guard total >= 0, limit >= 0 else { throw bad(reply, "a negative total or limit") }
            change = .skuAdded(sku: try id(2), total: total, limit: limit)
        case "restocked":
            try count(4)
            change = .restocked(sku: try id(2), delta: try integer(3))
        case "paused", "resumed":
            try count(3)
            change = .pausedChanged(sku: try id(2), paused: type == "paused")
        case "deducted":
            try count(4)
            let quantity = try integer(3)
            guard quantity >= 1 else { throw bad(reply, "a quantity below 1") }
            change = .deducted(sku: try id(2), quantity: quantity)
        case "created":
            try count(6)
            guard case .array(let pairs?) = fields[5], pairs.count % 2 == 0, !pairs.isEmpty else { throw bad(reply, "no items") }
            var items: [Item] = []
            items.reserveCapacity(pairs.count / 2)
            for i in stride(from: 0, to: pairs.count, by: 2) {
                guard let sku = bytes(pairs[i]), !sku.isEmpty, case .integer(let quantity) = pairs[i + 1], quantity >= 1 else {
                    throw bad(reply, "item \(i / 2) is not an id and a quantity")
                }
                items.append(Item(sku: ID(sku), quantity: quantity))
            }
            // The server refuses a basket that lists a SKU twice; one would be an order_items row twice.
            guard Set(items.map(\.sku)).count == items.count else { throw bad(reply, "a SKU listed twice") }
            // The `deadline` column is a timestamptz made from it: a deadline past year 9999 (no TTL
            // gives one) would stop every batch with a PostgreSQL range error instead of this message.
            let deadlineMillis = try integer(4)
            guard (0...Self.deadlineMillisMax).contains(deadlineMillis) else { throw bad(reply, "a deadline before 1970 or past year 9999") }
            change = .created(order: try order(2), user: try id(3), deadlineMillis: deadlineMillis, items: items)
        case "paid":
            try count(3)
            change = .paid(order: try order(2))
        case "cancelled":
            try count(3)
            change = .cancelled(order: try order(2))
        case "expired":
            try count(3)
            change = .expired(order: try order(2))
        case "epoch":
            try count(3)
            let epoch = try integer(2)
            guard epoch >= 1 else { throw bad(reply, "epoch \(epoch) below 1") }
            change = .epoch(UInt64(epoch))
        default:
            throw bad(reply, "unknown type '\(type)' (is this sink older than the server?)")
        }
        return SinkEvent(position: position, change: change)
    }

    /// The last millisecond of year 9999, UTC.
    static let deadlineMillisMax: Int64 = 253_402_300_799_999

    /// A 64-bit hash (FNV-1a) of the event's position, type and every field, length-prefixed: what
    /// the sink stores with the last position it applied, to tell on start whether the server's log
    /// is the one the database followed. Not a defence against a forger (a server can send any
    /// events); two different events collide with a chance of about 1 in 2^64.
    public var fingerprint: Int64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        func byte(_ b: UInt8) { hash = (hash ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        func word(_ value: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { byte(UInt8(truncatingIfNeeded: value >> UInt64(shift))) } }
        func int(_ value: Int64) { word(UInt64(bitPattern: value)) }
        func field(_ bytes: [UInt8]) { word(UInt64(bytes.count)); bytes.forEach(byte) }
        word(position)
        field(Array(type.utf8))
        switch change {
        case let .skuAdded(sku, total, limit): field(sku.bytes); int(total); int(limit)
        case let .restocked(sku, delta): field(sku.bytes); int(delta)
        case let .pausedChanged(sku, _): field(sku.bytes)
        case let .deducted(sku, quantity): field(sku.bytes); int(quantity)
        case let .created(order, user, deadlineMillis, items):
            word(order); field(user.bytes); int(deadlineMillis); word(UInt64(items.count))
            for item in items { field(item.sku.bytes); int(item.quantity) }
        case .paid(let order), .cancelled(let order), .expired(let order): word(order)
        case .epoch(let epoch): word(epoch)
        }
        return Int64(bitPattern: hash)
    }

    private static func bytes(_ reply: RESPReply) -> [UInt8]? {
        switch reply {
        case .bytes(let value): value
        case .bulk(let text?), .simple(let text): Array(text.utf8)
        default: nil
        }
    }

    private static func text(_ reply: RESPReply) -> String? {
        bytes(reply).flatMap { String(validating: $0, as: UTF8.self) }
    }

    private static func bad(_ reply: RESPReply, _ why: String) -> SinkError {
        SinkError(.badEvent, "EVENTS returned an entry the sink cannot read (\(why)): \(String(describing: reply).prefix(200))")
    }
}
