import StockadeCore

/// What one RESP command asks for, once its arguments are checked.
enum Request: Equatable {
    /// Goes to the engine, in a batch with the other engine commands of the same read.
    case engine(Command)
    case ping(String?)
    case echo(String)
    case quit
    case auth(user: String?, password: String)
    case info(section: String?)
    case shutdown
    case snapshot
    case events(from: UInt64, count: Int, blockMillis: Int)
    /// COMMAND and its subcommands: answered with an empty array (clients only use it for hints).
    case commandInfo
    case configGet(pattern: String)
    /// CLIENT SETINFO / SETNAME and the like: accepted and ignored.
    case clientAccepted
    case clientID
    /// HELLO [version [AUTH user password] [SETNAME name]]
    case hello(version: Int?, password: String?)
    case select(Int)
    /// A reply to send as is: a wrong argument, an unknown command.
    case invalid(String)

    /// Commands allowed before AUTH when a password is set.
    var allowedBeforeAuth: Bool {
        switch self {
        case .auth, .ping, .quit, .hello, .invalid: true
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
        case .commandInfo: "command"
        case .configGet: "config"
        case .clientAccepted, .clientID: "client"
        case .hello: "hello"
        case .select: "select"
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

/// Parses the arguments of one command into a ``Request``. Names are case-insensitive, as in Redis.
enum CommandTable {
    static func parse(_ arguments: [String]) -> Request {
        let name = arguments[0].uppercased()
        let args = arguments.dropFirst()
        func arity(_ ok: Bool) -> Request? { ok ? nil : .invalid("ERR wrong number of arguments for '\(arguments[0].lowercased())' command") }
        func integer(_ text: String) -> Int64? { Int64(text) }
        let notInteger = Request.invalid("ERR value is not an integer or out of range")

        switch name {
        case "PING":
            return arity(args.count <= 1) ?? .ping(args.first)
        case "ECHO":
            return arity(args.count == 1) ?? .echo(args[args.startIndex])
        case "QUIT":
            return .quit
        case "AUTH":
            if args.count == 1 { return .auth(user: nil, password: args[args.startIndex]) }
            if args.count == 2 { return .auth(user: args[args.startIndex], password: args[args.startIndex + 1]) }
            return arity(false)!
        case "INFO":
            return arity(args.count <= 1) ?? .info(section: args.first?.lowercased())
        case "SHUTDOWN":
            return .shutdown
        case "SNAPSHOT", "SAVE", "BGSAVE":
            return arity(args.isEmpty) ?? .snapshot
        case "COMMAND":
            return .commandInfo
        case "CONFIG":
            guard args.count == 2, args[args.startIndex].uppercased() == "GET" else {
                return .invalid("ERR only CONFIG GET <pattern> is supported")
            }
            return .configGet(pattern: args[args.startIndex + 1])
        case "CLIENT":
            switch args.first?.uppercased() {
            case "SETINFO", "SETNAME", "NO-EVICT", "NO-TOUCH", "REPLY": return .clientAccepted
            case "ID": return .clientID
            default: return .invalid("ERR unknown CLIENT subcommand")
            }
        case "HELLO":
            let list = Array(args)
            guard let first = list.first else { return .hello(version: nil, password: nil) }
            guard let version = Int(first) else { return .invalid("NOPROTO unsupported protocol version") }
            var password: String?
            var i = 1
            while i < list.count {
                switch list[i].uppercased() {
                case "AUTH":
                    guard i + 2 < list.count else { return .invalid("ERR syntax error in HELLO option 'auth'") }
                    password = list[i + 2]
                    i += 3
                case "SETNAME":
                    guard i + 1 < list.count else { return .invalid("ERR syntax error in HELLO option 'setname'") }
                    i += 2
                default:
                    return .invalid("ERR syntax error in HELLO option '\(list[i])'")
                }
            }
            return .hello(version: version, password: password)
        case "SELECT":
            guard args.count == 1 else { return arity(false)! }
            guard let db = Int(args[args.startIndex]) else { return notInteger }
            return .select(db)

        case "SKU.ADD":
            guard args.count == 2 || args.count == 4 else { return arity(false)! }
            guard let total = integer(args[args.startIndex + 1]) else { return notInteger }
            var limit: Int64 = 0
            if args.count == 4 {
                guard args[args.startIndex + 2].uppercased() == "LIMIT" else { return .invalid("ERR syntax error: expected LIMIT n") }
                guard let value = integer(args[args.startIndex + 3]) else { return notInteger }
                limit = value
            }
            return .engine(.addSku(sku: Name(args[args.startIndex]), total: total, limit: limit))
        case "SKU.RESTOCK":
            guard args.count == 2 else { return arity(false)! }
            guard let delta = integer(args[args.startIndex + 1]) else { return notInteger }
            return .engine(.restock(sku: Name(args[args.startIndex]), delta: delta))
        case "SKU.PAUSE", "SKU.RESUME":
            return arity(args.count == 1) ?? .engine(.setPaused(sku: Name(args[args.startIndex]), paused: name == "SKU.PAUSE"))
        case "STOCK":
            return arity(args.count == 1) ?? .engine(.stock(sku: Name(args[args.startIndex])))
        case "AUDIT":
            return arity(args.count <= 1) ?? .engine(.audit(sku: args.first.map { Name($0) }))
        case "RESERVE", "BUY":
            // RESERVE user sku qty [REQ id] [TTL ms]; BUY user sku qty [sku qty ...] [REQ id] [TTL ms]
            guard args.count >= 3 else { return arity(false)! }
            let list = Array(args)
            let user = Name(list[0])
            var lines: [OrderLine] = []
            var i = 1
            while i + 1 < list.count, !isOption(list[i]) || lines.isEmpty {
                guard let quantity = integer(list[i + 1]) else { return notInteger }
                lines.append(OrderLine(sku: Name(list[i]), quantity: quantity))
                i += 2
                if name == "RESERVE" { break }
            }
            var requestId: Name?
            var ttl: Int64?
            while i < list.count {
                guard i + 1 < list.count else { return .invalid("ERR syntax error: \(list[i]) needs a value") }
                switch list[i].uppercased() {
                case "REQ": requestId = Name(list[i + 1])
                case "TTL":
                    guard let value = integer(list[i + 1]) else { return notInteger }
                    ttl = value
                default: return .invalid("ERR syntax error near '\(list[i])': expected REQ id or TTL ms")
                }
                i += 2
            }
            return .engine(.reserve(user: user, lines: lines, requestId: requestId, ttlMillis: ttl))
        case "CONFIRM", "CANCEL", "ORDER":
            guard args.count == 1 else { return arity(false)! }
            // An id that is not a number cannot be an order of ours.
            let id = OrderID(args[args.startIndex]) ?? OrderID(rawValue: 0)
            switch name {
            case "CONFIRM": return .engine(.confirm(id))
            case "CANCEL": return .engine(.cancel(id))
            default: return .engine(.order(id))
            }
        case "ORDERS":
            return arity(args.count == 1) ?? .engine(.orders(user: Name(args[args.startIndex])))
        case "DEDUCT":
            guard args.count == 1 || args.count == 2 else { return arity(false)! }
            var quantity: Int64 = 1
            if args.count == 2 {
                guard let value = integer(args[args.startIndex + 1]) else { return notInteger }
                quantity = value
            }
            return .engine(.deduct(sku: Name(args[args.startIndex]), quantity: quantity))
        case "EVENTS":
            guard args.count >= 1, args.count % 2 == 1 else { return arity(false)! }
            let list = Array(args)
            guard let from = UInt64(list[0]) else { return notInteger }
            var count = EventLimits.countDefault
            var block = 0
            var i = 1
            while i + 1 < list.count {
                guard let value = Int(list[i + 1]), value >= 0 else { return notInteger }
                switch list[i].uppercased() {
                case "COUNT":
                    guard value >= 1, value <= EventLimits.countMax else { return .invalid("ERR COUNT must be 1 to \(EventLimits.countMax)") }
                    count = value
                case "BLOCK":
                    guard value <= EventLimits.blockMillisMax else { return .invalid("ERR BLOCK must be 0 to \(EventLimits.blockMillisMax) ms") }
                    block = value
                default: return .invalid("ERR syntax error near '\(list[i])': expected COUNT n or BLOCK ms")
                }
                i += 2
            }
            return .events(from: from, count: count, blockMillis: block)
        default:
            let shown = arguments[0].prefix(64)
            return .invalid("ERR unknown command '\(shown)'")
        }
    }

    private static func isOption(_ word: String) -> Bool {
        let upper = word.uppercased()
        return upper == "REQ" || upper == "TTL"
    }
}
