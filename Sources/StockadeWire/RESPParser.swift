import NIOCore

/// Parses RESP2 requests: arrays of bulk strings (what redis-cli, redis-benchmark and client
/// libraries send) and inline commands (a line of words with Redis's quoting rules, what `nc` and
/// telnet send).
///
/// Arguments are bytes (spans of the read buffer, ``Arguments``), never `String`: ids are
/// binary-safe, and no Unicode work is ever done on what a client sends. Incremental and resumable:
/// a request that arrives in parts is taken in where the last read stopped (its complete arguments
/// are kept by the parser), so the cost of a request is linear in its bytes however it is split.
/// One parser per connection.
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
        /// One whole request (every header, argument and line end). Our largest real command, a
        /// 64-SKU basket of 64-byte ids, is under 10 KiB; 4 MiB leaves room for ECHO of a full bulk
        /// and stops `*1024` of 512 KiB arguments (512 MiB) from being buffered for one request.
        public var requestBytesMax = 4 << 20
        /// The server checks its flags' values against `ServerConfiguration.Range` before it uses them.
        public init() {}
    }

    /// A request the stream can no longer be trusted after: the connection is answered and closed.
    public struct ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }

    /// Where one argument lies in ``Arguments/bytes``: its first byte's index and its length.
    public struct Span: Equatable, Sendable {
        public var start: Int
        public var count: Int
    }

    /// One command's arguments (never empty): spans of one buffer.
    ///
    /// A command whose request came in one read is spans of that read's buffer, which this value
    /// shares (one reference for the whole command, where a `ByteBuffer` slice per argument would take
    /// one each: a retain and a release per argument on the hot path). The parser reuses the spans'
    /// array once the caller has dropped the value. Values a caller keeps stay as they were, whatever
    /// it parses or writes next (the buffer and the array are copied on write), and keep the whole
    /// read buffer alive: a caller copies out what it keeps (as `CommandTable` does) and drops the
    /// value before its next read.
    public struct Arguments: RandomAccessCollection, Equatable, Sendable {
        /// The bytes the spans index; its reader index is at or before the first span.
        public let bytes: ByteBuffer
        public let spans: [Span]

        init(bytes: ByteBuffer, spans: [Span]) {
            self.bytes = bytes
            self.spans = spans
        }

        /// The given arguments, copied into one buffer (for tests and callers off the hot path).
        public init(_ arguments: [ByteBuffer]) {
            var bytes = ByteBuffer()
            var spans: [Span] = []
            for var argument in arguments {
                spans.append(Span(start: bytes.writerIndex, count: argument.readableBytes))
                bytes.writeBuffer(&argument)
            }
            self.init(bytes: bytes, spans: spans)
        }

        public var startIndex: Int { 0 }
        public var endIndex: Int { spans.count }

        /// Argument `position` as a slice of ``bytes`` (which takes a reference to them: the hot
        /// path reads arguments through ``withUnsafeArguments(_:)`` instead).
        public subscript(position: Int) -> ByteBuffer {
            bytes.getSlice(at: spans[position].start, length: spans[position].count)!
        }

        /// Calls `body` with the arguments as raw bytes, valid only inside it: no copy, no reference taken.
        @inlinable
        public func withUnsafeArguments<R>(_ body: (UnsafeArguments) throws -> R) rethrows -> R {
            try bytes.withUnsafeReadableBytes { readable in
                try spans.withUnsafeBufferPointer { spans in
                    try body(UnsafeArguments(readable: readable, origin: bytes.readerIndex, spans: spans))
                }
            }
        }

        /// Equal when the arguments' bytes are.
        public static func == (a: Arguments, b: Arguments) -> Bool {
            a.count == b.count && zip(a, b).allSatisfy { $0.readableBytesView.elementsEqual($1.readableBytesView) }
        }
    }

    /// One command's arguments as raw bytes, valid only inside ``Arguments/withUnsafeArguments(_:)``.
    public struct UnsafeArguments: RandomAccessCollection {
        @usableFromInline let readable: UnsafeRawBufferPointer
        /// The buffer index of `readable`'s first byte.
        @usableFromInline let origin: Int
        @usableFromInline let spans: UnsafeBufferPointer<Span>

        @inlinable
        init(readable: UnsafeRawBufferPointer, origin: Int, spans: UnsafeBufferPointer<Span>) {
            self.readable = readable
            self.origin = origin
            self.spans = spans
        }

        @inlinable public var startIndex: Int { 0 }
        @inlinable public var endIndex: Int { spans.count }

        @inlinable
        public subscript(position: Int) -> UnsafeRawBufferPointer {
            let span = spans[position]
            return UnsafeRawBufferPointer(rebasing: readable[(span.start - origin)..<(span.start - origin + span.count)])
        }
    }

    public enum Outcome: Equatable, Sendable {
        /// One command's arguments (never empty), as bytes.
        case command(Arguments)
        /// More bytes are needed. What was complete has been taken in (the buffer's reader index
        /// moved past it); the parser continues from there on the next call.
        case incomplete
    }

    public let limits: Limits

    /// Where the parser stands inside a request that has not arrived whole.
    private enum State: Sendable {
        /// Between requests.
        case idle
        /// Inside a multibulk of `count` arguments; the next thing is a `$length` line.
        case header(count: Int)
        /// Inside a multibulk; the `$length` line of the next argument was read, its bytes were not.
        case body(count: Int, length: Int)
        /// Inside an inline line: `scanned` bytes after the reader index hold no `\n`.
        case inline(scanned: Int)
    }

    private var state = State.idle
    /// Bytes of the current request taken in so far (headers, arguments, line ends).
    private var requestBytes = 0
    /// Arguments of the current request taken in by earlier calls, copied here so the caller's
    /// buffer can be reused; ``heldEnds`` marks where each ends.
    private var held = ByteBuffer()
    private var heldEnds: [Int] = []
    /// Arguments of the current request taken in by this call: spans of the caller's buffer.
    private var fresh: [Span] = []
    /// ``fresh`` was handed out whole as the last command: it is emptied when the next call starts,
    /// by when the caller has dropped its copy, so the array's storage is reused, not reallocated
    /// (emptying it while the caller still holds it would copy it: an allocation per command).
    private var freshHandedOut = false
    /// The spans of the last request read whole by ``next(_:_:)``, first in the array (the rest are
    /// left from earlier requests: ``wholeRequest(_:origin:limits:into:)`` overwrites in place).
    private var scratchSpans: [Span] = []
    /// Spans ``scratchSpans`` keeps room for between requests (a 64-SKU BUY takes about 140).
    static let spansKeptMax = 256
    /// ``next(_:_:)`` reads whole requests in one pass (off: through ``next(_:)`` only, for tests that
    /// compare the two).
    var wholeRequests = true
    /// Requests ``next(_:_:)`` read whole in one pass (for tests: that they exercise it).
    private(set) var wholeRequestsRead = 0

    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Whether a request was started and not finished (bytes are held for it).
    public var inRequest: Bool {
        if case .idle = state { return false }
        return true
    }

    /// Bytes of memory the parser holds for the request it has begun (its arguments taken in by
    /// earlier reads, copied out of the caller's buffer); 0 between requests.
    public var heldBytes: Int { held.capacity }

    /// Parses the next command from the buffer's reader index and moves past it. Empty requests
    /// (`*0`, a blank line) are skipped. Throws ``ProtocolError`` for a request that breaks the
    /// protocol or a limit; the parser then forgets the request (the connection is closed anyway).
    public mutating func next(_ buffer: inout ByteBuffer) throws(ProtocolError) -> Outcome {
        reclaimHandedOut()
        do throws(ProtocolError) {
            while true {
                switch state {
                case .idle:
                    guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return .incomplete }
                    requestBytes = 0
                    if first == UInt8(ascii: "*") {
                        guard let count = try readNumberLine(&buffer, what: "multibulk") else { return .incomplete }
                        if count <= 0 { continue }  // an empty request: skipped, as Redis does
                        guard count <= limits.argumentsMax else {
                            throw ProtocolError(message: "invalid multibulk length (\(count) arguments, at most \(limits.argumentsMax))")
                        }
                        state = .header(count: count)
                    } else {
                        state = .inline(scanned: 0)
                    }
                case .header(let count):
                    guard let marker = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return suspend(&buffer) }
                    guard marker == UInt8(ascii: "$") else {
                        throw ProtocolError(message: "expected '$', got '\(Self.shown(marker))'")
                    }
                    guard let length = try readNumberLine(&buffer, what: "bulk") else { return suspend(&buffer) }
                    guard length >= 0, length <= limits.bulkBytesMax else {
                        throw ProtocolError(message: "invalid bulk length (\(length) bytes, at most \(limits.bulkBytesMax))")
                    }
                    try charge(length + 2)
                    state = .body(count: count, length: length)
                case .body(let count, let length):
                    guard buffer.readableBytes >= length + 2 else { return suspend(&buffer) }
                    guard buffer.getInteger(at: buffer.readerIndex + length, as: UInt8.self) == UInt8(ascii: "\r"),
                          buffer.getInteger(at: buffer.readerIndex + length + 1, as: UInt8.self) == UInt8(ascii: "\n")
                    else { throw ProtocolError(message: "bulk string not followed by CRLF") }
                    fresh.append(Span(start: buffer.readerIndex, count: length))
                    buffer.moveReaderIndex(forwardBy: length + 2)
                    if heldEnds.count + fresh.count < count {
                        state = .header(count: count)
                        continue
                    }
                    return .command(finishRequest(buffer))
                case .inline(let scanned):
                    guard let words = try inline(&buffer, scanned: scanned) else { return .incomplete }
                    state = .idle
                    if words.isEmpty { continue }
                    return .command(words)
                }
            }
        } catch {
            reset()
            throw error
        }
    }

    /// Parses the next command as ``next(_:)`` does and calls `body` with its arguments as raw bytes,
    /// valid only inside it; false when more bytes are needed (`body` is not called).
    ///
    /// A multibulk request that lies whole and well-formed in `buffer` (nearly every request of a
    /// pipeline) is read in one pass over the bytes, its spans into a reused array, with no
    /// ``Arguments`` value: no reference taken, no state stepped through. Anything else (a partial
    /// request, an inline command, an empty or malformed one, a limit passed) goes to ``next(_:)`` from
    /// the same place, untouched: both ways take the same bytes, give the same arguments and throw the
    /// same errors (`RESPParserWholeRequestTests`). Not generic: a generic function of another module
    /// would look its type metadata up at run time on every call.
    public mutating func next(
        _ buffer: inout ByteBuffer, _ body: (UnsafeArguments) -> Void
    ) throws(ProtocolError) -> Bool {
        reclaimHandedOut()
        if case .idle = state, wholeRequests {
            let origin = buffer.readerIndex
            let taken = buffer.withUnsafeReadableBytes { raw -> Int in
                guard let (taken, count) = Self.wholeRequest(raw, origin: origin, limits: limits, into: &scratchSpans) else { return 0 }
                scratchSpans.withUnsafeBufferPointer {
                    body(UnsafeArguments(readable: raw, origin: origin, spans: UnsafeBufferPointer(rebasing: $0[..<count])))
                }
                return taken
            }
            // A request of many arguments leaves no large array behind on an idle connection.
            if scratchSpans.capacity > Self.spansKeptMax { scratchSpans = [] }
            if taken > 0 {
                buffer.moveReaderIndex(forwardBy: taken)
                wholeRequestsRead &+= 1
                return true
            }
        }
        guard case .command(let arguments) = try next(&buffer) else { return false }
        arguments.withUnsafeArguments(body)
        return true
    }

    /// The multibulk request at the start of `raw` (whose first byte is at buffer index `origin`),
    /// when it is there whole and within `limits`: the bytes it takes and its argument count, its
    /// spans in `spans[0..<count]` (entries past them are left from earlier requests: the array is
    /// overwritten in place, not emptied). nil for anything else, which ``next(_:)``
    /// then reads (a partial request, an empty one, a malformed one, one over a limit, a number line
    /// the one pass does not take: see ``digitsLine(_:end:at:)``).
    static func wholeRequest(
        _ raw: UnsafeRawBufferPointer, origin: Int, limits: Limits, into spans: inout [Span]
    ) -> (taken: Int, count: Int)? {
        guard raw.count >= 4, let base = raw.baseAddress, base.load(as: UInt8.self) == UInt8(ascii: "*") else { return nil }
        let end = raw.count
        var offset = 1
        guard let count = digitsLine(base, end: end, at: &offset), count > 0, count <= limits.argumentsMax else { return nil }
        var argument = 0
        while argument < count {
            guard offset < end, base.load(fromByteOffset: offset, as: UInt8.self) == UInt8(ascii: "$") else { return nil }
            offset += 1
            guard let length = digitsLine(base, end: end, at: &offset), length <= limits.bulkBytesMax else { return nil }
            let start = offset
            offset = start + length + 2
            guard offset <= end, offset <= limits.requestBytesMax,
                  base.load(fromByteOffset: offset - 2, as: UInt8.self) == UInt8(ascii: "\r"),
                  base.load(fromByteOffset: offset - 1, as: UInt8.self) == UInt8(ascii: "\n")
            else { return nil }
            let span = Span(start: origin + start, count: length)
            if argument < spans.count { spans[argument] = span } else { spans.append(span) }
            argument += 1
        }
        return (offset, count)
    }

    /// Reads `digits\r\n` at `offset` (just after a `*` or `$`) in one pass: its value, with `offset`
    /// moved past the line. nil for anything else: no digit, a sign, more than 18 digits, a line end
    /// missing or not yet arrived (the state machine then reads the line, and takes or refuses it).
    @inline(__always)
    private static func digitsLine(_ base: UnsafeRawPointer, end: Int, at offset: inout Int) -> Int? {
        var i = offset
        var value = 0
        while i < end {
            let digit = Int(base.load(fromByteOffset: i, as: UInt8.self)) &- 48
            guard digit >= 0 && digit <= 9 else { break }
            value = value &* 10 &+ digit
            i += 1
        }
        // A leading zero (`$04`) is not a length (``decimal(_:)``): the reader the one-pass one falls
        // back to refuses it, whatever the reads it came in.
        guard i > offset, i - offset <= 18, i + 1 < end, i - offset == 1 || base.load(fromByteOffset: offset, as: UInt8.self) != UInt8(ascii: "0"),
              base.load(fromByteOffset: i, as: UInt8.self) == UInt8(ascii: "\r"),
              base.load(fromByteOffset: i + 1, as: UInt8.self) == UInt8(ascii: "\n")
        else { return nil }
        offset = i + 2
        return value
    }

    /// Empties ``fresh`` if it was handed out whole as the last command: by the next call the caller
    /// has dropped it, so its storage is reused in place (see ``freshHandedOut``).
    private mutating func reclaimHandedOut() {
        guard freshHandedOut else { return }
        fresh.removeAll(keepingCapacity: true)
        freshHandedOut = false
    }

    /// Adds `bytes` to the current request; past ``Limits/requestBytesMax`` the request is refused
    /// before its bytes are waited for.
    private mutating func charge(_ bytes: Int) throws(ProtocolError) {
        requestBytes += bytes
        guard requestBytes <= limits.requestBytesMax else {
            throw ProtocolError(message: "request too big (over \(limits.requestBytesMax) bytes)")
        }
    }

    /// The arguments of the request just completed, whose last bytes were in `buffer`; the parser
    /// is then between requests.
    private mutating func finishRequest(_ buffer: ByteBuffer) -> Arguments {
        if heldEnds.isEmpty {
            // The common case: the whole request came in one read. No copy: the spans index the
            // caller's buffer (a copy of it whose reader index is the first argument's), and the
            // array is emptied on the next call (see ``freshHandedOut``).
            var bytes = buffer
            bytes.moveReaderIndex(to: fresh[0].start)
            state = .idle
            freshHandedOut = true
            return Arguments(bytes: bytes, spans: fresh)
        }
        // Begun in an earlier read: the rest joins the held bytes, and the spans index those.
        hold(buffer)
        var spans: [Span] = []
        spans.reserveCapacity(heldEnds.count)
        var start = held.readerIndex
        for end in heldEnds {
            spans.append(Span(start: start, count: end - start))
            start = end
        }
        let arguments = Arguments(bytes: held, spans: spans)
        held = ByteBuffer()
        heldEnds.removeAll()
        state = .idle
        return arguments
    }

    /// Copies this call's arguments (spans of `buffer`) into ``held``.
    private mutating func hold(_ buffer: ByteBuffer) {
        guard let first = fresh.first else { return }
        var buffer = buffer
        buffer.moveReaderIndex(to: first.start)  // back over the spans (a copy of the caller's indices)
        for span in fresh {
            var argument = buffer.getSlice(at: span.start, length: span.count)!
            held.writeBuffer(&argument)
            heldEnds.append(held.writerIndex)
        }
        fresh.removeAll(keepingCapacity: true)
    }

    /// Keeps the arguments this call took in (copying them out of the caller's buffer, which the
    /// caller will reuse) and asks for more bytes.
    private mutating func suspend(_ buffer: inout ByteBuffer) -> Outcome {
        hold(buffer)
        return .incomplete
    }

    private mutating func reset() {
        state = .idle
        freshHandedOut = false
        requestBytes = 0
        held = ByteBuffer()
        heldEnds.removeAll()
        fresh.removeAll()
    }

    /// Reads `<marker><decimal>\r\n` at the reader index (the marker is `*` or `$`); nil when the
    /// line is not complete yet (nothing consumed). At most 32 bytes are looked at.
    private mutating func readNumberLine(_ buffer: inout ByteBuffer, what: String) throws(ProtocolError) -> Int? {
        switch buffer.withUnsafeReadableBytes(Self.numberLine) {
        case .incomplete:
            return nil
        case .invalid:
            throw ProtocolError(message: "invalid \(what) length")
        case .value(let value, let lineBytes):
            try charge(lineBytes)
            buffer.moveReaderIndex(forwardBy: lineBytes)
            return value
        }
    }

    /// What a `<marker><decimal>\r\n` line at the start of some bytes holds.
    private enum NumberLine {
        case incomplete
        case invalid
        /// The number, and the line's length with its CRLF.
        case value(Int, lineBytes: Int)
    }

    /// Reads a number line over raw bytes: one pass over at most 34 of them, no collection indexing
    /// (this runs twice or more per command).
    private static func numberLine(_ raw: UnsafeRawBufferPointer) -> NumberLine {
        let lineBytesMax = 32
        let searchEnd = min(raw.count, lineBytesMax + 2)
        var newline = 0
        while newline < searchEnd && raw[newline] != UInt8(ascii: "\n") { newline += 1 }
        guard newline < searchEnd else { return raw.count > lineBytesMax + 1 ? .invalid : .incomplete }
        let digitsEnd = newline - 1  // before the \r
        guard digitsEnd > 1, raw[digitsEnd] == UInt8(ascii: "\r"),
              let value = decimal(UnsafeRawBufferPointer(rebasing: raw[1..<digitsEnd]))
        else { return .invalid }
        return .value(value, lineBytes: newline + 1)
    }

    /// A decimal integer as Redis reads one (`string2ll`): an optional `-`, then `0` alone or digits
    /// without a leading zero (so `+1`, `01` and `-0` are not numbers: one number, one spelling);
    /// nil if it is not one or overflows Int64.
    public static func decimal(_ bytes: UnsafeRawBufferPointer) -> Int? {
        guard !bytes.isEmpty, bytes.count <= 32 else { return nil }
        var i = 0
        var negative = false
        if bytes[0] == UInt8(ascii: "-") {
            negative = true
            i = 1
            guard bytes.count > 1 else { return nil }
        }
        if bytes[i] == UInt8(ascii: "0") && (negative || bytes.count > i + 1) { return nil }
        var value = 0
        while i < bytes.count {
            let digit = Int(bytes[i]) - 48
            guard digit >= 0 && digit <= 9 else { return nil }
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (next, o2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
            guard !o1 && !o2 else { return nil }
            value = next
            i += 1
        }
        return value
    }

    /// An inline line: its words, or nil when its `\n` has not arrived (the bytes searched so far
    /// are remembered, so a long line sent in small reads is searched once).
    private mutating func inline(_ buffer: inout ByteBuffer, scanned: Int) throws(ProtocolError) -> Arguments? {
        let view = buffer.readableBytesView
        let limit = limits.inlineBytesMax + 2  // the line and its CRLF
        let searchEnd = view.index(view.startIndex, offsetBy: min(view.count, limit))
        let searchStart = view.index(view.startIndex, offsetBy: min(scanned, view.count))
        guard let newline = view[searchStart..<searchEnd].firstIndex(of: UInt8(ascii: "\n")) else {
            if view.count > limits.inlineBytesMax + 1 {
                throw ProtocolError(message: "too big inline request (over \(limits.inlineBytesMax) bytes)")
            }
            state = .inline(scanned: view.count)
            return nil
        }
        var end = newline
        if end > buffer.readerIndex, buffer.getInteger(at: end - 1, as: UInt8.self) == UInt8(ascii: "\r") { end -= 1 }
        let line = buffer.getBytes(at: buffer.readerIndex, length: end - buffer.readerIndex) ?? []
        buffer.moveReaderIndex(to: newline + 1)
        guard let words = Self.splitInline(line) else { throw ProtocolError(message: "unbalanced quotes in request") }
        guard words.count <= limits.argumentsMax else { throw ProtocolError(message: "too many arguments in inline request") }
        return Arguments(words.map { ByteBuffer(bytes: $0) })
    }

    /// A byte for an error message: printable ASCII as is, anything else as `\xHH`.
    static func shown(_ byte: UInt8) -> String {
        if byte >= 0x20 && byte < 0x7F { return String(UnicodeScalar(byte)) }
        return "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
    }

    /// Splits an inline command like Redis's `sdssplitargs`: words separated by spaces; "double
    /// quotes" with \n \r \t \b \a \\ \" and \xHH escapes; 'single quotes' with \' only. A closing
    /// quote must be followed by a space or the end. nil for unbalanced quotes. Linear in the line.
    public static func splitInline(_ line: [UInt8]) -> [[UInt8]]? {
        var words: [[UInt8]] = []
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
            words.append(current)
        }
    }
}
