import NIOCore
import StockadeCore
import StockadeWire

/// What one RESP command asks for, once its arguments are checked.
enum Request: Equatable {
    /// Goes to the engine, in a batch with the other engine commands of the same read.
    case engine(Command)
    case ping(ByteBuffer?)
    case echo(ByteBuffer)
    case quit
    case auth(user: ByteBuffer?, password: ByteBuffer)
    case info(section: String?)
    case shutdown
    case snapshot
    /// EVENTS: `from` nil for `$`, the position after the last durable one when the command runs.
    case events(from: UInt64?, count: Int, blockMillis: Int)
    /// LOG.TERM position: the primary term in force at a durable position of the log.
    case logTerm(UInt64)
    /// COMMAND and its subcommands: answered with an empty array or map (clients only use it for
    /// hints), COMMAND COUNT with the number of commands.
    case commandInfo(count: Bool)
    /// CONFIG GET: the pattern's bytes, ASCII letters lowered.
    case configGet(pattern: [UInt8])
    /// CLIENT NO-EVICT, NO-TOUCH, REPLY ON: accepted (nothing to change).
    case clientAccepted
    case clientID
    /// CLIENT SETNAME, CLIENT SETINFO LIB-NAME / LIB-VER (shown by CLIENT LIST).
    case clientSet(ClientField, String)
    case clientGetName
    /// CLIENT INFO: this connection's line of CLIENT LIST.
    case clientInfo
    /// CLIENT LIST [TYPE normal|replica|master|pubsub] [ID id ...]: `replica` nil for any type,
    /// `matchesNone` for the types Stockade has none of.
    case clientList(ids: [Int64]?, replica: Bool?, matchesNone: Bool)
    case clientKill(ClientKillFilter)
    /// HELLO [2|3 [AUTH user password] [SETNAME name]]: the version is nil, 2 or 3 (others are refused here).
    case hello(version: Int?, password: ByteBuffer?, name: String? = nil)
    case select(Int)
    /// REPLICATE next [LISTENING-PORT port] [LAST fingerprint] [EPOCH epoch start] [FULLCOPY]: this
    /// connection becomes a replica's log stream (see ``ReplicaRequest``).
    case replicate(ReplicaRequest)
    case role
    /// REPLICAOF host port (SLAVEOF is the same).
    case replicaOf(host: String, port: Int)
    /// REPLICAOF NO ONE: a replica becomes a primary.
    case promote
    /// WAIT numreplicas timeout: until that many replicas acknowledged every change made before it.
    case wait(replicas: Int, timeoutMillis: Int)
    /// MULTI, EXEC, DISCARD: a transaction is opened and closed as in Redis, so a client's state stays
    /// in step, but no command runs inside it (see ``CommandTable/parseInTransaction(_:)``).
    case multi
    case exec
    case discard
    /// A reply to send as is: a wrong argument, an unknown command.
    case invalid(String)

    /// Whether it runs in a round of its own when commands come before it in the same read: REPLICATE
    /// (the connection becomes a log stream after it), and the commands that can wait (WAIT, EVENTS ...
    /// BLOCK), so the replies before them are written before they wait, as Redis writes them before it
    /// blocks a client.
    var needsOwnRound: Bool {
        switch self {
        case .replicate, .wait: true
        case .events(_, _, let blockMillis): blockMillis > 0
        default: false
        }
    }

    /// The name used in metrics.
    var metricName: String {
        switch self {
        case .engine(let command):
            switch command {
            case .addSku: "sku.add"
            case .restock: "sku.restock"
            case .setPaused(_, let paused): paused ? "sku.pause" : "sku.resume"
            case .stock: "stock"
            case .audit: "audit"
            case .reserve(_, let lines, _, _): lines.count == 1 ? "reserve" : "buy"
            case .confirm: "confirm"
            case .cancel: "cancel"
            case .order: "order"
            case .orders: "orders"
            case .deduct: "deduct"
            }
        case .ping: "ping"
        case .echo: "echo"
        case .quit: "quit"
        case .auth: "auth"
        case .info: "info"
        case .shutdown: "shutdown"
        case .snapshot: "snapshot"
        case .events: "events"
        case .logTerm: "log.term"
        case .commandInfo: "command"
        case .configGet: "config"
        case .clientAccepted, .clientID, .clientSet, .clientGetName, .clientInfo, .clientList, .clientKill: "client"
        case .hello: "hello"
        case .select: "select"
        case .replicate: "replicate"
        case .role: "role"
        case .replicaOf, .promote: "replicaof"
        case .wait: "wait"
        case .multi: "multi"
        case .exec: "exec"
        case .discard: "discard"
        case .invalid: "invalid"
        }
    }
}

/// Bounds of EVENTS.
enum EventLimits {
    static let countDefault = 100
    /// One reply of at most 10,000 events keeps a slow consumer's buffer bounded.
    static let countMax = 10_000
    /// A consumer re-issues EVENTS after this at the latest.
    static let blockMillisMax = 60_000
}

/// Bounds of ORDERS pages.
enum OrdersLimits {
    /// A page of 100 orders is at most about 600 KiB (64-SKU baskets of 64-byte ids), usually ~15 KiB.
    static let countDefault = 100
    /// Bounds one reply (and the engine's work for it): a user with more pages with AFTER.
    static let countMax = 1000
}

/// A command name or option word, matched as ASCII bytes without regard to case (as Redis does):
/// up to 15 bytes packed into two words with the length, so a lookup is two compares and no
/// `String` is ever made of what a client sent.
struct Word: Hashable {
    let low: UInt64
    let high: UInt64

    /// Longer than any name we know: such an argument is no word of ours.
    static let bytesMax = 15

    /// nil when the bytes are empty or longer than ``bytesMax``.
    init?(_ raw: UnsafeRawBufferPointer) {
        let count = raw.count
        guard count >= 1, count <= Self.bytesMax else { return nil }
        var low: UInt64 = 0, high: UInt64 = 0
        for i in 0..<count {
            var byte = raw[i]
            if byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z") { byte -= 32 }
            if i < 8 { low |= UInt64(byte) << (8 * UInt64(i)) } else { high |= UInt64(byte) << (8 * UInt64(i - 8)) }
        }
        self.low = low
        self.high = high | UInt64(count) << 56
    }

    /// nil when the bytes are empty or longer than ``bytesMax``.
    init?(_ bytes: ByteBuffer) {
        guard let word = bytes.withUnsafeReadableBytes({ Word($0) }) else { return nil }
        self = word
    }

    init(_ literal: StaticString) {
        self.init(ByteBuffer(staticString: literal))!
    }

    static let req = Word("REQ"), ttl = Word("TTL"), limit = Word("LIMIT"), count = Word("COUNT")
    static let block = Word("BLOCK"), auth = Word("AUTH"), setname = Word("SETNAME"), get = Word("GET")
    static let after = Word("AFTER")
}

/// The command a request names.
enum Verb: CaseIterable {
    case ping, echo, quit, auth, info, shutdown, snapshot, save, bgsave, command, config, client, hello, select
    case skuAdd, skuRestock, skuPause, skuResume, stock, audit, reserve, buy, confirm, cancel, order, orders, deduct, events, logTerm
    case replicate, role, replicaof, slaveof, wait, multi, exec, discard

    /// The name as clients spell it (in lower case, as Redis shows it in errors).
    var name: String {
        switch self {
        case .skuAdd: "sku.add"
        case .skuRestock: "sku.restock"
        case .skuPause: "sku.pause"
        case .skuResume: "sku.resume"
        case .logTerm: "log.term"
        default: "\(self)"
        }
    }

    /// Commands allowed before AUTH when a password is set.
    var allowedBeforeAuth: Bool {
        switch self {
        case .auth, .ping, .quit, .hello: true
        default: false
        }
    }

    /// The command named `word`, or nil. Runs for every command: a multiplicative hash of the
    /// packed name picks a slot of a small open-addressed table (no `Hasher`, whose seeded SipHash
    /// cost more than the rest of the lookup), and one or two compares of two words settle it.
    static func named(_ word: Word) -> Verb? {
        let table = Self.table
        var slot = Self.slot(of: word)
        while let (name, verb) = table[slot] {
            if name == word { return verb }
            slot = (slot + 1) & (Self.tableSlots - 1)
        }
        return nil
    }

    /// A power of two, at least twice the commands, so probes stay short and one slot is always free.
    private static let tableSlots = 128

    private static func slot(of word: Word) -> Int {
        Int(truncatingIfNeeded: ((word.low ^ word.high &* 31) &* 0x9E37_79B9_7F4A_7C15) >> 57) & (tableSlots - 1)
    }

    /// Every command by its name, built once.
    private static let table: [(Word, Verb)?] = {
        precondition(allCases.count * 2 <= tableSlots, "the command table needs more slots")
        var table = [(Word, Verb)?](repeating: nil, count: tableSlots)
        for verb in allCases {
            let word = Word(ByteBuffer(string: verb.name))!
            var slot = slot(of: word)
            while table[slot] != nil { slot = (slot + 1) & (tableSlots - 1) }
            table[slot] = (word, verb)
        }
        return table
    }()
}

/// Parses the arguments of one command into a ``Request``. Works on bytes only: names and option
/// words are compared as ASCII without regard to case, ids go to the engine as the bytes sent (their
/// length checked first), numbers are read from ASCII digits. Cost is linear in the arguments' bytes.
enum CommandTable {
    /// An id as the engine takes it: the bytes as sent. The one place that says how an argument
    /// becomes an id.
    static func id(_ argument: UnsafeRawBufferPointer) -> Name {
        Name(argument)
    }

    static let notInteger = Request.invalid("ERR value is not an integer or out of range")
    static let noAuth = Request.invalid("NOAUTH Authentication required.")

    /// The request `arguments` make. Before authentication (`authenticated` false) only the
    /// commands allowed then are looked at beyond their name.
    static func parse(_ arguments: RESPParser.Arguments, authenticated: Bool = true) -> Request {
        arguments.withUnsafeArguments { parse($0, authenticated: authenticated) }
    }

    /// The request of the given arguments (for tests and callers off the hot path).
    static func parse(_ arguments: [ByteBuffer], authenticated: Bool = true) -> Request {
        parse(RESPParser.Arguments(arguments), authenticated: authenticated)
    }

    /// What ``parse(_:authenticated:)`` makes of `arguments` when it is a DEDUCT, or a RESERVE of
    /// one SKU without a request id (`RESERVE user sku quantity [TTL ms]`), accepted as an engine
    /// command, in the form the engine's sold-out answer reads (``Engine/soldOutAnswer(to:memo:)``);
    /// nil for anything else, which ``parse(_:authenticated:)`` then reads. Builds no request: a
    /// read of sold-out requests answered from the counters makes no ``Command`` at all.
    /// `CommandTableTests` holds it to what ``parse(_:authenticated:)`` makes of the same arguments.
    static func soldOutCandidate(_ arguments: RESPParser.UnsafeArguments, authenticated: Bool) -> Engine.SoldOutCandidate? {
        guard authenticated, let verb = Word(arguments[0]).flatMap(Verb.named) else { return nil }
        let argc = arguments.count - 1
        switch verb {
        case .deduct:
            guard argc == 1 || argc == 2, hasIdLength(arguments[1]) else { return nil }
            var quantity: Int64 = 1
            if argc == 2 {
                guard let value = integer(arguments[2]) else { return nil }
                quantity = value
            }
            return .deduct(sku: id(arguments[1]), quantity: quantity)
        case .reserve:
            guard argc == 3 || (argc == 5 && Word(arguments[4]) == .ttl),
                  hasIdLength(arguments[1]), hasIdLength(arguments[2]), let quantity = integer(arguments[3])
            else { return nil }
            var ttl: Int64?
            if argc == 5 {
                guard let value = integer(arguments[5]) else { return nil }
                ttl = value
            }
            return .reserve(user: id(arguments[1]), sku: id(arguments[2]), quantity: quantity, ttlMillis: ttl)
        default:
            return nil
        }
    }

    /// The request `arguments` make, read in place: arguments that become part of the request (ids,
    /// ECHO's message) are copied out of the read buffer, so the request outlives it.
    static func parse(_ arguments: RESPParser.UnsafeArguments, authenticated: Bool) -> Request {
        guard let verb = Word(arguments[0]).flatMap(Verb.named) else {
            // Before AUTH too, as Redis 7 answers (its name check comes before the password's).
            return .invalid("ERR unknown command '\(shown(arguments[0]))'")
        }
        if !authenticated && !verb.allowedBeforeAuth { return noAuth }
        // The arguments after the name, read from `arguments` in place: a slice of them (or a copy of
        // one) would retain the array or the argument's storage for every command.
        let argc = arguments.count - 1
        @inline(__always) func arg(_ i: Int) -> UnsafeRawBufferPointer { arguments[1 + i] }
        var first: UnsafeRawBufferPointer? { argc > 0 ? arguments[1] : nil }
        // Built only when needed: the hot path makes no message.
        var wrongArity: Request { .invalid("ERR wrong number of arguments for '\(verb.name)' command") }
        func arity(_ ok: Bool) -> Request? { ok ? nil : wrongArity }

        switch verb {
        case .ping:
            return arity(argc <= 1) ?? .ping(first.map { ByteBuffer(bytes: $0) })
        case .echo:
            return arity(argc == 1) ?? .echo(ByteBuffer(bytes: arg(0)))
        case .quit:
            return .quit
        case .auth:
            if argc == 1 { return .auth(user: nil, password: ByteBuffer(bytes: arg(0))) }
            if argc == 2 { return .auth(user: ByteBuffer(bytes: arg(0)), password: ByteBuffer(bytes: arg(1))) }
            return wrongArity
        case .info:
            return arity(argc <= 1) ?? .info(section: first.map(section))
        case .shutdown:
            // Redis's options: NOSAVE is what Stockade always does (the log is synced; no snapshot is
            // taken). The others would promise what it does not do, and a typo must not stop the
            // server, so anything else is refused rather than ignored.
            guard let option = first else { return .shutdown }
            guard argc == 1, Word(option) == Word("NOSAVE") else {
                return .invalid("ERR syntax error: SHUTDOWN takes no option but NOSAVE (every shutdown syncs the log; SNAPSHOT takes a snapshot first)")
            }
            return .shutdown
        case .snapshot, .save, .bgsave:
            return arity(argc == 0) ?? .snapshot
        case .command:
            return .commandInfo(count: argc == 1 && Word(arg(0)) == Word("COUNT"))
        case .config:
            guard argc == 2, Word(arg(0)) == .get else { return .invalid("ERR only CONFIG GET <pattern> is supported") }
            return .configGet(pattern: lowered(arg(1)))
        case .client:
            switch first.flatMap(Word.init) {
            case Word("SETNAME"):
                guard argc == 2 else { return wrongArity }
                return clientNameProblem(arg(1)) ?? .clientSet(.name, String(decoding: arg(1), as: UTF8.self))
            case Word("SETINFO"):
                guard argc == 3 else { return wrongArity }
                let field: ClientField
                switch Word(arg(1)) {
                case Word("LIB-NAME"): field = .libraryName
                case Word("LIB-VER"): field = .libraryVersion
                default: return .invalid("ERR Unrecognized option '\(shown(arg(1)))'")
                }
                return clientNameProblem(arg(2)) ?? .clientSet(field, String(decoding: arg(2), as: UTF8.self))
            case Word("GETNAME"):
                return arity(argc == 1) ?? .clientGetName
            case Word("INFO"):
                return arity(argc == 1) ?? .clientInfo
            case Word("LIST"):
                return clientList(arguments[2...])
            case Word("KILL"):
                return clientKill(arguments[2...])
            case Word("NO-EVICT"), Word("NO-TOUCH"): return .clientAccepted
            case Word("REPLY"):
                // Replies cannot be turned off: a client that believed them off would read each
                // later reply as the answer to a later command.
                guard argc == 2, Word(arg(1)) == Word("ON") else {
                    return .invalid("ERR CLIENT REPLY takes only ON here: every command is answered")
                }
                return .clientAccepted
            case Word("ID"): return .clientID
            default: return .invalid("ERR unknown CLIENT subcommand")
            }
        case .hello:
            return hello(arguments[1...])
        case .multi:
            return arity(argc == 0) ?? .multi
        case .exec:
            return arity(argc == 0) ?? .exec
        case .discard:
            return arity(argc == 0) ?? .discard
        case .select:
            guard argc == 1 else { return wrongArity }
            guard let db = integer(arg(0)) else { return notInteger }
            return .select(Int(db))

        case .skuAdd:
            guard argc == 2 || argc == 4 else { return wrongArity }
            if let refusal = idProblem(arg(0), "SKU") { return refusal }
            guard let total = integer(arg(1)) else { return notInteger }
            var limit: Int64 = 0
            if argc == 4 {
                guard Word(arg(2)) == .limit else { return .invalid("ERR syntax error: expected LIMIT n") }
                guard let value = integer(arg(3)) else { return notInteger }
                limit = value
            }
            return .engine(.addSku(sku: id(arg(0)), total: total, limit: limit))
        case .skuRestock:
            guard argc == 2 else { return wrongArity }
            if let refusal = idProblem(arg(0), "SKU") { return refusal }
            guard let delta = integer(arg(1)) else { return notInteger }
            return .engine(.restock(sku: id(arg(0)), delta: delta))
        case .skuPause, .skuResume:
            guard argc == 1 else { return wrongArity }
            if let refusal = idProblem(arg(0), "SKU") { return refusal }
            return .engine(.setPaused(sku: id(arg(0)), paused: verb == .skuPause))
        case .stock:
            guard argc == 1 else { return wrongArity }
            if let refusal = idProblem(arg(0), "SKU") { return refusal }
            return .engine(.stock(sku: id(arg(0))))
        case .audit:
            guard argc <= 1 else { return wrongArity }
            if let sku = first, let refusal = idProblem(sku, "SKU") { return refusal }
            return .engine(.audit(sku: first.map(id)))
        case .reserve, .buy:
            guard argc >= 3 else { return wrongArity }
            return reserve(arguments[1...], basket: verb == .buy)
        case .confirm, .cancel, .order:
            guard argc == 1 else { return wrongArity }
            // An id that is not a number cannot be an order of ours.
            let order = orderID(arg(0)) ?? OrderID(rawValue: 0)
            switch verb {
            case .confirm: return .engine(.confirm(order))
            case .cancel: return .engine(.cancel(order))
            default: return .engine(.order(order))
            }
        case .orders:
            // ORDERS user [AFTER order-id] [COUNT n]
            guard argc >= 1, argc % 2 == 1 else { return wrongArity }
            if let refusal = idProblem(arg(0), "user") { return refusal }
            var after: OrderID?
            var count = OrdersLimits.countDefault
            var i = 1
            while i + 1 < argc {
                switch Word(arg(i)) {
                case .after:
                    guard let order = orderID(arg(i + 1)) else { return .invalid("ERR AFTER needs an order id (an unsigned 64-bit number)") }
                    after = order
                case .count:
                    guard let value = integer(arg(i + 1)), value >= 1, value <= Int64(OrdersLimits.countMax) else {
                        return .invalid("ERR COUNT must be 1 to \(OrdersLimits.countMax)")
                    }
                    count = Int(value)
                default: return .invalid("ERR syntax error near '\(shown(arg(i)))': expected AFTER order-id or COUNT n")
                }
                i += 2
            }
            return .engine(.orders(user: id(arg(0)), after: after, count: count))
        case .deduct:
            guard argc == 1 || argc == 2 else { return wrongArity }
            if let refusal = idProblem(arg(0), "SKU") { return refusal }
            var quantity: Int64 = 1
            if argc == 2 {
                guard let value = integer(arg(1)) else { return notInteger }
                quantity = value
            }
            return .engine(.deduct(sku: id(arg(0)), quantity: quantity))
        case .logTerm:
            guard argc == 1 else { return wrongArity }
            guard let position = integer(arg(0)), position >= 0 else { return .invalid("ERR position must be 0 to \(Int64.max)") }
            return .logTerm(UInt64(position))
        case .events:
            guard argc >= 1, argc % 2 == 1 else { return wrongArity }
            // `$`: from the next position, for a consumer that starts "from now".
            let from: UInt64?
            if arg(0).elementsEqual("$".utf8) {
                from = nil
            } else {
                guard let value = integer(arg(0)), value >= 0 else { return .invalid("ERR from-position must be $ or 0 to \(Int64.max)") }
                from = UInt64(value)
            }
            var count = EventLimits.countDefault
            var block = 0
            var i = 1
            while i + 1 < argc {
                let value = integer(arg(i + 1))
                switch Word(arg(i)) {
                case .count:
                    guard let value, value >= 1, value <= Int64(EventLimits.countMax) else {
                        return .invalid("ERR COUNT must be 1 to \(EventLimits.countMax)")
                    }
                    count = Int(value)
                case .block:
                    guard let value, value >= 0, value <= Int64(EventLimits.blockMillisMax) else {
                        return .invalid("ERR BLOCK must be 0 to \(EventLimits.blockMillisMax) ms")
                    }
                    // BLOCK 0 waits as long as any wait may: Redis's XREAD BLOCK 0 waits for ever,
                    // and a consumer ported from it would otherwise ask again at once, in a loop.
                    block = value == 0 ? EventLimits.blockMillisMax : Int(value)
                default: return .invalid("ERR syntax error near '\(shown(arg(i)))': expected COUNT n or BLOCK ms")
                }
                i += 2
            }
            return .events(from: from, count: count, blockMillis: block)
        case .replicate:
            guard argc >= 1, argc <= 9 else { return wrongArity }
            guard let from = integer(arg(0)), from >= 0 else { return .invalid("ERR position must be 0 to \(Int64.max)") }
            var request = ReplicaRequest(from: UInt64(from))
            var i = 1
            while i < argc {
                if Word(arg(i)) == Word("FULLCOPY") {
                    request.fullCopy = true
                    i += 1
                } else if Word(arg(i)) == Word("LAST"), i + 1 < argc,
                          let value = String(validating: arg(i + 1), as: UTF8.self).flatMap({ UInt64($0, radix: 16) }) {
                    request.last = value
                    i += 2
                } else if Word(arg(i)) == Word("EPOCH"), i + 2 < argc, let epoch = integer(arg(i + 1)), epoch > 0,
                          let start = integer(arg(i + 2)), start > 0, start < from {
                    // The replica's newest term began at `start`, before the position it asks for.
                    request.lastTerm = EpochHistory.Term(epoch: UInt64(epoch), start: UInt64(start))
                    i += 3
                } else if Word(arg(i)) == Word("LISTENING-PORT"), i + 1 < argc, let port = integer(arg(i + 1)), port >= 0, port <= 65535 {
                    request.listeningPort = Int(port)
                    i += 2
                } else {
                    return .invalid("ERR syntax error: expected LISTENING-PORT 0-65535, LAST fingerprint, EPOCH epoch start (before the position) or FULLCOPY")
                }
            }
            return .replicate(request)
        case .role:
            return arity(argc == 0) ?? .role
        case .wait:
            guard argc == 2 else { return wrongArity }
            guard let replicas = integer(arg(0)), replicas >= 0, replicas <= 64 else { return .invalid("ERR numreplicas must be 0 to 64") }
            guard let timeout = integer(arg(1)) else { return .invalid("ERR timeout is not an integer or out of range") }
            guard timeout >= 0 else { return .invalid("ERR timeout is negative") }
            // 0 waits without a bound, as in Redis; any bound is held to a day.
            return .wait(replicas: Int(replicas), timeoutMillis: Int(min(timeout, 86_400_000)))
        case .replicaof, .slaveof:
            guard argc == 2 else { return wrongArity }
            if Word(arg(0)) == Word("NO"), Word(arg(1)) == Word("ONE") { return .promote }
            guard let port = integer(arg(1)), port >= 1, port <= 65535 else { return .invalid("ERR Invalid master port") }
            // A host name or address: printable ASCII without spaces (it is shown in INFO replication
            // and the log, one line each, and goes to the resolver as it is).
            guard arg(0).count <= 255, arg(0).allSatisfy({ (0x21...0x7E).contains($0) }),
                  let host = String(validating: arg(0), as: UTF8.self), !host.isEmpty
            else {
                return .invalid("ERR Invalid master host")
            }
            return .replicaOf(host: host, port: Int(port))
        }
    }

    /// RESERVE user sku qty [REQ id] [TTL ms]; BUY user sku qty [sku qty ...] [REQ id] [TTL ms].
    private static func reserve(_ list: Slice<RESPParser.UnsafeArguments>, basket: Bool) -> Request {
        let base = list.startIndex
        if let refusal = idProblem(list[base + 0], "user") { return refusal }
        var lines: [OrderLine] = []
        var i = 1
        while i + 1 < list.count, lines.isEmpty || !isOption(list[base + i]) {
            guard lines.count < Limits.itemsPerOrderMax else {
                return .invalid("ERR an order has 1 to \(Limits.itemsPerOrderMax) SKUs")
            }
            if let refusal = idProblem(list[base + i], "SKU") { return refusal }
            guard let quantity = integer(list[base + i + 1]) else { return notInteger }
            lines.append(OrderLine(sku: id(list[base + i]), quantity: quantity))
            i += 2
            if !basket { break }
        }
        var requestId: UnsafeRawBufferPointer?
        var ttl: Int64?
        while i < list.count {
            guard i + 1 < list.count else { return .invalid("ERR syntax error: \(shown(list[base + i])) needs a value") }
            // Each option once: a request id given twice is a client's mistake, not a choice to make
            // for it (which id keys the order?), as Redis's SET refuses EX twice.
            switch Word(list[base + i]) {
            case .req:
                guard requestId == nil else { return .invalid("ERR syntax error: REQ given twice") }
                if let refusal = idProblem(list[base + i + 1], "request") { return refusal }
                requestId = list[base + i + 1]
            case .ttl:
                guard ttl == nil else { return .invalid("ERR syntax error: TTL given twice") }
                guard let value = integer(list[base + i + 1]) else { return notInteger }
                ttl = value
            default: return .invalid("ERR syntax error near '\(shown(list[base + i]))': expected REQ id or TTL ms")
            }
            i += 2
        }
        return .engine(.reserve(user: id(list[base + 0]), lines: lines, requestId: requestId.map(id), ttlMillis: ttl))
    }

    /// HELLO [protover [AUTH user password] [SETNAME name]], checked in Redis's order: the version,
    /// then the options. A HELLO refused here changes nothing.
    private static func hello(_ args: Slice<RESPParser.UnsafeArguments>) -> Request {
        let list = Array(args)
        guard let first = list.first else { return .hello(version: nil, password: nil) }
        guard let version = integer(first) else { return .invalid("ERR Protocol version is not an integer or out of range") }
        guard version == 2 || version == 3 else { return .invalid("NOPROTO unsupported protocol version") }
        var password: ByteBuffer?
        var name: String?
        var i = 1
        while i < list.count {
            switch Word(list[i]) {
            case .auth:
                guard i + 2 < list.count else { return .invalid("ERR Syntax error in HELLO option 'AUTH'") }
                password = ByteBuffer(bytes: list[i + 2])
                i += 3
            case .setname:
                guard i + 1 < list.count else { return .invalid("ERR Syntax error in HELLO option 'SETNAME'") }
                if let problem = clientNameProblem(list[i + 1]) { return problem }
                name = String(decoding: list[i + 1], as: UTF8.self)
                i += 2
            default:
                return .invalid("ERR Syntax error in HELLO option '\(shown(list[i]))'")
            }
        }
        return .hello(version: Int(version), password: password, name: name)
    }

    /// CLIENT LIST [TYPE normal|replica|slave|master|pubsub] [ID id ...], as Redis reads it.
    private static func clientList(_ args: Slice<RESPParser.UnsafeArguments>) -> Request {
        let list = Array(args)
        var ids: [Int64]?
        var replica: Bool?
        var matchesNone = false
        var i = 0
        while i < list.count {
            switch Word(list[i]) {
            case Word("TYPE") where i + 1 < list.count:
                guard let type = clientType(list[i + 1]) else { return unknownClientType(list[i + 1]) }
                (replica, matchesNone) = type
                i += 2
            case Word("ID") where i + 1 < list.count:
                var chosen: [Int64] = []
                for word in list[(i + 1)...] {
                    guard let id = integer(word), id > 0 else { return .invalid("ERR Invalid client ID") }
                    chosen.append(id)
                }
                ids = chosen
                i = list.count
            default:
                return .invalid("ERR syntax error")
            }
        }
        return .clientList(ids: ids, replica: replica, matchesNone: matchesNone)
    }

    /// A client type of CLIENT LIST and KILL: whether it names replicas' streams (nil: any connection),
    /// and whether it names none (Stockade has no master links or pub/sub clients to list); nil for
    /// a word that is no type.
    private static func clientType(_ word: UnsafeRawBufferPointer) -> (replica: Bool?, matchesNone: Bool)? {
        switch Word(word) {
        case Word("NORMAL"): (false, false)
        case Word("REPLICA"), Word("SLAVE"): (true, false)
        case Word("MASTER"), Word("PUBSUB"): (nil, true)
        default: nil
        }
    }

    private static func unknownClientType(_ word: UnsafeRawBufferPointer) -> Request {
        .invalid("ERR Unknown client type '\(shown(word))'")
    }

    /// CLIENT KILL ip:port (the old form), or CLIENT KILL with filters: ID, ADDR, LADDR, TYPE, SKIPME.
    private static func clientKill(_ args: Slice<RESPParser.UnsafeArguments>) -> Request {
        let list = Array(args)
        var filter = ClientKillFilter()
        if list.count == 1 {
            filter.address = String(decoding: list[0], as: UTF8.self)
            filter.oldForm = true
            filter.skipMe = false
            return .clientKill(filter)
        }
        guard !list.isEmpty, list.count % 2 == 0 else { return .invalid("ERR syntax error") }
        for i in stride(from: 0, to: list.count, by: 2) {
            let value = list[i + 1]
            switch Word(list[i]) {
            case Word("ID"):
                guard let id = integer(value), id > 0 else { return .invalid("ERR client-id should be greater than 0") }
                filter.id = id
            case Word("ADDR"): filter.address = String(decoding: value, as: UTF8.self)
            case Word("LADDR"): filter.localAddress = String(decoding: value, as: UTF8.self)
            case Word("TYPE"):
                guard let type = clientType(value) else { return unknownClientType(value) }
                (filter.replica, filter.matchesNone) = type
            case Word("SKIPME"):
                switch Word(value) {
                case Word("YES"): filter.skipMe = true
                case Word("NO"): filter.skipMe = false
                default: return .invalid("ERR syntax error")
                }
            default:
                return .invalid("ERR syntax error")
            }
        }
        return .clientKill(filter)
    }

    /// Redis's rule for a client name (and CLIENT SETINFO's values): printable ASCII without spaces.
    private static func clientNameProblem(_ name: UnsafeRawBufferPointer) -> Request? {
        name.allSatisfy { $0 > 0x20 && $0 < 0x7F }
            ? nil : .invalid("ERR Client names cannot contain spaces, newlines or special characters.")
    }

    /// The request `arguments` make inside a transaction (after MULTI, until EXEC or DISCARD): Stockade
    /// runs no command there, so every one but those that end it (and QUIT) is refused, not queued, and
    /// the transaction's EXEC then answers EXECABORT, as Redis does when a command could not be queued.
    /// Nothing of the transaction runs. Before AUTH, MULTI itself is refused, so this is only reached
    /// by an authenticated connection.
    static func parseInTransaction(_ arguments: RESPParser.UnsafeArguments) -> Request {
        let verb = Word(arguments[0]).flatMap(Verb.named)
        switch verb {
        case .exec, .discard, .multi, .quit:
            return parse(arguments, authenticated: true)
        default:
            let name = verb?.name ?? shown(arguments[0])
            return .invalid("ERR Stockade runs no command inside MULTI: '\(name)' was not run, and EXEC will answer EXECABORT (send commands as a pipeline without MULTI; BUY places an order over several SKUs, all or nothing)")
        }
    }

    private static func isOption(_ word: UnsafeRawBufferPointer) -> Bool {
        let w = Word(word)
        return w == .req || w == .ttl
    }

    /// The refusal for an id of the wrong length (checked before the id is used for anything).
    /// The message is the engine's own for the same check.
    static func idProblem(_ argument: UnsafeRawBufferPointer, _ what: String) -> Request? {
        guard !hasIdLength(argument) else { return nil }
        return .invalid("ERR \(what) id must be 1 to \(Limits.nameBytesMax) bytes")
    }

    /// Whether an argument has the length of an id: 1 to ``Limits/nameBytesMax`` bytes.
    static func hasIdLength(_ argument: UnsafeRawBufferPointer) -> Bool {
        argument.count >= 1 && argument.count <= Limits.nameBytesMax
    }

    /// A signed 64-bit decimal, from ASCII digits.
    static func integer(_ argument: UnsafeRawBufferPointer) -> Int64? {
        RESPParser.decimal(argument).map { Int64($0) }
    }

    /// An order id as clients send it back: an unsigned 64-bit decimal, without a leading zero (as
    /// every other number: one id, one spelling).
    static func orderID(_ argument: UnsafeRawBufferPointer) -> OrderID? {
        let count = argument.count
        guard count >= 1, count <= 20, argument[0] != UInt8(ascii: "0") || count == 1 else { return nil }
        var value: UInt64 = 0
        for byte in argument {
            guard byte >= 48 && byte <= 57 else { return nil }
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (next, o2) = times10.addingReportingOverflow(UInt64(byte - 48))
            guard !o1 && !o2 else { return nil }
            value = next
        }
        return OrderID(rawValue: value)
    }

    /// ASCII letters lowered, every other byte kept.
    static func lowered(_ argument: UnsafeRawBufferPointer) -> [UInt8] {
        argument.map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 }
    }

    /// An INFO section name: at most 32 bytes, lowered (a longer one names no section).
    private static func section(_ argument: UnsafeRawBufferPointer) -> String {
        guard argument.count <= 32 else { return "?" }
        return String(decoding: lowered(argument), as: UTF8.self)
    }

    /// A client's argument in an error message: its first 64 bytes, printable ASCII as is and
    /// everything else as `\xHH`. Bounded and byte-wise: no Unicode work on what a client sent.
    static func shown(_ argument: UnsafeRawBufferPointer) -> String {
        let shownBytesMax = 64
        var text = ""
        for byte in argument.prefix(shownBytesMax) {
            if byte >= 0x20 && byte < 0x7F && byte != UInt8(ascii: "'") && byte != UInt8(ascii: "\\") {
                text.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                text += "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
            }
        }
        if argument.count > shownBytesMax { text += "..." }
        return text
    }
}

/// What a replica says when it asks for the log (REPLICATE): where its log ends and how, so the
/// primary can tell whether that log is a prefix of its own before streaming the rest.
struct ReplicaRequest: Equatable, Sendable {
    /// The first position the replica wants (its log ends just before it).
    var from: UInt64
    /// The port the replica serves clients on (ROLE, INFO).
    var listeningPort = 0
    /// A position the log no longer keeps is answered with the newest snapshot (a full copy).
    var fullCopy = false
    /// The fingerprint of the replica's record at `from - 1` (``LogReader/fingerprint(at:durable:)``).
    var last: UInt64?
    /// The replica's newest primary term (``EpochHistory``); nil: its log holds none.
    var lastTerm: EpochHistory.Term?
}
