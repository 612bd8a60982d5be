import NIOCore

/// Writes RESP2 replies into a `ByteBuffer`: all replies of one read go into one buffer and one flush.
extension ByteBuffer {
    /// `+text\r\n`. The text must not contain CR or LF.
    public mutating func writeRESPSimple(_ text: String) {
        writeInteger(UInt8(ascii: "+"))
        writeRESPLine(text)
    }

    /// `-text\r\n`: the first word is the error code clients branch on.
    public mutating func writeRESPError(_ text: String) {
        writeInteger(UInt8(ascii: "-"))
        writeRESPLine(text)
    }

    public mutating func writeRESPInteger(_ value: Int64) {
        writeInteger(UInt8(ascii: ":"))
        writeDecimal(value)
        writeStaticString("\r\n")
    }

    /// The decimal digits of `value` (with a leading `-` when negative), written in place: no String.
    public mutating func writeDecimal(_ value: Int64) {
        Self.withDigits(of: value.magnitude, negative: value < 0) { writeBytes($0) }
    }

    /// `value`'s decimal digits as a bulk string (how order ids travel), written in place: no String.
    public mutating func writeRESPBulkDecimal(_ value: UInt64) {
        Self.withDigits(of: value, negative: false) { digits in
            writeInteger(UInt8(ascii: "$"))
            writeDecimal(Int64(digits.count))
            writeStaticString("\r\n")
            writeBytes(digits)
            writeStaticString("\r\n")
        }
    }

    /// Calls `body` with the ASCII digits of `magnitude` (after a `-` when `negative`), held on the stack.
    private static func withDigits(of magnitude: UInt64, negative: Bool, _ body: (UnsafeRawBufferPointer) -> Void) {
        var rest = magnitude
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes: room for 20 digits and a sign
        withUnsafeMutableBytes(of: &digits) { buffer in
            var index = buffer.count
            repeat {
                index -= 1
                buffer[index] = UInt8(ascii: "0") + UInt8(truncatingIfNeeded: rest % 10)
                rest /= 10
            } while rest > 0
            if negative {
                index -= 1
                buffer[index] = UInt8(ascii: "-")
            }
            body(UnsafeRawBufferPointer(rebasing: buffer[index...]))
        }
    }

    /// `+PONG\r\n`, the reply to the most frequent command of a health check or a benchmark.
    public mutating func writeRESPPong() { writeStaticString("+PONG\r\n") }

    /// `$length\r\nbytes\r\n`, or the null bulk `$-1\r\n` for nil.
    public mutating func writeRESPBulk(_ text: String?) {
        guard let text else {
            writeStaticString("$-1\r\n")
            return
        }
        writeInteger(UInt8(ascii: "$"))
        writeString(String(text.utf8.count))
        writeStaticString("\r\n")
        writeString(text)
        writeStaticString("\r\n")
    }

    /// `$length\r\nbytes\r\n` of raw bytes: ids and echoed arguments go back exactly as sent.
    public mutating func writeRESPBulk(bytes: UnsafeRawBufferPointer) {
        writeInteger(UInt8(ascii: "$"))
        writeDecimal(Int64(bytes.count))
        writeStaticString("\r\n")
        writeBytes(bytes)
        writeStaticString("\r\n")
    }

    /// `$length\r\nbytes\r\n` of another buffer's readable bytes.
    public mutating func writeRESPBulk(_ bytes: ByteBuffer) {
        bytes.withUnsafeReadableBytes { writeRESPBulk(bytes: $0) }
    }

    public mutating func writeRESPArrayHeader(_ count: Int) {
        writeInteger(UInt8(ascii: "*"))
        writeDecimal(Int64(count))
        writeStaticString("\r\n")
    }

    /// `%count\r\n`: a RESP3 map header (only the reply to `HELLO 3` uses it; every other reply
    /// Stockade sends is valid in RESP2 and RESP3 alike).
    public mutating func writeRESP3MapHeader(_ count: Int) {
        writeInteger(UInt8(ascii: "%"))
        writeString(String(count))
        writeStaticString("\r\n")
    }

    /// Replaces CR and LF (which would end the line early) with spaces, byte by byte (no Unicode work).
    private mutating func writeRESPLine(_ text: String) {
        let start = writerIndex
        writeString(text)
        for index in start..<writerIndex where getInteger(at: index, as: UInt8.self) == 13 || getInteger(at: index, as: UInt8.self) == 10 {
            setInteger(UInt8(ascii: " "), at: index)
        }
        writeStaticString("\r\n")
    }
}
