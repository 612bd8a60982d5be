import NIOCore
import Testing
@testable import StockadeWire

/// The writers that encode numbers in place give the same bytes as the `String` forms they replace.
@Suite struct RESPWriterTests {
    @Test func bulkDecimalsAreTheDigitsAsABulkString() {
        var rng = SystemRandomNumberGenerator()
        let values: [UInt64] = [0, 1, 9, 10, 99, 100, 72_057_594_037_927_937, UInt64(Int64.max), UInt64.max - 1, UInt64.max]
            + (0..<200).map { _ in UInt64.random(in: 0...UInt64.max, using: &rng) >> UInt64.random(in: 0...63, using: &rng) }
        for value in values {
            var fast = ByteBuffer()
            fast.writeRESPBulkDecimal(value)
            var plain = ByteBuffer()
            plain.writeRESPBulk(String(value))
            #expect(fast == plain, "\(value)")
        }
    }

    @Test func decimalsAreTheDigits() {
        for value: Int64 in [0, -1, 1, 10, -10, Int64.max, Int64.min, Int64.min + 1, 1_234_567_890] {
            var out = ByteBuffer()
            out.writeDecimal(value)
            #expect(String(buffer: out) == String(value))
        }
    }

    /// Every writer against the reply spelled out byte by byte, after other bytes already in the
    /// buffer, into a buffer whose storage another copy shares (which must not change).
    @Test func everyLineIsTheBytesItSpellsOut() {
        var rng = SystemRandomNumberGenerator()
        func check(_ expected: [UInt8], _ write: (inout ByteBuffer) -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
            var out = ByteBuffer(string: "before")
            let shared = out
            write(&out)
            #expect(Array(out.readableBytesView) == Array("before".utf8) + expected, sourceLocation: sourceLocation)
            #expect(String(buffer: shared) == "before", sourceLocation: sourceLocation)
        }
        let integers: [Int64] = [0, 1, -1, 9, 10, -10, 99, 100, Int64.max, Int64.min, Int64.min + 1]
            + (0..<200).map { _ in Int64.random(in: .min ... .max, using: &rng) >> Int64.random(in: 0...63, using: &rng) }
        for value in integers {
            check(Array(":\(value)\r\n".utf8)) { $0.writeRESPInteger(value) }
            check(Array("\(value)".utf8)) { $0.writeDecimal(value) }
        }
        for count in [0, 1, 9, 10, 16, 1024, 1 << 20, Int(Int32.max), -1] {
            check(Array("*\(count)\r\n".utf8)) { $0.writeRESPArrayHeader(count) }
            check(Array("%\(count)\r\n".utf8)) { $0.writeRESP3MapHeader(count) }
        }
        for length in [0, 1, 2, 9, 10, 99, 100, 255, 4096] + (0..<50).map({ _ in Int.random(in: 0...600, using: &rng) }) {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            check(Array("$\(length)\r\n".utf8) + bytes + [13, 10]) { out in bytes.withUnsafeBytes { out.writeRESPBulk(bytes: $0) } }
            check(Array("$\(length)\r\n".utf8) + bytes + [13, 10]) { $0.writeRESPBulk(ByteBuffer(bytes: bytes)) }
        }
        for text in ["", "OK", "sku:1", "caf\u{E9}", "\u{1F600} \u{1F1EB}\u{1F1F7}", String(repeating: "x", count: 5000)] {
            check(Array("$\(text.utf8.count)\r\n\(text)\r\n".utf8)) { $0.writeRESPBulk(text) }
        }
        check(Array("$-1\r\n".utf8)) { $0.writeRESPBulk(nil) }
        for (text, line) in [("OK", "OK"), ("", ""), ("a\r\nb", "a  b"), ("\r", " "), ("caf\u{E9}\n", "caf\u{E9} "),
                             ("SOLDOUT", "SOLDOUT"), (String(repeating: "e\n", count: 600), String(repeating: "e ", count: 600))] {
            check(Array("+\(line)\r\n".utf8)) { $0.writeRESPSimple(text) }
            check(Array("-\(line)\r\n".utf8)) { $0.writeRESPError(text) }
        }
    }
}
