import Foundation
import Logging
import NIOCore
import Synchronization
import StockadeCore
import StockadeWire
import Testing
@testable import StockadeServer

/// Parses a command given as words (the bytes of each word, as a client sends them).
/// An id as the command table makes it from these bytes.
private func id(_ text: String) -> Name { ByteBuffer(string: text).withUnsafeReadableBytes(CommandTable.id) }

private func parse(_ words: [String], authenticated: Bool = true) -> Request {
    CommandTable.parse(words.map { ByteBuffer(string: $0) }, authenticated: authenticated)
}

@Suite struct CommandTableTests {
    @Test func parsesEngineCommandsAndRefusesBadArguments() {
        #expect(parse(["reserve", "ann", "tv", "2", "req", "r1", "TTL", "500"])
            == .engine(.reserve(user: "ann", lines: [OrderLine(sku: "tv", quantity: 2)], requestId: "r1", ttlMillis: 500)))
        #expect(parse(["BUY", "bob", "a", "1", "b", "2", "REQ", "x"])
            == .engine(.reserve(user: "bob", lines: [OrderLine(sku: "a", quantity: 1), OrderLine(sku: "b", quantity: 2)], requestId: "x", ttlMillis: nil)))
        // A basket holds up to the limit of lines, in the order given; one more is refused.
        let skus = (0..<Limits.itemsPerOrderMax + 1).map { "s\($0)" }
        let full = Array(skus.prefix(Limits.itemsPerOrderMax))
        #expect(parse(["BUY", "bob"] + full.flatMap { [$0, "1"] })
            == .engine(.reserve(user: "bob", lines: full.map { OrderLine(sku: Name($0), quantity: 1) },
                                requestId: nil, ttlMillis: nil)))
        #expect(parse(["BUY", "bob"] + skus.flatMap { [$0, "1"] })
            == .invalid("ERR an order has 1 to \(Limits.itemsPerOrderMax) SKUs"))
        #expect(parse(["RESERVE", "ann", "tv", "many"]) == .invalid("ERR value is not an integer or out of range"))
        #expect(parse(["RESERVE", "ann", "tv"]) == .invalid("ERR wrong number of arguments for 'reserve' command"))
        #expect(parse(["BUY", "bob", "a", "1", "TTL"]) == .invalid("ERR syntax error: TTL needs a value"))
        // Each option once: the last of two was taken (the order keyed under the second REQ).
        #expect(parse(["RESERVE", "ann", "tv", "1", "REQ", "first", "REQ", "second"]) == .invalid("ERR syntax error: REQ given twice"))
        #expect(parse(["BUY", "bob", "a", "1", "b", "1", "TTL", "100000", "REQ", "r", "TTL", "50"]) == .invalid("ERR syntax error: TTL given twice"))
        #expect(parse(["SKU.ADD", "x", "5", "LIMIT", "1"]) == .engine(.addSku(sku: "x", total: 5, limit: 1)))
        #expect(parse(["DEDUCT", "x"]) == .engine(.deduct(sku: "x", quantity: 1)))
        #expect(parse(["CONFIRM", "not-a-number"]) == .engine(.confirm(OrderID(rawValue: 0))))
        #expect(parse(["EVENTS", "5", "COUNT", "0"]) == .invalid("ERR COUNT must be 1 to 10000"))
        #expect(parse(["EVENTS", "5", "BLOCK", "100"]) == .events(from: 5, count: 100, blockMillis: 100))
        #expect(parse(["EVENTS", "$", "COUNT", "3"]) == .events(from: nil, count: 3, blockMillis: 0))
        #expect(parse(["HELLO", "3", "AUTH", "default", "pw"]) == .hello(version: 3, password: ByteBuffer(string: "pw")))
        #expect(parse(["nope"]) == .invalid("ERR unknown command 'nope'"))
        // One spelling for each number, as Redis: `+1`, `01` and `-0` are not numbers, nor an order id
        // with a leading zero (which named the order without it).
        for number in ["+1", "01", "-0"] {
            #expect(parse(["RESERVE", "ann", "tv", number]) == .invalid("ERR value is not an integer or out of range"))
        }
        #expect(parse(["ORDER", "0123"]) == .engine(.order(OrderID(rawValue: 0))))
        #expect(parse(["ORDER", "123"]) == .engine(.order(OrderID(rawValue: 123))))
        // BLOCK 0 is the longest wait (a consumer of XREAD BLOCK 0 asked again at once, in a loop).
        #expect(parse(["EVENTS", "$", "BLOCK", "0"]) == .events(from: nil, count: 100, blockMillis: 60_000))
    }

    /// A retried request id is compared with its order's lines in whatever order they are listed.
    @Test func aBasketsLinesAreTheSameItemsInAnyOrder() {
        let lines = [OrderLine(sku: "a", quantity: 2), OrderLine(sku: "b", quantity: 1), OrderLine(sku: "c\u{301}", quantity: 3)]
        #expect(OrderLine.sameItems(lines, lines.reversed()))
        #expect(OrderLine.sameItems(lines, [lines[1], lines[2], lines[0]]))
        #expect(!OrderLine.sameItems(lines, [lines[0], lines[1], OrderLine(sku: "c", quantity: 3)]))
        #expect(!OrderLine.sameItems(lines, [lines[0], lines[1], OrderLine(sku: "c\u{301}", quantity: 2)]))
        #expect(!OrderLine.sameItems(lines, Array(lines.prefix(2))))
    }

    /// MULTI, EXEC, DISCARD and QUIT end or open a transaction; inside one, every other command is
    /// refused whole (read as nothing but its name), the sold-out and hot-path commands too.
    @Test func insideATransactionOnlyItsOwnCommandsAreRead() {
        func inTransaction(_ words: [String]) -> Request {
            RESPParser.Arguments(words.map { ByteBuffer(string: $0) }).withUnsafeArguments { CommandTable.parseInTransaction($0) }
        }
        #expect(parse(["MULTI"]) == .multi && parse(["exec"]) == .exec && parse(["Discard"]) == .discard)
        #expect(parse(["MULTI", "x"]) == .invalid("ERR wrong number of arguments for 'multi' command"))
        #expect(inTransaction(["EXEC"]) == .exec && inTransaction(["DISCARD"]) == .discard)
        #expect(inTransaction(["MULTI"]) == .multi && inTransaction(["QUIT"]) == .quit)
        for words in [["RESERVE", "u", "s", "1"], ["DEDUCT", "s"], ["PING"], ["SKU.ADD", "s", "x"], ["nope", "1"]] {
            guard case .invalid(let message) = inTransaction(words) else {
                Issue.record("\(words) ran inside a transaction")
                continue
            }
            #expect(message.hasPrefix("ERR Stockade runs no command inside MULTI: '\(words[0].lowercased())' was not run"))
        }
    }

    /// Client names as Redis takes them; CLIENT REPLY cannot turn replies off; COMMAND COUNT is a count.
    @Test func clientSubcommandsAreCheckedLikeRedis() {
        let badName = Request.invalid("ERR Client names cannot contain spaces, newlines or special characters.")
        #expect(parse(["CLIENT", "SETNAME", "worker-1"]) == .clientSet(.name, "worker-1"))
        #expect(parse(["CLIENT", "SETNAME", "a b"]) == badName)
        #expect(parse(["CLIENT", "SETNAME"]) == .invalid("ERR wrong number of arguments for 'client' command"))
        #expect(parse(["CLIENT", "SETINFO", "lib-name", "redis-py"]) == .clientSet(.libraryName, "redis-py"))
        #expect(parse(["CLIENT", "SETINFO", "lib-ver", "1\n"]) == badName)
        #expect(parse(["CLIENT", "SETINFO", "other", "x"]) == .invalid("ERR Unrecognized option 'other'"))
        #expect(parse(["CLIENT", "REPLY", "ON"]) == .clientAccepted)
        #expect(parse(["CLIENT", "REPLY", "OFF"]) == .invalid("ERR CLIENT REPLY takes only ON here: every command is answered"))
        #expect(parse(["HELLO", "3", "SETNAME", "a\tb"]) == badName)
        #expect(parse(["COMMAND", "COUNT"]) == .commandInfo(count: true))
        #expect(parse(["COMMAND", "DOCS"]) == .commandInfo(count: false))
        #expect(parse(["HELLO", "3", "SETNAME", "w"]) == .hello(version: 3, password: nil, name: "w"))
        // CLIENT LIST and KILL read their options as Redis does.
        #expect(parse(["CLIENT", "LIST"]) == .clientList(ids: nil, replica: nil, matchesNone: false))
        #expect(parse(["client", "list", "type", "slave", "id", "3", "4"]) == .clientList(ids: [3, 4], replica: true, matchesNone: false))
        #expect(parse(["CLIENT", "LIST", "TYPE", "pubsub"]) == .clientList(ids: nil, replica: nil, matchesNone: true))
        #expect(parse(["CLIENT", "LIST", "ID", "0"]) == .invalid("ERR Invalid client ID"))
        #expect(parse(["CLIENT", "KILL", "1.2.3.4:5"]) == .clientKill(ClientKillFilter(address: "1.2.3.4:5", skipMe: false, oldForm: true)))
        #expect(parse(["CLIENT", "KILL", "ID", "7", "SKIPME", "no"]) == .clientKill(ClientKillFilter(id: 7, skipMe: false)))
        #expect(parse(["CLIENT", "KILL", "ID", "7", "SKIPME"]) == .invalid("ERR syntax error"))
        #expect(parse(["CLIENT", "GETNAME"]) == .clientGetName)
        #expect(parse(["CLIENT", "INFO", "x"]) == .invalid("ERR wrong number of arguments for 'client' command"))
    }

    /// The form the front's sold-out answers read (``CommandTable/soldOutCandidate(_:authenticated:)``)
    /// is what the parse makes of the same arguments: over random argument lists of DEDUCT, RESERVE
    /// and their neighbours, with ids of every length near the bounds and numbers in and out of
    /// range, a candidate is only ever made of a DEDUCT or a one-line RESERVE without a request id,
    /// with the same fields; and every DEDUCT, and every such RESERVE of 3 or 5 arguments, makes one
    /// (BUY of one SKU does not: it keeps its own name in the metrics).
    @Test func soldOutCandidatesAreWhatTheParseMakes() {
        var rng = SplitMix64(seed: 88)
        let verbs = ["DEDUCT", "deduct", "RESERVE", "Reserve", "BUY", "STOCK", "RESERVEX"]
        let ids = ["", "a", "tv", "user:42", String(repeating: "k", count: Limits.nameBytesMax),
                   String(repeating: "k", count: Limits.nameBytesMax + 1), "TTL", "REQ", "1"]
        let numbers = ["1", "0", "-3", "5", "x", "99999999999999999999", "9223372036854775807", " 1", "ttl", "TTL", "REQ", "600000"]
        var made = 0
        for _ in 0..<20_000 {
            var words = [verbs[Int(rng.next() % UInt64(verbs.count))]]
            for position in 0..<Int(rng.next() % 7) {
                let pool = position % 2 == 0 && position < 2 ? ids : (rng.next() % 3 == 0 ? ids : numbers)
                words.append(pool[Int(rng.next() % UInt64(pool.count))])
            }
            let arguments = RESPParser.Arguments(words.map { ByteBuffer(string: $0) })
            let authenticated = rng.next() % 8 != 0
            let candidate = arguments.withUnsafeArguments { CommandTable.soldOutCandidate($0, authenticated: authenticated) }
            let request = parse(words, authenticated: authenticated)
            switch (candidate, request) {
            case let (.deduct(sku, quantity)?, .engine(.deduct(parsedSku, parsedQuantity))):
                #expect(sku == parsedSku && quantity == parsedQuantity, "\(words)")
                made += 1
            case let (.reserve(user, sku, quantity, ttl)?, .engine(.reserve(parsedUser, lines, nil, parsedTtl))):
                #expect(user == parsedUser && lines == [OrderLine(sku: sku, quantity: quantity)] && ttl == parsedTtl, "\(words)")
                #expect(words.count == 4 || words.count == 6, "\(words)")
                made += 1
            case (.some, _):
                Issue.record("a candidate of \(words), parsed as \(request)")
            case (nil, .engine(.deduct)):
                Issue.record("no candidate of \(words), a DEDUCT")
            case (nil, .engine(.reserve(_, let lines, nil, _)))
                where words[0].uppercased() == "RESERVE" && lines.count == 1 && (words.count == 4 || words.count == 6):
                Issue.record("no candidate of \(words), a one-line RESERVE")
            case (nil, _):
                break
            }
        }
        #expect(made > 500, "only \(made) candidates: the generator no longer reaches them")
    }

    /// Every command is found by its name in any ASCII case, and nothing else is: names one byte
    /// off, longer, shorter or empty, and every prefix of every name.
    @Test func everyVerbIsFoundByItsNameAndNoOtherWord() {
        for verb in Verb.allCases {
            #expect(Word(ByteBuffer(string: verb.name)).flatMap(Verb.named) == verb, "\(verb.name)")
            #expect(Word(ByteBuffer(string: verb.name.uppercased())).flatMap(Verb.named) == verb, "\(verb.name)")
            for cut in 1..<verb.name.utf8.count {
                let prefix = String(verb.name.prefix(cut))
                let expected = Verb.allCases.first { $0.name == prefix }
                #expect(Word(ByteBuffer(string: prefix)).flatMap(Verb.named) == expected, "\(prefix)")
            }
            #expect(Word(ByteBuffer(string: verb.name + "x")).flatMap(Verb.named) == nil, "\(verb.name)x")
            var changed = Array(verb.name.utf8)
            changed[changed.count - 1] ^= 1
            #expect(Word(ByteBuffer(bytes: changed)).flatMap(Verb.named) == nil, "\(verb.name) changed")
        }
        #expect(Word(ByteBuffer()) == nil)
    }

    /// Replication commands' arguments (the hostile review found a fraction taken for a negative).
    @Test func replicationCommandsCheckTheirArguments() {
        #expect(parse(["WAIT", "1", "1.5"]) == .invalid("ERR timeout is not an integer or out of range"))
        #expect(parse(["WAIT", "1", "-1"]) == .invalid("ERR timeout is negative"))
        #expect(parse(["WAIT", "2", "0"]) == .wait(replicas: 2, timeoutMillis: 0))
        #expect(parse(["REPLICATE", "5", "LAST", "ff", "FULLCOPY"]) == .replicate(ReplicaRequest(from: 5, fullCopy: true, last: 255)))
        #expect(parse(["REPLICATE", "9", "EPOCH", "7", "3", "LISTENING-PORT", "6380"])
            == .replicate(ReplicaRequest(from: 9, listeningPort: 6380, lastTerm: EpochHistory.Term(epoch: 7, start: 3))))
        // A term that starts at or after the position asked for, or epoch 0, is not a replica's.
        for bad in [["REPLICATE", "9", "EPOCH", "7", "9"], ["REPLICATE", "9", "EPOCH", "0", "3"], ["REPLICATE", "9", "EPOCH", "7"]] {
            guard case .invalid = parse(bad) else {
                Issue.record("\(bad) parsed")
                continue
            }
        }
        #expect(parse(["REPLICATE", "5", "LAST", "zz"]) == .invalid("ERR syntax error: expected LISTENING-PORT 0-65535, LAST fingerprint, EPOCH epoch start (before the position) or FULLCOPY"))
        #expect(parse(["REPLICAOF", "no", "one"]) == .promote)
        #expect(parse(["SLAVEOF", "h", "70000"]) == .invalid("ERR Invalid master port"))
        #expect(parse(["log.term", "0"]) == .logTerm(0))
        #expect(parse(["LOG.TERM", "9223372036854775807"]) == .logTerm(UInt64(Int64.max)))
        #expect(parse(["LOG.TERM", "-1"]) == .invalid("ERR position must be 0 to 9223372036854775807"))
        #expect(parse(["LOG.TERM", "x"]) == .invalid("ERR position must be 0 to 9223372036854775807"))
        #expect(parse(["LOG.TERM"]) == .invalid("ERR wrong number of arguments for 'log.term' command"))
    }

    @Test func globMatchesLikeRedisAndStaysFast() {
        func glob(_ pattern: String, _ text: String) -> Bool { globMatch(Array(pattern.utf8), text) }
        #expect(glob("*", "save"))
        #expect(glob("app*", "appendfsync"))
        #expect(glob("?ave", "save"))
        #expect(!glob("app*x", "appendfsync"))
        #expect(glob("*fsync", "appendfsync"))
        // Many stars against a non-matching text: answered at once, not in exponential time.
        #expect(!glob(String(repeating: "*", count: 10_000) + "z", "appendfsync"))
    }
}

@Suite struct CommandTableBytesTests {
    /// (#7 C14) Names and option words are ASCII bytes compared without regard to ASCII case, not
    /// Unicode case mappings: `ſ` (U+017F) upper-cases to `S` as a String, so the old table took
    /// `ſku.add` for SKU.ADD and `reſerve ... ſeq` words likewise.
    @Test func namesAreMatchedAsASCIIBytes() {
        #expect(parse(["rEsErVe", "ann", "tv", "1", "rEq", "r1"])
            == .engine(.reserve(user: id("ann"), lines: [OrderLine(sku: id("tv"), quantity: 1)],
                                requestId: id("r1"), ttlMillis: nil)))
        #expect(parse(["\u{17F}ku.add", "x", "1"]) == .invalid("ERR unknown command '\\xc5\\xbfku.add'"))
        #expect(parse(["RESERVE", "ann", "tv", "1", "RE\u{17F}", "r1"]) == .invalid("ERR syntax error near 'RE\\xc5\\xbf': expected REQ id or TTL ms"))
        #expect(parse(["PING\u{0}"]) == .invalid("ERR unknown command 'PING\\x00'"))
    }

    /// (#7 C14) A long name of combining marks costs nothing beyond its bytes: it is no name of ours
    /// (longer than any), and the error shows its first 64 bytes. The old table upper-cased it as a
    /// String: 6 s for 64 KB. Compared here as a ratio of CPU time, 256 KB against 1 MB.
    @Test func combiningMarksCostLinearTime() {
        func marks(_ bytes: Int) -> ByteBuffer {
            let pair = Array("\u{301}\u{316}".utf8)  // combining classes 230 and 220, alternating
            return ByteBuffer(bytes: [UInt8(ascii: "a")] + Array([[UInt8]](repeating: pair, count: bytes / pair.count).joined()))
        }
        func cost(_ bytes: Int) -> UInt64 {
            let name = marks(bytes)
            let pattern = [ByteBuffer(string: "CONFIG"), ByteBuffer(string: "GET"), name]
            return leastCPUNanos {
                guard case .invalid(let message) = CommandTable.parse([name, name]) else { Issue.record("parsed"); return }
                #expect(message.utf8.count < 400)
                guard case .configGet(let lowered) = CommandTable.parse(pattern) else { Issue.record("not CONFIG GET"); return }
                #expect(!globMatch(lowered, "appendfsync"))
                #expect(CommandTable.parse([name], authenticated: false) == .invalid("ERR unknown command '\(name.withUnsafeReadableBytes(CommandTable.shown))'"))
            }
        }
        let small = cost(256 << 10), large = cost(1 << 20)
        #expect(Double(large) / Double(max(small, 1)) < 10, "256 KB: \(small) ns, 1 MB: \(large) ns")
    }

    /// (#7 C14) Ids are length-checked before anything looks them up; the message is the engine's.
    @Test func idLengthIsCheckedFirst() {
        let long = String(repeating: "k", count: 65)
        #expect(parse(["STOCK", long]) == .invalid("ERR SKU id must be 1 to 64 bytes"))
        #expect(parse(["SKU.RESTOCK", long, "1"]) == .invalid("ERR SKU id must be 1 to 64 bytes"))
        #expect(parse(["DEDUCT", ""]) == .invalid("ERR SKU id must be 1 to 64 bytes"))
        #expect(parse(["ORDERS", long]) == .invalid("ERR user id must be 1 to 64 bytes"))
        #expect(parse(["RESERVE", "u", "tv", "1", "REQ", long]) == .invalid("ERR request id must be 1 to 64 bytes"))
        #expect(parse(["BUY", "u", "tv", "1", long, "1"]) == .invalid("ERR SKU id must be 1 to 64 bytes"))
        let basket = ["BUY", "u"] + (0..<65).flatMap { ["s\($0)", "1"] }
        #expect(parse(basket) == .invalid("ERR an order has 1 to 64 SKUs"))
        if case .engine = parse(["STOCK", String(repeating: "k", count: 64)]) {} else { Issue.record("64 bytes refused") }
    }

    /// (#7 C14) Before AUTH only AUTH, HELLO, PING and QUIT are looked at beyond their name.
    @Test func beforeAuthOnlyTheNameIsRead() {
        #expect(parse(["ECHO", "x"], authenticated: false) == .invalid("NOAUTH Authentication required."))
        #expect(parse(["CONFIG", "GET", "*"], authenticated: false) == .invalid("NOAUTH Authentication required."))
        #expect(parse(["STOCK", String(repeating: "k", count: 100)], authenticated: false) == .invalid("NOAUTH Authentication required."))
        #expect(parse(["PING"], authenticated: false) == .ping(nil))
        #expect(parse(["AUTH", "pw"], authenticated: false) == .auth(user: nil, password: ByteBuffer(string: "pw")))
    }

    /// (#7 B9) HELLO is checked in Redis's order, and a refused HELLO carries no password to act on.
    @Test func helloChecksVersionThenOptions() {
        #expect(parse(["HELLO", "4", "AUTH", "u", "pw"]) == .invalid("NOPROTO unsupported protocol version"))
        #expect(parse(["HELLO", "x", "AUTH", "u", "pw"]) == .invalid("ERR Protocol version is not an integer or out of range"))
        #expect(parse(["HELLO", "3", "AUTH", "u", "pw", "SETNAME"]) == .invalid("ERR Syntax error in HELLO option 'SETNAME'"))
        #expect(parse(["HELLO", "3", "AUTH", "u"]) == .invalid("ERR Syntax error in HELLO option 'AUTH'"))
        #expect(parse(["HELLO", "2", "auth", "u", "pw", "setname", "n"]) == .hello(version: 2, password: ByteBuffer(string: "pw"), name: "n"))
        #expect(parse(["HELLO"]) == .hello(version: nil, password: nil))
    }

    /// (#7 B10, C16) Every numeric argument's error names the bound its check applies.
    @Test func numericErrorsNameTheirBound() {
        #expect(parse(["EVENTS", "1", "COUNT", "-1"]) == .invalid("ERR COUNT must be 1 to 10000"))
        #expect(parse(["EVENTS", "1", "BLOCK", "-5"]) == .invalid("ERR BLOCK must be 0 to 60000 ms"))
        #expect(parse(["EVENTS", "-1"]) == .invalid("ERR from-position must be $ or 0 to 9223372036854775807"))
        #expect(parse(["ORDERS", "u", "COUNT", "1001"]) == .invalid("ERR COUNT must be 1 to 1000"))
        #expect(parse(["ORDERS", "u", "COUNT", "0"]) == .invalid("ERR COUNT must be 1 to 1000"))
        #expect(parse(["SKU.RESTOCK", "a", "99999999999999999999"]) == .invalid("ERR value is not an integer or out of range"))
        let restock = Command.restock(sku: id("a"), delta: .max)
        #expect(ReplyEncoding.errorText(.badQuantity, to: restock) == "BADQTY delta must be -1099511627776 to 1099511627776")
        let deduct = Command.deduct(sku: id("a"), quantity: 0)
        #expect(ReplyEncoding.errorText(.badQuantity, to: deduct) == "BADQTY quantity must be 1 to 1000000000")
    }

    /// (#7 C16) ORDERS pages: AFTER an order id, COUNT 1 to 1000, 100 by default.
    @Test func ordersArePaged() {
        let u = id("u")
        #expect(parse(["ORDERS", "u"]) == .engine(.orders(user: u, after: nil, count: 100)))
        #expect(parse(["ORDERS", "u", "after", "72057594037927937", "count", "1000"])
            == .engine(.orders(user: u, after: OrderID(rawValue: 72_057_594_037_927_937), count: 1000)))
        #expect(parse(["ORDERS", "u", "AFTER", "x"]) == .invalid("ERR AFTER needs an order id (an unsigned 64-bit number)"))
        #expect(parse(["ORDERS", "u", "AFTER"]) == .invalid("ERR wrong number of arguments for 'orders' command"))
        // The reply bound a round counts on grows with the page, up to a page's bytes and one order.
        #expect(ReplyEncoding.replyBytesMax(.orders(user: u, after: nil, count: 10))! >= 10 * ReplyEncoding.orderBytesMax)
        #expect(ReplyEncoding.replyBytesMax(.orders(user: u, after: nil, count: 1000))! >= Limits.pageBytesMax + ReplyEncoding.orderBytesMax)
        #expect(ReplyEncoding.replyBytesMax(.orders(user: u, after: nil, count: 1000))! < 1000 * ReplyEncoding.orderBytesMax)
        #expect(ReplyEncoding.replyBytesMax(.audit(sku: nil)) == nil)
    }
}

@Suite struct ProtocolErrorLogTests {
    /// Collects log lines.
    final class Lines: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [String] = []
        func append(_ line: String) { lock.withLock { lines.append(line) } }
        var all: [String] { lock.withLock { lines } }
    }

    struct Handler: LogHandler {
        let lines: Lines
        var logLevel: Logger.Level = .trace
        var metadata: Logger.Metadata = [:]
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) { lines.append("\(event.message)") }
    }

    /// (#7 C24) A flood of protocol errors logs at most 10 lines a second, then one line that says
    /// how many were left out.
    @Test func floodIsRateLimited() {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Handler(lines: lines) }
        let clock = Mutex<UInt64>(5_000_000_000)
        let log = ProtocolErrorLog(nowNanos: { clock.withLock { $0 } })
        for i in 0..<1000 { log.record("protocol error \(i)", peer: "p", logger: logger, loop: nil) }
        #expect(lines.all.count == ProtocolErrorLog.linesPerSecond)
        #expect(log.counts == (logged: 10, suppressed: 990))
        log.flushSummary(logger: logger)  // the second is not over yet
        #expect(lines.all.count == 10)
        clock.withLock { $0 += 1_000_000_000 }
        log.flushSummary(logger: logger)
        #expect(lines.all.last == "990 more protocol errors were not logged (at most 10 lines a second)")
        log.record("protocol error again", peer: "p", logger: logger, loop: nil)
        #expect(lines.all.suffix(1) == ["protocol error again"])
        #expect(lines.all.count == 12)
    }

    /// A time older than the current window (what a loop saw when it read the clock before taking the
    /// lock, while the other loop started a new window) counts in that window: the difference
    /// underflowed and trapped, which took the server down under a flood of refusals on both loops.
    @Test func aTimeBeforeTheWindowCountsInIt() {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Handler(lines: lines) }
        let clock = Mutex<UInt64>(5_000_000_000)
        let log = ProtocolErrorLog(nowNanos: { clock.withLock { $0 } })
        log.record("first", peer: "p", logger: logger, loop: nil)
        clock.withLock { $0 = 4_500_000_000 }
        log.record("seen earlier", peer: "p", logger: logger, loop: nil)
        log.flushSummary(logger: logger)
        #expect(log.counts == (logged: 2, suppressed: 0))
        #expect(lines.all == ["first", "seen earlier"])
    }

    /// The accept-failure log had the same underflow: a time older than the last line's (logged
    /// meanwhile by the other listener's loop) trapped.
    @Test func anAcceptFailureSeenBeforeTheLastLineCountsAfterIt() {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in Handler(lines: lines) }
        let clock = Mutex<UInt64>(50_000_000_000)
        let log = AcceptFailureLog(logger: logger, metrics: ServerMetrics(), nowNanos: { clock.withLock { $0 } })
        log.record(listener: "client", error: IOError(errnoCode: EMFILE, reason: "accept"))
        clock.withLock { $0 = 49_000_000_000 }
        log.record(listener: "metrics", error: IOError(errnoCode: EMFILE, reason: "accept"))
        #expect(lines.all.count == 1)
        #expect(log.summary.count == 2)
    }
}

/// The least CPU time of this thread over three runs of `body`: for comparing the cost of two
/// inputs as a ratio (the least run is the one least disturbed by other work on the machine).
func leastCPUNanos(_ body: () -> Void) -> UInt64 {
    func now() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }
    return (0..<3).map { _ in
        let start = now()
        body()
        return now() - start
    }.min()!
}
