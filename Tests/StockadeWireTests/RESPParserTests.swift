import Glibc
import NIOCore
import StockadeCore
import Testing
@testable import StockadeWire

/// Parses everything complete in `bytes`; returns the commands, or the protocol error that stopped it.
private func parseAll(_ bytes: [UInt8], limits: RESPParser.Limits = .init()) -> (commands: [[String]], error: String?, leftover: Int) {
    var buffer = ByteBuffer(bytes: bytes)
    var parser = RESPParser(limits: limits)
    var commands: [[String]] = []
    while true {
        do {
            switch try parser.next(&buffer) {
            case .command(let args): commands.append(texts(args))
            case .incomplete: return (commands, nil, buffer.readableBytes)
            }
        } catch {
            return (commands, error.message, buffer.readableBytes)
        }
    }
}

/// An argument as text, for comparing with what a test sent (the parser itself never makes Strings).
private func text(_ argument: ByteBuffer) -> String { String(decoding: argument.readableBytesView, as: UTF8.self) }

/// A command's arguments as text, read both ways a caller can (slices, and the raw bytes the server
/// parses in place); a difference between the two is recorded as a failure.
private func texts(_ arguments: RESPParser.Arguments) -> [String] {
    let sliced = arguments.map(text)
    let raw = arguments.withUnsafeArguments { $0.map { String(decoding: $0, as: UTF8.self) } }
    #expect(raw == sliced, "the in-place bytes differ from the slices")
    return sliced
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
        #expect(RESPParser.splitInline(Array(#"SET "a b" 'c d' "x\"y" "\x41\n" 'it\'s'"#.utf8)) == ["SET", "a b", "c d", "x\"y", "A\n", "it's"].map { Array($0.utf8) })
        #expect(RESPParser.splitInline(Array(#"SET "open"#.utf8)) == nil)
        #expect(RESPParser.splitInline(Array(#"SET "a"b"#.utf8)) == nil)
        #expect(RESPParser.splitInline(Array("   ".utf8)) == [])
        let result = parseAll(Array("ECHO \"unbalanced\r\n".utf8))
        #expect(result.error == "unbalanced quotes in request")
    }

    @Test func partialFramesWaitForMoreBytes() {
        let command = ["BUY", "bob", "a", "1", "b", "2", "REQ", "r-1"]
        let input = encode(command)
        for cut in 0..<input.count {
            // The first part is taken in as far as it goes; the rest completes the command.
            var parser = RESPParser()
            var buffer = ByteBuffer(bytes: input[..<cut])
            #expect((try? parser.next(&buffer)) == .incomplete, "cut \(cut)")
            #expect(parser.inRequest == (cut >= 4), "cut \(cut)")  // from the end of the `*8` line on, it holds a request
            buffer.writeBytes(input[cut...])
            guard case .command(let args)? = try? parser.next(&buffer) else { Issue.record("cut \(cut)"); continue }
            #expect(texts(args) == command && buffer.readableBytes == 0 && !parser.inRequest, "cut \(cut)")
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
            var parser = RESPParser()
            var offset = 0
            while offset < stream.count {
                let step = Int.random(in: 1...max(1, stream.count - offset), using: &rng)
                // As the server does now and then: the bytes already read are dropped, so the next
                // read's bytes land at other indices than the ones the parser saw before.
                if Bool.random(using: &rng) { buffer.discardReadBytes() }
                buffer.writeBytes(stream[offset..<offset + step])
                offset += step
                while case .command(let args)? = try? parser.next(&buffer) { parsed.append(texts(args)) }
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

/// What one call of a parser gave: a command's arguments, a wait for more bytes, or a protocol error;
/// with the buffer's reader index after it.
private enum Step: Equatable {
    case command([[UInt8]], readerIndex: Int)
    case incomplete(readerIndex: Int)
    case error(String, readerIndex: Int)
}

/// Feeds `stream` in the given cuts to a parser, calling it until it waits after each cut or throws,
/// through ``RESPParser/next(_:_:)`` with whole requests read in one pass or not (then it is the state
/// machine of ``RESPParser/next(_:)``). Stops at the first error, as a connection does.
private func steps(
    _ stream: [UInt8], cuts: [Int], limits: RESPParser.Limits, wholeRequests: Bool, discards: [Bool]
) -> (steps: [Step], onePass: Int) {
    var parser = RESPParser(limits: limits)
    parser.wholeRequests = wholeRequests
    var buffer = ByteBufferAllocator().buffer(capacity: 0)
    var out: [Step] = []
    var offset = 0
    for (i, cut) in cuts.enumerated() {
        if discards[i] { buffer.discardReadBytes() }
        buffer.writeBytes(stream[offset..<cut])
        offset = cut
        while true {
            do {
                var parsed: [[UInt8]]?
                guard try parser.next(&buffer, { parsed = $0.map { Array($0) } }), let arguments = parsed else {
                    out.append(.incomplete(readerIndex: buffer.readerIndex))
                    break
                }
                out.append(.command(arguments, readerIndex: buffer.readerIndex))
            } catch {
                out.append(.error(error.message, readerIndex: buffer.readerIndex))
                return (out, parser.wholeRequestsRead)
            }
        }
    }
    return (out, parser.wholeRequestsRead)
}

@Suite struct RESPParserWholeRequestTests {
    /// Reading a whole request in one pass is an optimization, never a change of meaning: for
    /// pipelines of valid, inline, partial, empty, malformed and over-limit requests, cut into random
    /// reads, the one-pass reader and the state machine give the same commands, waits and errors, and
    /// leave the buffer at the same place after every call.
    @Test func wholeRequestsParseAsTheStateMachineDoes() {
        var rng = SplitMix64(seed: 11)
        let words: [[UInt8]] = ["RESERVE", "user:000000000017", "rb", "1", "TTL", "600000", "", "é", "\r\n", "x y"]
            .map { Array($0.utf8) } + [[0, 255, 13], Array(repeating: 65, count: 70)]
        var onePass = 0
        for round in 0..<3_000 {
            var limits = RESPParser.Limits()
            if Bool.random(using: &rng) {
                limits.argumentsMax = Int.random(in: 1...6, using: &rng)
                limits.bulkBytesMax = Int.random(in: 0...80, using: &rng)
                limits.requestBytesMax = Int.random(in: 20...300, using: &rng)
            }
            var stream: [UInt8] = []
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                let args = (0..<Int.random(in: 1...7, using: &rng)).map { _ in words.randomElement(using: &rng)! }
                var request = Array("*\(args.count)\r\n".utf8)
                for arg in args { request += Array("$\(arg.count)\r\n".utf8) + arg + [13, 10] }
                switch Int.random(in: 0..<12, using: &rng) {
                case 0: request = Array("PING hello\r\n".utf8)  // inline
                case 1: request = Array("*0\r\n".utf8)  // empty, skipped
                case 2: request[Int.random(in: 0..<request.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                case 3: request = Array("*2\r\n$\(Int.random(in: -3...100, using: &rng))\r\n".utf8) + request
                case 4: request = Array("*\(Int.random(in: -2...9, using: &rng))\r\n".utf8) + request
                case 5: request = Array("*1\r\n$+3\r\nabc\r\n".utf8)  // a sign the decimal reader refuses, as Redis
                case 6: request.removeLast(Int.random(in: 1...request.count, using: &rng))
                case 7: request = Array("*\(Bool.random(using: &rng) ? "01" : "1")\r\n$0\(4)\r\nPING\r\n".utf8)  // leading zeros
                default: break
                }
                stream += request
            }
            var cuts: [Int] = []
            var at = 0
            while at < stream.count {
                at = Bool.random(using: &rng) ? stream.count : min(stream.count, at + Int.random(in: 1...40, using: &rng))
                cuts.append(at)
            }
            let discards = cuts.map { _ in Bool.random(using: &rng) }
            let fast = steps(stream, cuts: cuts, limits: limits, wholeRequests: true, discards: discards)
            let machine = steps(stream, cuts: cuts, limits: limits, wholeRequests: false, discards: discards)
            #expect(fast.steps == machine.steps, "round \(round)")
            #expect(machine.onePass == 0)
            onePass += fast.onePass
        }
        #expect(onePass > 900, "the rounds exercise the one-pass reader")
    }
}

/// Numbers as Redis's `string2ll` reads them: one spelling each.
@Suite struct DecimalTests {
    @Test func oneSpellingForEachNumber() {
        func read(_ text: String) -> Int? { Array(text.utf8).withUnsafeBytes { RESPParser.decimal($0) } }
        for (text, value) in [("0", 0), ("7", 7), ("-1", -1), ("10", 10), ("9223372036854775807", Int.max), ("-9223372036854775808", Int.min)] {
            #expect(read(text) == value, "\(text)")
        }
        for text in ["", "-", "+1", "01", "-0", "-01", "00", " 1", "1 ", "1e3", "9223372036854775808", "-9223372036854775809"] {
            #expect(read(text) == nil, "\(text)")
        }
        // Whole in one read (the one-pass reader) and a byte at a time (the incremental one) alike.
        for request in ["*01\r\n$4\r\nPING\r\n", "*1\r\n$04\r\nPING\r\n", "*2\r\n$4\r\nECHO\r\n$0003\r\nabc\r\n", "*+1\r\n$4\r\nPING\r\n"] {
            #expect(parseAll(Array(request.utf8)).error != nil, "\(request)")
            // The server's reader, which reads a request whole in one pass when it can.
            let whole = steps(Array(request.utf8), cuts: [request.utf8.count], limits: .init(), wholeRequests: true, discards: [false])
            guard case .error = whole.steps.last else {
                Issue.record("\(request) whole: \(whole.steps)")
                continue
            }
            var parser = RESPParser()
            var buffer = ByteBuffer()
            var refused = false
            for byte in request.utf8 {
                buffer.writeInteger(byte)
                do { _ = try parser.next(&buffer) } catch { refused = true; break }
            }
            #expect(refused, "\(request) a byte at a time")
        }
        #expect(parseAll(Array("*1\r\n$4\r\nPING\r\n".utf8)).commands == [["PING"]])
    }
}

/// CPU time of this thread, for comparing the cost of two inputs (not a speed goal: a ratio).
func threadCPUNanos() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
    return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}

/// The least CPU time of three runs of `body` (the least is the one least disturbed by other work).
func leastCPUNanos(_ body: () -> Void) -> UInt64 {
    (0..<3).map { _ in
        let start = threadCPUNanos()
        body()
        return threadCPUNanos() - start
    }.min()!
}

@Suite struct RESPParserCostTests {
    /// A multibulk of `bytes` bytes: `argumentCount` arguments, each a run of combining marks of two
    /// classes after a letter (what made Unicode work quadratic), which the parser must not care about.
    static func request(bytes: Int, argumentCount: Int = 256) -> [UInt8] {
        let marks: [UInt8] = Array("\u{301}\u{316}".utf8)  // classes 230 and 220, alternating
        let argumentBytes = bytes / argumentCount
        var argument: [UInt8] = [UInt8(ascii: "a")]
        while argument.count + marks.count <= argumentBytes { argument += marks }
        var out = Array("*\(argumentCount)\r\n".utf8)
        for _ in 0..<argumentCount { out += Array("$\(argument.count)\r\n".utf8) + argument + [13, 10] }
        return out
    }

    static var generousLimits: RESPParser.Limits {
        var limits = RESPParser.Limits()
        limits.requestBytesMax = 64 << 20
        return limits
    }

    /// Parses `stream` fed `readBytes` at a time, as a connection would; returns the commands.
    static func feed(_ stream: [UInt8], readBytes: Int) -> Int {
        var parser = RESPParser(limits: generousLimits)
        var buffer = ByteBuffer()
        var commands = 0
        var offset = 0
        while offset < stream.count {
            let end = min(stream.count, offset + readBytes)
            buffer.writeBytes(stream[offset..<end])
            offset = end
            while case .command? = try? parser.next(&buffer) { commands += 1 }
            if buffer.readerIndex >= max(buffer.readableBytes, 4096) { buffer.discardReadBytes() }
        }
        return commands
    }

    /// (#7 C15) A request sent whole costs time linear in its size: 4 MB costs about 4 times 1 MB.
    @Test func parsingCostIsLinearInRequestSize() {
        let small = Self.request(bytes: 1 << 20), large = Self.request(bytes: 4 << 20)
        let smallNanos = leastCPUNanos { #expect(Self.feed(small, readBytes: small.count) == 1) }
        let largeNanos = leastCPUNanos { #expect(Self.feed(large, readBytes: large.count) == 1) }
        // Linear is 4; quadratic would be 16. The factor is wide so a busy machine does not fail it.
        #expect(Double(largeNanos) / Double(max(smallNanos, 1)) < 10, "1 MB: \(smallNanos) ns, 4 MB: \(largeNanos) ns")
    }

    /// (#7 C15) The same requests arriving in 1 KiB reads: each read continues where the last one
    /// stopped. The old parser re-parsed a partial multibulk from its start on every read (quadratic).
    @Test func manySmallReadsOfAHugeMultibulkAreLinear() {
        let small = Self.request(bytes: 1 << 20), large = Self.request(bytes: 4 << 20)
        let smallNanos = leastCPUNanos { #expect(Self.feed(small, readBytes: 1024) == 1) }
        let largeNanos = leastCPUNanos { #expect(Self.feed(large, readBytes: 1024) == 1) }
        #expect(Double(largeNanos) / Double(max(smallNanos, 1)) < 10, "1 MB: \(smallNanos) ns, 4 MB: \(largeNanos) ns")
    }

    /// (#7 C15) `*1024` then `$524288` arguments: refused once the request passes
    /// ``RESPParser/Limits/requestBytesMax``, without waiting for (or holding) the rest.
    @Test func wholeRequestIsBounded() {
        var limits = RESPParser.Limits()
        limits.requestBytesMax = 1 << 20
        var parser = RESPParser(limits: limits)
        var buffer = ByteBuffer(string: "*1024\r\n")
        let argument = "$524288\r\n" + String(repeating: "x", count: 524_288) + "\r\n"
        var fed = 0
        var failure: String?
        while fed < 8, failure == nil {
            buffer.writeString(argument)
            fed += 1
            do { _ = try parser.next(&buffer) } catch let error { failure = error.message }
        }
        #expect(failure == "request too big (over 1048576 bytes)")
        #expect(fed == 2)  // the second argument's length line alone says the request would not fit
        // A request under the bound parses.
        var ok = RESPParser(limits: limits)
        var small = ByteBuffer(bytes: encode(["ECHO", String(repeating: "y", count: 500_000)]))
        guard case .command(let args)? = try? ok.next(&small) else { Issue.record("not parsed"); return }
        #expect(args[1].readableBytes == 500_000)
    }

    /// Arguments are the bytes sent: invalid UTF-8 and canonically equivalent spellings stay apart.
    /// The parser reuses its argument array between commands: a command's arguments the caller
    /// still holds are never changed by parsing the next ones, whole or split across reads.
    @Test func heldArgumentsSurviveTheNextCommands() throws {
        var parser = RESPParser()
        var buffer = ByteBuffer(string: "*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\nc\r\n*1\r\n$4\r\nPI")
        var kept: [RESPParser.Arguments] = []
        while case .command(let args) = try parser.next(&buffer) { kept.append(args) }
        buffer.writeString("NG\r\nPING\r\n")
        while case .command(let args) = try parser.next(&buffer) { kept.append(args) }
        #expect(kept.map { $0.map { String(buffer: $0) } } == [["GET", "a"], ["SET", "b", "c"], ["PING"], ["PING"]])
    }

    @Test func argumentsAreBytes() throws {
        var parser = RESPParser()
        let nfc = Array("caf\u{e9}".utf8), nfd = Array("cafe\u{301}".utf8), invalid: [UInt8] = [0xff, 0xfe, 0x41]
        var buffer = ByteBuffer(string: "*3\r\n$\(nfc.count)\r\n")
        buffer.writeBytes(nfc)
        buffer.writeString("\r\n$\(nfd.count)\r\n")
        buffer.writeBytes(nfd)
        buffer.writeString("\r\n$3\r\n")
        buffer.writeBytes(invalid)
        buffer.writeString("\r\n")
        guard case .command(let args) = try parser.next(&buffer) else { Issue.record("incomplete"); return }
        #expect(args.map { Array($0.readableBytesView) } == [nfc, nfd, invalid])
        #expect(args[0] != args[1])
    }
}
