import NIOCore

/// A RESP2/RESP3 reply as a client sees it (the benchmark harness's client).
public indirect enum RESPReply: Equatable, Sendable {
    case simple(String)
    case error(String)
    case integer(Int64)
    case bulk(String?)
    /// A bulk string as its bytes, from a parser with ``RESPReplyParser/bulkAsBytes`` set: ids are
    /// byte strings, and a `String` would replace what is not UTF-8.
    case bytes([UInt8])
    case array([RESPReply]?)

    /// The text of a simple or bulk string (bytes that are not UTF-8 come out replaced).
    public var string: String? {
        switch self {
        case .simple(let s): s
        case .bulk(let s): s
        case .bytes(let b): String(decoding: b, as: UTF8.self)
        default: nil
        }
    }

    /// The first word of an error reply (the code a client branches on).
    public var errorCode: String? {
        if case .error(let message) = self { return String(message.prefix { $0 != " " }) }
        return nil
    }
}

/// Tells, a read at a time, whether a whole reply has arrived, without parsing it: it remembers how far
/// it got (the bytes scanned, the elements still owed at each nesting level), so a large reply that
/// comes in many reads is scanned once, and ``RESPReplyParser`` then parses it once. Parsing a
/// partial reply again at every read cost time quadratic in its size. Nesting is bounded.
public struct RESPReplyScanner: Sendable {
    /// Deeper nesting than any reply of ours (EVENTS entries are two levels) is a broken stream.
    public static let depthMax = 32
    public var lineBytesMax = 64 * 1024
    public var bulkBytesMax = 64 << 20
    public var elementsMax = 1 << 20
    /// Bytes of one whole reply. Each bulk, array and level is bounded above, but not their sum: a
    /// stream of 64 MiB bulks in a huge array grew a reader's buffer until its reply timeout (3 GB
    /// in 15 s). The largest reply a client of this package reads is an EVENTS page of the sink's
    /// largest batch (10,000 baskets of 64 lines of 64-byte ids: about 60 MB), well under this.
    public var replyBytesMax = 256 << 20
    /// Bytes after the reader index already scanned.
    private var scanned = 0
    /// Elements still owed by each open array, innermost last.
    private var owed: [Int] = []

    public init() {}

    /// Whether a whole reply starts at the reader index. Call ``reset()`` once it was taken out.
    public mutating func complete(_ buffer: ByteBuffer) throws(RESPReplyParser.ParseError) -> Bool {
        while true {
            let start = buffer.readerIndex + scanned
            guard let type = buffer.getInteger(at: start, as: UInt8.self) else { return false }
            // The header line: find its end within the bound.
            let available = buffer.writerIndex - start
            guard let view = buffer.getSlice(at: start, length: min(available, lineBytesMax + 2))?.readableBytesView,
                  let newline = view.firstIndex(of: UInt8(ascii: "\n"))
            else {
                if available > lineBytesMax + 1 { throw .init(message: "reply line too long") }
                return false
            }
            let lineEnd = newline - view.startIndex + 1  // bytes of the header line with its \n
            let text = buffer.getString(at: start + 1, length: max(0, lineEnd - 3)) ?? ""
            var consumed = lineEnd
            var opens = 0
            switch type {
            case UInt8(ascii: "$"):
                guard let length = Int(text), length >= -1, length <= bulkBytesMax else { throw .init(message: "bad bulk length") }
                if length >= 0 {
                    guard scanned + lineEnd + length + 2 <= replyBytesMax else { throw Self.tooLarge(replyBytesMax) }
                    guard available >= lineEnd + length + 2 else { return false }  // rescanned from this header next time
                    consumed += length + 2
                }
            case UInt8(ascii: "*"), UInt8(ascii: "%"), UInt8(ascii: "~"), UInt8(ascii: ">"):
                guard let count = Int(text), count >= -1, count <= elementsMax else { throw .init(message: "bad array length") }
                opens = count <= 0 ? 0 : (type == UInt8(ascii: "%") ? count * 2 : count)
            default:
                break
            }
            scanned += consumed
            guard scanned <= replyBytesMax else { throw Self.tooLarge(replyBytesMax) }
            if opens > 0 {
                guard owed.count < Self.depthMax else { throw .init(message: "replies nested deeper than \(Self.depthMax)") }
                owed.append(opens)
                continue
            }
            // One element done: it settles what it completes.
            while let last = owed.last {
                if last > 1 {
                    owed[owed.count - 1] = last - 1
                    break
                }
                owed.removeLast()
            }
            if owed.isEmpty { return true }
        }
    }

    private static func tooLarge(_ bound: Int) -> RESPReplyParser.ParseError {
        .init(message: "reply larger than \(bound) bytes")
    }

    /// Forgets the reply scanned (after the caller took it out of the buffer).
    public mutating func reset() {
        scanned = 0
        owed.removeAll(keepingCapacity: true)
    }
}

/// Parses replies incrementally; leaves a partial reply in the buffer.
public struct RESPReplyParser: Sendable {
    /// A reply line longer than this, or a bulk or array larger, is a broken stream.
    public var lineBytesMax = 64 * 1024
    public var bulkBytesMax = 64 << 20
    public var elementsMax = 1 << 20
    /// Bulk strings come back as ``RESPReply/bytes(_:)`` (a null bulk stays `.bulk(nil)`).
    public var bulkAsBytes = false

    public init(bulkAsBytes: Bool = false) { self.bulkAsBytes = bulkAsBytes }

    public struct ParseError: Error, Equatable, Sendable {
        public var message: String
    }

    /// The next complete reply, or nil when more bytes are needed (nothing consumed).
    public func next(_ buffer: inout ByteBuffer) throws(ParseError) -> RESPReply? {
        let start = buffer.readerIndex
        guard let reply = try parse(&buffer) else {
            buffer.moveReaderIndex(to: start)
            return nil
        }
        return reply
    }

    private func line(_ buffer: inout ByteBuffer) throws(ParseError) -> String? {
        let view = buffer.readableBytesView
        let limit = view.index(view.startIndex, offsetBy: min(view.count, lineBytesMax + 2))
        guard let newline = view[view.startIndex..<limit].firstIndex(of: UInt8(ascii: "\n")) else {
            if view.count > lineBytesMax + 1 { throw ParseError(message: "reply line too long") }
            return nil
        }
        guard newline > buffer.readerIndex, buffer.getInteger(at: newline - 1, as: UInt8.self) == UInt8(ascii: "\r") else {
            throw ParseError(message: "reply line not ended by CRLF")
        }
        let text = buffer.getString(at: buffer.readerIndex, length: newline - 1 - buffer.readerIndex) ?? ""
        buffer.moveReaderIndex(to: newline + 1)
        return text
    }

    private func parse(_ buffer: inout ByteBuffer) throws(ParseError) -> RESPReply? {
        guard let type: UInt8 = buffer.readInteger() else { return nil }
        guard let text = try line(&buffer) else { return nil }
        switch type {
        case UInt8(ascii: "+"): return .simple(text)
        case UInt8(ascii: "-"): return .error(text)
        case UInt8(ascii: ":"):
            guard let value = Int64(text) else { throw ParseError(message: "bad integer reply '\(text)'") }
            return .integer(value)
        case UInt8(ascii: "$"):
            guard let length = Int(text), length >= -1, length <= bulkBytesMax else { throw ParseError(message: "bad bulk length '\(text)'") }
            if length == -1 { return .bulk(nil) }
            guard buffer.readableBytes >= length + 2 else { return nil }
            if bulkAsBytes {
                let value = buffer.readBytes(length: length) ?? []
                buffer.moveReaderIndex(forwardBy: 2)
                return .bytes(value)
            }
            let value = buffer.readString(length: length)
            buffer.moveReaderIndex(forwardBy: 2)
            return .bulk(value)
        case UInt8(ascii: "*"), UInt8(ascii: "%"), UInt8(ascii: "~"), UInt8(ascii: ">"):
            guard let count = Int(text), count >= -1, count <= elementsMax else { throw ParseError(message: "bad array length '\(text)'") }
            if count == -1 { return .array(nil) }
            let elements = type == UInt8(ascii: "%") ? count * 2 : count
            var items: [RESPReply] = []
            items.reserveCapacity(min(elements, 4096))  // a length is a claim, not yet bytes
            for _ in 0..<elements {
                guard let item = try parse(&buffer) else { return nil }
                items.append(item)
            }
            return .array(items)
        case UInt8(ascii: "_"): return .bulk(nil)
        case UInt8(ascii: "#"): return .integer(text == "t" ? 1 : 0)
        case UInt8(ascii: ","): return .bulk(text)
        default:
            throw ParseError(message: "unknown reply type '\(Character(Unicode.Scalar(type)))'")
        }
    }
}
