/// A log record: one state change, as a fact. Replaying the records in log order rebuilds the state;
/// replay applies facts and never decides again. Layouts are in docs/FORMAT.md.
public enum Record: Equatable, Sendable {
    case skuAdded(shard: Int, skuIndex: UInt32, sku: Name, total: Int64, limit: Int64)
    case restocked(shard: Int, skuIndex: UInt32, delta: Int64)
    case pausedChanged(shard: Int, skuIndex: UInt32, paused: Bool)
    case deducted(shard: Int, skuIndex: UInt32, quantity: Int64)
    case orderCreated(OrderCreated)
    case orderPaid(OrderID)
    case orderCancelled(OrderID)
    case orderExpired(OrderID)
    /// A node became primary for `epoch` (see ``EpochHistory``): the first record of its term,
    /// written and made durable before it takes any change. Epochs only grow along a log.
    case epochStarted(epoch: UInt64)

    /// The facts of a new order. Items name their SKUs by (shard, index): stable, since a SKU's
    /// `skuAdded` record always precedes any order on it.
    public struct OrderCreated: Equatable, Sendable {
        public var id: OrderID
        public var deadlineMillis: Int64
        public var user: Name
        /// Empty when the client gave no request id.
        public var requestId: Name
        public var items: [Item]
    }

    public struct Item: Equatable, Sendable {
        public var shard: Int
        public var skuIndex: UInt32
        public var quantity: UInt32
    }

    /// Record kinds as stored in the first byte of each record.
    public enum Kind: UInt8, Sendable {
        case skuAdded = 1, restocked = 2, pausedChanged = 3, deducted = 4
        case orderCreated = 5, orderPaid = 6, orderCancelled = 7, orderExpired = 8
        case epochStarted = 9
    }
}

/// Appends encoded records to a growable byte buffer. Every record is
/// `[kind u8][body length u16][body]`, integers little-endian, strings as `[length u8][UTF-8]`.
public struct RecordBuffer: Sendable {
    public private(set) var bytes: [UInt8] = []
    public private(set) var count = 0

    public init(capacity: Int = 4096) { bytes.reserveCapacity(capacity) }

    public var isEmpty: Bool { count == 0 }

    public mutating func removeAll() {
        bytes.removeAll(keepingCapacity: true)
        count = 0
    }

    @inline(__always) private mutating func begin(_ kind: Record.Kind) -> Int {
        bytes.append(kind.rawValue)
        bytes.append(0)
        bytes.append(0)
        return bytes.count
    }

    @inline(__always) private mutating func end(_ bodyStart: Int) {
        let length = bytes.count - bodyStart
        precondition(length <= Int(UInt16.max), "record body over 64 KiB")
        bytes[bodyStart - 2] = UInt8(truncatingIfNeeded: length)
        bytes[bodyStart - 1] = UInt8(truncatingIfNeeded: length >> 8)
        count += 1
    }

    public mutating func skuAdded(shard: Int, skuIndex: UInt32, sku: Name, total: Int64, limit: Int64) {
        let start = begin(.skuAdded)
        bytes.appendLE(UInt16(shard)); bytes.appendLE(skuIndex); bytes.appendLE(total); bytes.appendLE(limit)
        bytes.appendName(sku)
        end(start)
    }

    public mutating func restocked(shard: Int, skuIndex: UInt32, delta: Int64) {
        let start = begin(.restocked)
        bytes.appendLE(UInt16(shard)); bytes.appendLE(skuIndex); bytes.appendLE(delta)
        end(start)
    }

    public mutating func pausedChanged(shard: Int, skuIndex: UInt32, paused: Bool) {
        let start = begin(.pausedChanged)
        bytes.appendLE(UInt16(shard)); bytes.appendLE(skuIndex); bytes.append(paused ? 1 : 0)
        end(start)
    }

    public mutating func deducted(shard: Int, skuIndex: UInt32, quantity: Int64) {
        let start = begin(.deducted)
        bytes.appendLE(UInt16(shard)); bytes.appendLE(skuIndex); bytes.appendLE(quantity)
        end(start)
    }

    /// The single-item order, written without building an items array and with one copy into the
    /// buffer (the hot path).
    public mutating func orderCreated(
        id: OrderID, deadlineMillis: Int64, user: Name, requestId: Name?,
        shard: Int, skuIndex: UInt32, quantity: UInt32
    ) {
        let requestId = requestId ?? .empty
        user.withBytes { userBytes in
            requestId.withBytes { requestBytes in
                precondition(userBytes.count <= 255 && requestBytes.count <= 255)
                let body = 8 + 8 + 1 + userBytes.count + 1 + requestBytes.count + 2 + 2 + 4 + 4
                withUnsafeTemporaryAllocation(byteCount: 3 + body, alignment: 8) { out in
                    var w = RawWriter(out)
                    w.put(Record.Kind.orderCreated.rawValue); w.put(UInt16(body))
                    w.put(id.rawValue); w.put(deadlineMillis)
                    w.put(UInt8(userBytes.count)); w.put(userBytes)
                    w.put(UInt8(requestBytes.count)); w.put(requestBytes)
                    w.put(UInt16(1)); w.put(UInt16(shard)); w.put(skuIndex); w.put(quantity)
                    assert(w.offset == 3 + body)
                    bytes.append(contentsOf: UnsafeRawBufferPointer(out))
                }
            }
        }
        count += 1
    }

    public mutating func orderCreated(_ order: Record.OrderCreated) {
        let start = begin(.orderCreated)
        bytes.appendLE(order.id.rawValue); bytes.appendLE(order.deadlineMillis)
        bytes.appendName(order.user); bytes.appendName(order.requestId)
        bytes.appendLE(UInt16(order.items.count))
        for item in order.items {
            bytes.appendLE(UInt16(item.shard)); bytes.appendLE(item.skuIndex); bytes.appendLE(item.quantity)
        }
        end(start)
    }

    public mutating func orderTransition(_ kind: Record.Kind, _ id: OrderID) {
        precondition(kind == .orderPaid || kind == .orderCancelled || kind == .orderExpired)
        withUnsafeTemporaryAllocation(byteCount: 11, alignment: 8) { out in
            var w = RawWriter(out)
            w.put(kind.rawValue); w.put(UInt16(8)); w.put(id.rawValue)
            bytes.append(contentsOf: UnsafeRawBufferPointer(out))
        }
        count += 1
    }

    public mutating func epochStarted(_ epoch: UInt64) {
        let start = begin(.epochStarted)
        bytes.appendLE(epoch)
        end(start)
    }

    public mutating func append(_ record: Record) {
        switch record {
        case let .skuAdded(shard, skuIndex, sku, total, limit):
            skuAdded(shard: shard, skuIndex: skuIndex, sku: sku, total: total, limit: limit)
        case let .restocked(shard, skuIndex, delta): restocked(shard: shard, skuIndex: skuIndex, delta: delta)
        case let .pausedChanged(shard, skuIndex, paused): pausedChanged(shard: shard, skuIndex: skuIndex, paused: paused)
        case let .deducted(shard, skuIndex, quantity): deducted(shard: shard, skuIndex: skuIndex, quantity: quantity)
        case let .orderCreated(order): orderCreated(order)
        case let .orderPaid(id): orderTransition(.orderPaid, id)
        case let .orderCancelled(id): orderTransition(.orderCancelled, id)
        case let .orderExpired(id): orderTransition(.orderExpired, id)
        case let .epochStarted(epoch): epochStarted(epoch)
        }
    }
}

/// Why a byte sequence is not a valid record stream.
public struct RecordDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Offset of the bad record within the decoded bytes.
    public var offset: Int
    public var reason: String
    public var description: String { "bad record at payload offset \(offset): \(reason)" }
}

extension Record {
    /// Decodes every record in `bytes`, calling `body` for each in order.
    public static func decodeAll(
        _ bytes: UnsafeRawBufferPointer, _ body: (Record) throws -> Void
    ) throws {
        try decode(bytes, skipping: 0, count: .max, body)
    }

    /// Decodes up to `count` records of `bytes` after the first `skipping`, calling `body` for each in
    /// order. The skipped records are stepped over by their framing (kind and length), not decoded:
    /// a read of one event from a block of baskets decodes one basket, not the block's.
    public static func decode(
        _ bytes: UnsafeRawBufferPointer, skipping: Int, count: Int, _ body: (Record) throws -> Void
    ) throws {
        var reader = ByteReader(bytes)
        var skipped = 0
        var decoded = 0
        while !reader.isAtEnd, decoded < count {
            let recordStart = reader.offset
            do {
                if skipped < skipping {
                    _ = try reader.read() as UInt8
                    _ = try reader.sub(Int(try reader.read() as UInt16))
                    skipped += 1
                    continue
                }
                let record = try decodeOne(&reader)
                decoded += 1
                try body(record)
            } catch let error as ByteReader.Underflow {
                throw RecordDecodingError(offset: recordStart, reason: error.reason)
            }
        }
    }

    static func decodeOne(_ reader: inout ByteReader) throws -> Record {
        let kindByte: UInt8 = try reader.read()
        let length = Int(try reader.read() as UInt16)
        var body = try reader.sub(length)
        guard let kind = Kind(rawValue: kindByte) else {
            throw ByteReader.Underflow(reason: "unknown record kind \(kindByte)")
        }
        let record: Record
        switch kind {
        case .skuAdded:
            let shard = Int(try body.read() as UInt16)
            let skuIndex: UInt32 = try body.read()
            let total: Int64 = try body.read()
            let limit: Int64 = try body.read()
            record = .skuAdded(shard: shard, skuIndex: skuIndex, sku: try body.readName(), total: total, limit: limit)
        case .restocked:
            record = .restocked(shard: Int(try body.read() as UInt16), skuIndex: try body.read(), delta: try body.read())
        case .pausedChanged:
            record = .pausedChanged(
                shard: Int(try body.read() as UInt16), skuIndex: try body.read(), paused: (try body.read() as UInt8) != 0)
        case .deducted:
            record = .deducted(shard: Int(try body.read() as UInt16), skuIndex: try body.read(), quantity: try body.read())
        case .orderCreated:
            let id = OrderID(rawValue: try body.read())
            let deadline: Int64 = try body.read()
            let user = try body.readName()
            let requestId = try body.readName()
            let itemCount = Int(try body.read() as UInt16)
            var items: [Item] = []
            items.reserveCapacity(itemCount)
            for _ in 0..<itemCount {
                items.append(Item(shard: Int(try body.read() as UInt16), skuIndex: try body.read(), quantity: try body.read()))
            }
            record = .orderCreated(OrderCreated(id: id, deadlineMillis: deadline, user: user, requestId: requestId, items: items))
        case .orderPaid: record = .orderPaid(OrderID(rawValue: try body.read()))
        case .orderCancelled: record = .orderCancelled(OrderID(rawValue: try body.read()))
        case .orderExpired: record = .orderExpired(OrderID(rawValue: try body.read()))
        case .epochStarted: record = .epochStarted(epoch: try body.read())
        }
        guard body.isAtEnd else { throw ByteReader.Underflow(reason: "\(body.remaining) stray bytes in \(kind) record") }
        return record
    }
}


/// Writes little-endian fields into a buffer sized in advance (a record built on the stack).
struct RawWriter {
    let base: UnsafeMutableRawBufferPointer
    private(set) var offset = 0

    init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    @inline(__always) mutating func put<T: FixedWidthInteger>(_ value: T) {
        base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
        offset += MemoryLayout<T>.size
    }

    @inline(__always) mutating func put(_ bytes: UnsafeRawBufferPointer) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        (base.baseAddress! + offset).copyMemory(from: source, byteCount: bytes.count)
        offset += bytes.count
    }
}
