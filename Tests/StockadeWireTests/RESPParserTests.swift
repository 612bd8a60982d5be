import NIOCore
import StockadeCore
import Testing
@testable import StockadeWire

/// Parses everything complete in `bytes`; returns the commands, or the protocol error that stopped it.
private func parseAll(_ bytes: [UInt8], limits: RESPParser.Limits = .init()) -> (commands: [[String]], error: String?, leftover: Int) {
    var buffer = ByteBuffer(bytes: bytes)
    let parser = RESPParser(limits: limits)
    var commands: [[String]] = []
    while true {
        do {
            switch try parser.next(&buffer) {
            case .command(let args): commands.append(args)
            case .incomplete: return (commands, nil, buffer.readableBytes)
            }
        } catch {
            return (commands, error.message, buffer.readableBytes)
        }
    }
}

private func encode(_ command: [String]) -> [UInt8] {
    var out = "*\(command.count)\r\n"
    for arg in command { out += "$\(arg.utf8.count)\r\n\(arg)\r\n" }
    return Array(out.utf8)
}

@Suite struct RESPParserTests {
    @Test func multibulkAndInline() {
        let input = encode(["RESERVE", "alice", "phone", "1"]) + Array("PING\r\nSTOCK  phone\n\r\n*0\r\n".utf8) + encode(["ECHO", ""])
        let result = parseAll(input)
        #expect(result.error == nil && result.leftover == 0)
        #expect(result.commands == [["RESERVE", "alice", "phone", "1"], ["PING"], ["STOCK", "phone"], ["ECHO", ""]])
    }

    @Test func inlineQuotingFollowsRedis() {
        #expect(RESPParser.splitInline(Array(#"SET "a b" 'c d' "x\"y" "\x41\n" 'it\'s'"#.utf8)) == ["SET", "a b", "c d", "x\"y", "A\n", "it's"])
        #expect(RESPParser.splitInline(Array(#"SET "open"#.utf8)) == nil)
        #expect(RESPParser.splitInline(Array(#"SET "a"b"#.utf8)) == nil)
        #expect(RESPParser.splitInline(Array("   ".utf8)) == [])
        let result = parseAll(Array("ECHO \"unbalanced\r\n".utf8))
        #expect(result.error == "unbalanced quotes in request")
    }

    @Test func partialFramesWaitForMoreBytes() {
        let input = encode(["BUY", "bob", "a", "1", "b", "2", "REQ", "r-1"])
        for cut in 0..<input.count {
            let result = parseAll(Array(input[..<cut]))
            #expect(result.commands.isEmpty && result.error == nil && result.leftover == cut, "cut \(cut)")
        }
    }

    @Test func limitsAreProtocolErrors() {
        var limits = RESPParser.Limits()
        limits.bulkBytesMax = 16
        limits.argumentsMax = 4
        limits.inlineBytesMax = 32
        #expect(parseAll(Array("*5\r\n".utf8), limits: limits).error?.hasPrefix("invalid multibulk length") == true)
        #expect(parseAll(Array("*1\r\n$17\r\n".utf8), limits: limits).error?.hasPrefix("invalid bulk length") == true)
        #expect(parseAll(Array("*1\r\n$-5\r\n".utf8), limits: limits).error?.hasPrefix("invalid bulk length") == true)
        #expect(parseAll(Array("*1\r\n$99999999999999999999999\r\n".utf8), limits: limits).error == "invalid bulk length")
        #expect(parseAll(Array("*1\r\n:5\r\n".utf8), limits: limits).error == "expected '$', got ':'")
        #expect(parseAll(Array("*1\r\n$2\r\nabXY".utf8), limits: limits).error == "bulk string not followed by CRLF")
        #expect(parseAll(Array(repeating: UInt8(ascii: "a"), count: 40), limits: limits).error?.hasPrefix("too big inline request") == true)
        #expect(parseAll(Array("*abc\r\n".utf8), limits: limits).error == "invalid multibulk length")
        // Under the limits, the same shapes parse.
        #expect(parseAll(encode(["A", "B", "C", "D"]), limits: limits).commands == [["A", "B", "C", "D"]])
    }

    /// Random and mutated byte streams: the parser never crashes, never reads past what it was
    /// given, and every valid command in a stream split at any point is parsed exactly as sent.
    @Test func fuzzedStreams() {
        var rng = SplitMix64(seed: 7)
        let words = ["RESERVE", "alice", "phone", "1", "", "with space", "quote\"d", "é", "\r\n", "BUY", "x"]
        for round in 0..<2_000 {
            // A valid pipeline, fed in random splits.
            let commands = (0..<Int.random(in: 1...6, using: &rng)).map { _ in
                (0..<Int.random(in: 1...5, using: &rng)).map { _ in words.randomElement(using: &rng)! }
            }
            let stream = commands.flatMap(encode)
            var buffer = ByteBufferAllocator().buffer(capacity: 0)
            var parsed: [[String]] = []
            let parser = RESPParser()
            var offset = 0
            while offset < stream.count {
                let step = Int.random(in: 1...max(1, stream.count - offset), using: &rng)
                buffer.writeBytes(stream[offset..<offset + step])
                offset += step
                while case .command(let args)? = try? parser.next(&buffer) { parsed.append(args) }
            }
            #expect(parsed == commands, "round \(round)")
            #expect(buffer.readableBytes == 0)

            // The same stream mutated: flipped bytes, cut, garbage, huge or negative lengths.
            var mutated = stream
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                switch Int.random(in: 0..<5, using: &rng) {
                case 0: if !mutated.isEmpty { mutated[Int.random(in: 0..<mutated.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
                case 1: mutated = Array(mutated.prefix(Int.random(in: 0...mutated.count, using: &rng)))
                case 2: mutated += (0..<Int.random(in: 1...40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                case 3: mutated = Array("*2\r\n$\(Int.random(in: -9...Int.max / 2, using: &rng))\r\n".utf8) + mutated
                default: mutated = Array("*\(Int.random(in: Int.min / 2...Int.max / 2, using: &rng))\r\n".utf8) + mutated
                }
            }
            let result = parseAll(mutated)
            #expect(result.leftover <= mutated.count)
            #expect(result.commands.allSatisfy { !$0.isEmpty })
        }
    }
}
