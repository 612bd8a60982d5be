import NIOCore
import Testing
import StockadeWire

/// The scanner says a reply is whole exactly when the parser can parse it, at every cut, resuming
/// where it stopped; it bounds nesting (a reply of 2,000,000 nested arrays overflowed the parser's
/// stack in the sink).
@Suite struct RESPReplyScannerTests {
    static let replies: [String] = [
        "+OK\r\n", "-ERR x\r\n", ":42\r\n", "$-1\r\n", "*-1\r\n", "*0\r\n", "$0\r\n\r\n",
        "$5\r\nhe\r\no\r\n",
        "*2\r\n*3\r\n$1\r\na\r\n:1\r\n*0\r\n%1\r\n+k\r\n$2\r\nv\n\r\n",
        "*3\r\n*2\r\n$8\r\nposition\r\n:7\r\n*1\r\n*1\r\n*1\r\n_\r\n,1.5\r\n",
    ]

    @Test func wholeExactlyWhenTheParserCanParseAtEveryCut() throws {
        let parser = RESPReplyParser(bulkAsBytes: true)
        let stream = Self.replies.joined()
        let bytes = Array(stream.utf8)
        for step in [1, 2, 3, 7, 64] {
            var scanner = RESPReplyScanner()
            var buffer = ByteBuffer()
            var parsed: [RESPReply] = []
            var offset = 0
            while offset < bytes.count {
                buffer.writeBytes(bytes[offset..<min(bytes.count, offset + step)])
                offset += step
                while try scanner.complete(buffer) {
                    let reply = try #require(try parser.next(&buffer), "scanner said whole, parser disagreed")
                    parsed.append(reply)
                    scanner.reset()
                }
                var probe = buffer
                #expect(try parser.next(&probe) == nil, "parser saw a whole reply the scanner missed (step \(step))")
            }
            #expect(parsed.count == Self.replies.count, "step \(step)")
        }
    }

    /// A reply's total size is bounded, not only each bulk: an array of many bulks under the bulk
    /// bound is refused once their sum passes `replyBytesMax`, before the bytes of the bulk that
    /// would pass it arrive (a reader's buffer grew to gigabytes before).
    @Test func aReplysTotalSizeIsBounded() throws {
        var scanner = RESPReplyScanner()
        scanner.replyBytesMax = 1000
        var buffer = ByteBuffer(string: "*100\r\n")
        let bulk = "$300\r\n" + String(repeating: "x", count: 300) + "\r\n"
        buffer.writeString(bulk + bulk + bulk)
        #expect(try scanner.complete(buffer) == false, "three bulks of 300 bytes: within the bound, more owed")
        buffer.writeString("$300\r\n")
        let error = #expect(throws: RESPReplyParser.ParseError.self) { try scanner.complete(buffer) }
        #expect(error?.message == "reply larger than 1000 bytes")
        // A reply of exactly the bound is whole.
        var exact = RESPReplyScanner()
        exact.replyBytesMax = 1000
        let body = String(repeating: "y", count: 1000 - 9)
        #expect(try exact.complete(ByteBuffer(string: "$991\r\n" + body + "\r\n")) == true)
    }

    @Test func nestingIsBounded() {
        var scanner = RESPReplyScanner()
        let deep = ByteBuffer(string: String(repeating: "*1\r\n", count: 10_000))
        #expect(throws: RESPReplyParser.ParseError.self) { try scanner.complete(deep) }
    }
}
