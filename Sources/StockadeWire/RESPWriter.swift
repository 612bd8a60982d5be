import NIOCore

/// Writes RESP2 replies into a `ByteBuffer`: all replies of one read go into one buffer and one flush.
///
/// Each line is one write into the buffer (built on the stack, or copied in under one capacity
/// check): every `ByteBuffer` write checks uniqueness and capacity, and the small replies of a
/// pipelined round (`:0`, an order id, `-SOLDOUT`) are most of what a round writes.
extension ByteBuffer {
    /// `+text\r\n`. CR and LF in the text become spaces (they would end the line early).
    public mutating func writeRESPSimple(_ text: String) {
        writeRESPLine(UInt8(ascii: "+"), text)
    }

    /// `-text\r\n`: the first word is the error code clients branch on. CR and LF become spaces.
    public mutating func writeRESPError(_ text: String) {
        writeRESPLine(UInt8(ascii: "-"), text)
    }

    /// `:value\r\n`.
    public mutating func writeRESPInteger(_ value: Int64) {
        var line = ReplyLine()
        line.prependCRLF()
        line.prependDecimal(value)
        line.prepend(UInt8(ascii: ":"))
        line.write(into: &self)
    }

    /// The decimal digits of `value` (with a leading `-` when negative), written in place: no String.
    public mutating func writeDecimal(_ value: Int64) {
        var line = ReplyLine()
        line.prependDecimal(value)
        line.write(into: &self)
    }

    /// `value`'s decimal digits as a bulk string (how order ids travel), written in place: no String.
    public mutating func writeRESPBulkDecimal(_ value: UInt64) {
        var line = ReplyLine()
        line.prependCRLF()
        line.prependDigits(value)
        let digits = line.count - 2
        line.prependCRLF()
        line.prependDigits(UInt64(digits))
        line.prepend(UInt8(ascii: "$"))
        line.write(into: &self)
    }

    /// `+PONG\r\n`, the reply to the most frequent command of a health check or a benchmark.
    public mutating func writeRESPPong() {
        let pong: StaticString = "+PONG\r\n"
        writeRawBytes(UnsafeRawBufferPointer(start: pong.utf8Start, count: pong.utf8CodeUnitCount))
    }

    /// Appends `bytes` through ``ByteBuffer/writeWithUnsafeMutableBytes(minimumWritableBytes:_:)``,
    /// which is specialized into this module: `writeBytes` and `writeStaticString` call NIOCore's own
    /// copy of its byte setter, whose run-time exclusivity check (a thread-local access set) cost
    /// about 1% of a PING's samples, for each reply.
    @inlinable
    mutating func writeRawBytes(_ bytes: UnsafeRawBufferPointer) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: bytes.count) { out in
            if let base = bytes.baseAddress { out.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
            return bytes.count
        }
    }

    /// `$length\r\nbytes\r\n`, or the null bulk `$-1\r\n` for nil.
    public mutating func writeRESPBulk(_ text: String?) {
        guard var text else {
            writeStaticString("$-1\r\n")
            return
        }
        text.withUTF8 { writeRESPBulk(bytes: UnsafeRawBufferPointer($0)) }
    }

    /// `$length\r\nbytes\r\n` of raw bytes: ids and echoed arguments go back exactly as sent.
    public mutating func writeRESPBulk(bytes: UnsafeRawBufferPointer) {
        var header = ReplyLine()
        header.prependCRLF()
        header.prependDigits(UInt64(bytes.count))
        header.prepend(UInt8(ascii: "$"))
        header.withBytes { head in
            let total = head.count + bytes.count + 2
            _ = writeWithUnsafeMutableBytes(minimumWritableBytes: total) { out in
                out.baseAddress!.copyMemory(from: head.baseAddress!, byteCount: head.count)
                if bytes.count > 0 { (out.baseAddress! + head.count).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
                out[total - 2] = 13
                out[total - 1] = 10
                return total
            }
        }
    }

    /// `$length\r\nbytes\r\n` of another buffer's readable bytes.
    public mutating func writeRESPBulk(_ bytes: ByteBuffer) {
        bytes.withUnsafeReadableBytes { writeRESPBulk(bytes: $0) }
    }

    public mutating func writeRESPArrayHeader(_ count: Int) {
        writeRESPCountLine(UInt8(ascii: "*"), count)
    }

    /// `%count\r\n`: a RESP3 map header (only the reply to `HELLO 3` uses it; every other reply
    /// Stockade sends is valid in RESP2 and RESP3 alike).
    public mutating func writeRESP3MapHeader(_ count: Int) {
        writeRESPCountLine(UInt8(ascii: "%"), count)
    }

    private mutating func writeRESPCountLine(_ type: UInt8, _ count: Int) {
        var line = ReplyLine()
        line.prependCRLF()
        line.prependDecimal(Int64(count))
        line.prepend(type)
        line.write(into: &self)
    }

    /// `type`, the text with CR and LF replaced by spaces (byte by byte, no Unicode work), CRLF.
    private mutating func writeRESPLine(_ type: UInt8, _ text: String) {
        var text = text
        text.withUTF8 { bytes in
            let total = bytes.count + 3
            _ = writeWithUnsafeMutableBytes(minimumWritableBytes: total) { out in
                out[0] = type
                for i in 0..<bytes.count {
                    let byte = bytes[i]
                    out[i + 1] = byte == 13 || byte == 10 ? UInt8(ascii: " ") : byte
                }
                out[total - 2] = 13
                out[total - 1] = 10
                return total
            }
        }
    }
}

/// A reply line of at most ``capacity`` bytes, built from its end on the stack (digits come out
/// lowest first), then written with one write.
private struct ReplyLine {
    /// `$`, 2 digits of length, CRLF, 20 digits, CRLF is the longest line built here (27 bytes).
    static let capacity = 32
    private var storage: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    private var start = Self.capacity

    var count: Int { Self.capacity - start }

    mutating func prepend(_ byte: UInt8) {
        assert(start > 0, "a reply line longer than \(Self.capacity) bytes")
        start -= 1
        let index = start
        withUnsafeMutableBytes(of: &storage) { $0[index] = byte }
    }

    mutating func prependCRLF() {
        prepend(10)
        prepend(13)
    }

    /// "00" to "99": two digits per division (an order id has about 20 digits, one per reply).
    /// (Computed, not stored: a stored static would be reached through its lazy initializer's check.)
    private static var digitPairs: StaticString { """
        00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899
        """ }

    /// The decimal digits of `magnitude` (at most 20).
    mutating func prependDigits(_ magnitude: UInt64) {
        let pairs = Self.digitPairs.utf8Start
        var rest = magnitude
        while rest >= 100 {
            let pair = Int(truncatingIfNeeded: rest % 100) &* 2
            rest /= 100
            prepend(pairs[pair &+ 1])
            prepend(pairs[pair])
        }
        if rest >= 10 {
            let pair = Int(truncatingIfNeeded: rest) &* 2
            prepend(pairs[pair &+ 1])
            prepend(pairs[pair])
        } else {
            prepend(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: rest))
        }
    }

    /// `value`'s digits after a `-` when negative.
    mutating func prependDecimal(_ value: Int64) {
        prependDigits(value.magnitude)
        if value < 0 { prepend(UInt8(ascii: "-")) }
    }

    func withBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T {
        withUnsafeBytes(of: storage) { body(UnsafeRawBufferPointer(rebasing: $0[start...])) }
    }

    func write(into buffer: inout ByteBuffer) {
        withBytes { buffer.writeRawBytes($0) }
    }
}
