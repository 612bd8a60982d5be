import NIOCore

/// Parses RESP2 requests: arrays of bulk strings (what redis-cli, redis-benchmark and client
/// libraries send) and inline commands (a line of words with Redis's quoting rules, what `nc` and
/// telnet send). Incremental: it parses every complete command in a buffer and leaves a partial one
/// for the next read.
public struct RESPParser: Sendable {
    /// Bounds on what one request may make the server hold.
    public struct Limits: Sendable {
        /// An inline command line, without its line end. Redis uses 64 KiB too.
        public var inlineBytesMax = 64 * 1024
        /// One bulk string. Ids are at most 64 bytes; this leaves room for ECHO and future commands
        /// while keeping one request's memory small.
        public var bulkBytesMax = 512 * 1024
        /// Arguments of one command: a basket of 64 SKUs takes about 140.
        public var argumentsMax = 1024
        public init() {}
    }

    /// A request the stream can no longer be trusted after: the connection is answered and closed.
    public struct ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }

    public enum Outcome: Equatable, Sendable {
        /// One command's arguments (never empty).
        case command([String])
        /// More bytes are needed; nothing was consumed.
        case incomplete
    }

    public let limits: Limits

    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Parses the next command at the buffer's reader index and moves past it. Empty requests
    /// (`*0`, a blank line) are skipped. Throws ``ProtocolError`` for a request that breaks the
    /// protocol or a limit; the buffer is then left as it was.
    public func next(_ buffer: inout ByteBuffer) throws(ProtocolError) -> Outcome {
        while buffer.readableBytes > 0 {
            let start = buffer.readerIndex
            let result: Outcome?
            if buffer.getInteger(at: start, as: UInt8.self) == UInt8(ascii: "*") {
                result = try multibulk(&buffer)
            } else {
                result = try inline(&buffer)
            }
            switch result {
            case .none: continue  // an empty request was skipped
            case .some(.incomplete):
                buffer.moveReaderIndex(to: start)
                return .incomplete
            case .some(let outcome):
                return outcome
            }
        }
        return .incomplete
    }

    private enum LineEnd {
        /// Buffer index of the `\n`.
        case found(Int)
        case incomplete
        case tooLong
    }

    /// Finds the `\n` ending the line at the reader index, looking at most `limit` bytes (+ CRLF).
    private func lineEnd(_ buffer: ByteBuffer, limit: Int) -> LineEnd {
        let view = buffer.readableBytesView
        let searchEnd = view.index(view.startIndex, offsetBy: min(view.count, limit + 2))
        if let newline = view[view.startIndex..<searchEnd].firstIndex(of: UInt8(ascii: "\n")) { return .found(newline) }
        return view.count > limit + 1 ? .tooLong : .incomplete
    }

    private func readNumberLine(_ buffer: inout ByteBuffer, what: String) throws(ProtocolError) -> Int? {
        let newline: Int
        switch lineEnd(buffer, limit: 32) {
        case .incomplete: return nil
        case .tooLong: throw ProtocolError(message: "invalid \(what) length")
        case .found(let index): newline = index
        }
        guard newline > buffer.readerIndex,
              buffer.getInteger(at: newline - 1, as: UInt8.self) == UInt8(ascii: "\r")
        else { throw ProtocolError(message: "invalid \(what) length") }
        let digits = buffer.getString(at: buffer.readerIndex + 1, length: newline - 1 - (buffer.readerIndex + 1)) ?? ""
        guard let value = Int(digits) else { throw ProtocolError(message: "invalid \(what) length") }
        buffer.moveReaderIndex(to: newline + 1)
        return value
    }

    private func multibulk(_ buffer: inout ByteBuffer) throws(ProtocolError) -> Outcome? {
        guard let count = try readNumberLine(&buffer, what: "multibulk") else { return .incomplete }
        if count <= 0 { return nil }
        guard count <= limits.argumentsMax else {
            throw ProtocolError(message: "invalid multibulk length (\(count) arguments, at most \(limits.argumentsMax))")
        }
        var arguments: [String] = []
        arguments.reserveCapacity(count)
        for _ in 0..<count {
            guard buffer.readableBytes > 0 else { return .incomplete }
            guard buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == UInt8(ascii: "$") else {
                let byte = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) ?? 0
                throw ProtocolError(message: "expected '$', got '\(Character(Unicode.Scalar(byte)))'")
            }
            guard let length = try readNumberLine(&buffer, what: "bulk") else { return .incomplete }
            guard length >= 0, length <= limits.bulkBytesMax else {
                throw ProtocolError(message: "invalid bulk length (\(length) bytes, at most \(limits.bulkBytesMax))")
            }
            guard buffer.readableBytes >= length + 2 else { return .incomplete }
            guard buffer.getInteger(at: buffer.readerIndex + length, as: UInt8.self) == UInt8(ascii: "\r"),
                  buffer.getInteger(at: buffer.readerIndex + length + 1, as: UInt8.self) == UInt8(ascii: "\n")
            else { throw ProtocolError(message: "bulk string not followed by CRLF") }
            arguments.append(buffer.readString(length: length)!)
            buffer.moveReaderIndex(forwardBy: 2)
        }
        return .command(arguments)
    }

    private func inline(_ buffer: inout ByteBuffer) throws(ProtocolError) -> Outcome? {
        let newline: Int
        switch lineEnd(buffer, limit: limits.inlineBytesMax) {
        case .incomplete: return .incomplete
        case .tooLong: throw ProtocolError(message: "too big inline request (over \(limits.inlineBytesMax) bytes)")
        case .found(let index): newline = index
        }
        var end = newline
        if end > buffer.readerIndex, buffer.getInteger(at: end - 1, as: UInt8.self) == UInt8(ascii: "\r") { end -= 1 }
        let line = buffer.getBytes(at: buffer.readerIndex, length: end - buffer.readerIndex) ?? []
        buffer.moveReaderIndex(to: newline + 1)
        guard let words = Self.splitInline(line) else { throw ProtocolError(message: "unbalanced quotes in request") }
        if words.isEmpty { return nil }
        guard words.count <= limits.argumentsMax else { throw ProtocolError(message: "too many arguments in inline request") }
        return .command(words)
    }

    /// Splits an inline command like Redis's `sdssplitargs`: words separated by spaces; "double
    /// quotes" with \n \r \t \b \a \\ \" and \xHH escapes; 'single quotes' with \' only. A closing
    /// quote must be followed by a space or the end. nil for unbalanced quotes.
    public static func splitInline(_ line: [UInt8]) -> [String]? {
        var words: [String] = []
        var i = 0
        func isSpace(_ c: UInt8) -> Bool { c == 32 || c == 9 || c == 10 || c == 13 || c == 11 || c == 12 }
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: c - 48
            case 97...102: c - 87
            case 65...70: c - 55
            default: nil
            }
        }
        while true {
            while i < line.count, isSpace(line[i]) { i += 1 }
            if i >= line.count { return words }
            var current: [UInt8] = []
            var inDouble = false, inSingle = false, done = false
            while !done {
                if inDouble {
                    guard i < line.count else { return nil }
                    let c = line[i]
                    if c == UInt8(ascii: "\\"), i + 3 < line.count, line[i + 1] == UInt8(ascii: "x"),
                       let high = hex(line[i + 2]), let low = hex(line[i + 3]) {
                        current.append(high << 4 | low)
                        i += 3
                    } else if c == UInt8(ascii: "\\"), i + 1 < line.count {
                        i += 1
                        switch line[i] {
                        case UInt8(ascii: "n"): current.append(10)
                        case UInt8(ascii: "r"): current.append(13)
                        case UInt8(ascii: "t"): current.append(9)
                        case UInt8(ascii: "b"): current.append(8)
                        case UInt8(ascii: "a"): current.append(7)
                        default: current.append(line[i])
                        }
                    } else if c == UInt8(ascii: "\"") {
                        if i + 1 < line.count, !isSpace(line[i + 1]) { return nil }
                        done = true
                    } else {
                        current.append(c)
                    }
                } else if inSingle {
                    guard i < line.count else { return nil }
                    let c = line[i]
                    if c == UInt8(ascii: "\\"), i + 1 < line.count, line[i + 1] == UInt8(ascii: "'") {
                        i += 1
                        current.append(UInt8(ascii: "'"))
                    } else if c == UInt8(ascii: "'") {
                        if i + 1 < line.count, !isSpace(line[i + 1]) { return nil }
                        done = true
                    } else {
                        current.append(c)
                    }
                } else {
                    if i >= line.count { done = true; continue }
                    let c = line[i]
                    if isSpace(c) {
                        done = true
                    } else if c == UInt8(ascii: "\"") {
                        inDouble = true
                    } else if c == UInt8(ascii: "'") {
                        inSingle = true
                    } else {
                        current.append(c)
                    }
                }
                if i < line.count { i += 1 }
            }
            words.append(String(decoding: current, as: UTF8.self))
        }
    }
}
