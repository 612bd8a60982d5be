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
}
