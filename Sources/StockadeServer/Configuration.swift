#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import StockadeCore
import StockadeJournal
import StockadeWire

/// Everything `stockade serve` can be told. Each limit is explicit, with its default, its range
/// (``ServerConfiguration/problem()``) and why.
public struct ServerConfiguration: Sendable {
    public var host = "127.0.0.1"
    /// 7379: Redis's port with a 7, so both can run side by side.
    public var port = 7379
    public var dataDirectory = "./data"
    public var shards = 2
    public var fsync = FsyncPolicy.always
    public var truncateCorrupt = false
    /// Snapshot once this many records were logged since the last one (0: never by count).
    public var snapshotEveryChanges: UInt64 = 1_000_000
    /// Snapshot once this many seconds passed since the last one, if anything changed (0: never by time).
    public var snapshotEverySeconds = 3600
    /// Log segments wholly covered by the snapshots that are kept anyway, for EVENTS readers that lag.
    public var eventsRetentionSegments = 4
    /// The log writes zeros this many bytes ahead of its writes in its open segment, so that most
    /// syncs write only their batch's data (`Journal.Options.preallocationBytes`); 0: off.
    public var logPreallocateBytes = 1 << 20
    public var requirePassword: String?
    /// Connections beyond this are answered with an error and closed. Each costs a few KiB.
    public var maxClients = 10_000
    /// Prometheus text on http://metricsHost:metricsPort/metrics; nil: no metrics listener.
    public var metricsPort: Int?
    /// The metrics listener has no authentication, so it stays on loopback unless told otherwise;
    /// a non-loopback address needs a password set, like the main port.
    public var metricsHost = "127.0.0.1"
    /// Metrics connections open at once, past which a new one is closed at once: a scraper needs one,
    /// and every connection costs a file descriptor the clients may need.
    public var metricsConnectionsMax = 64
    /// A metrics connection that sends no complete request in this long is closed: an idle or
    /// trickling connection must not hold a descriptor (a scrape asks at once).
    public var metricsIdleSeconds = 5
    /// Changes a client may make per second (token bucket, burst of the same size); 0: no limit.
    public var rateLimitPerSecond = 0
    public var parserLimits = RESPParser.Limits()
    /// Bytes all connections together may hold for requests they have begun and not finished (a
    /// request's bytes wait in memory until its last byte arrives). Past it, the oldest unfinished
    /// requests are refused and their connections closed (``PartialRequestBudget``): idle clients
    /// that send most of a large request cannot make the server hold `--maxclients` times
    /// `--max-request-bytes`.
    public var partialRequestBytesMax = 512 << 20
    /// Replies buffered for a client that does not read, past which it is disconnected: a slow
    /// consumer must not hold the server's memory.
    public var clientOutputBytesMax = 64 << 20
    /// A client whose socket stays unwritable this long (it stopped reading) is disconnected.
    public var clientStallSeconds = 30
    /// SwiftNIO event-loop threads serving connections (0: one per core).
    public var ioThreads = 0
    /// How long shutdown waits for commands in flight to be answered.
    public var shutdownGraceSeconds = 10
    /// Follow this primary (`--replica-of HOST:PORT`): start read-only, apply its log.
    public var replicaOf: (host: String, port: Int)?
    /// The password the primary asks for (`--primary-auth`), sent with AUTH before REPLICATE.
    public var primaryPassword: String?
    /// Semi-synchronous replication: a change is answered only once this many replicas have it
    /// durably (0: answered once durable here). With fewer replicas connected, changes are refused.
    public var minReplicasToWrite = 0
    /// How long a change waits for those acknowledgements before it is answered NOREPLICAS.
    public var minReplicasTimeoutMillis = 10_000
    /// `--coordinator etcd://host:port`: etcd decides who is primary (docs/REPLICATION.md).
    public var coordinator: (host: String, port: Int)?
    /// `--cluster NAME`: the nodes that share a primary under the coordinator.
    public var cluster = "stockade"
    /// `--advertise HOST:PORT`: how other nodes reach this one (default: the listening address).
    public var advertise: String?
    /// `--lease-seconds`: the primary's etcd lease; a failover takes about this long.
    public var leaseSeconds = 2

    public init() {}

    /// `HOST:PORT` (the host may be a name, an IPv4 address, or an IPv6 address in brackets); nil
    /// when it is not one.
    public static func hostAndPort(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = String(host.dropFirst().dropLast())
        } else if host.contains(":") {
            return nil  // an IPv6 address needs its brackets: [::1]:7379
        }
        guard !host.isEmpty, let port = Int(text[text.index(after: colon)...]), (1...65535).contains(port) else { return nil }
        return (host, port)
    }

    /// The range of every setting, as `stockade serve` documents them (docs/OPERATIONS.md). Each
    /// bound keeps the arithmetic done with the value far from overflow (seconds become nanoseconds,
    /// byte limits get a few bytes added) and is generous beyond any sane use.
    public enum Range {
        public static let port = 0...65535
        /// Inline commands are one short line; 64 MiB bounds what one connection may buffer for one.
        public static let inlineBytes = 16...(64 << 20)
        /// Arguments are ids (at most 64 bytes), numbers and PING/ECHO payloads; Redis's hard maximum is 512 MiB.
        public static let bulkBytes = 16...(512 << 20)
        /// The longest command (BUY with 64 SKUs) has about 140 arguments.
        public static let arguments = 1...(1 << 20)
        /// A whole request: at least a small basket, at most 1 GiB (far past any command of ours).
        public static let requestBytes = 1024...(1 << 30)
        /// At least 1 MiB (a few reads' buffers: below it a request split across two reads could
        /// pass it alone) and twice the largest request (checked against `--max-request-bytes` too:
        /// a request's buffers grow by doubling), at most 1 TiB.
        public static let partialRequestBytes = (1 << 20)...(1 << 40)
        /// One descriptor each; no process gets a million.
        public static let clients = 1...1_000_000
        public static let rateLimit = 0...1_000_000_000
        /// At least 4 MiB: a page of ORDERS or EVENTS (about 1 MiB) fits beside the write buffer's high
        /// mark (1 MiB) with room, so every reply of bounded size reaches a client that reads (at 64 KiB,
        /// the least this once took, one page passed the limit and closed the client each time it was
        /// asked for). Above 1 TiB is no limit.
        public static let outputBytes = (4 << 20)...(1 << 40)
        /// A day.
        public static let stallSeconds = 1...86_400
        /// A year.
        public static let snapshotSeconds = 0...31_536_000
        /// More than any log holds between two snapshots (2^40 records).
        public static let snapshotChanges: ClosedRange<UInt64> = 0...(1 << 40)
        public static let retentionSegments = 0...100_000
        /// Up to 4 MiB: the zeros are written on the log's path and the next sync takes them to the
        /// disk, about 1.5 ms a megabyte here, so a step is a stall of one sync (a 64 MiB step held
        /// a loop for 80 ms at the first change after start-up; BENCHMARKS.md).
        public static let preallocateBytes = 0...(4 << 20)
        public static let ioThreads = 0...64
    }

    /// Longest password: what one argument may be before AUTH (16 KiB, as the connection limits it).
    public static let passwordBytesMax = 16 << 10

    /// The least open-files limit (`ulimit -n`) the server starts under: the descriptors it keeps for
    /// its own files and 8 for clients and the metrics listener.
    public static let openFilesLimitMin = StockadeServer.descriptorsReserved + 8

    /// Why the configuration cannot be served (a sentence naming the flag); nil when it can.
    /// Checked before anything is recovered or bound. Resolves `host` (and `metricsHost`).
    public func problem() -> String? {
        func outside<T: Comparable>(_ value: T, _ range: ClosedRange<T>, _ flag: String, _ note: String = "") -> String? {
            range.contains(value) ? nil : "\(flag) must be \(range.lowerBound) to \(range.upperBound)\(note), not \(value)"
        }
        let checks: [String?] = [
            outside(port, Range.port, "--port", " (0: any free port)"),
            metricsPort.flatMap { outside($0, Range.port, "--metrics-port", " (0: any free port)") },
            metricsPort != nil && metricsPort == port && port != 0 ? "--metrics-port must differ from --port" : nil,
            outside(shards, 1...Limits.shardCountMax, "--shards"),
            outside(maxClients, Range.clients, "--maxclients"),
            outside(rateLimitPerSecond, Range.rateLimit, "--rate-limit", " (0: no limit)"),
            outside(clientOutputBytesMax, Range.outputBytes, "--max-output-bytes"),
            outside(clientStallSeconds, Range.stallSeconds, "--client-stall-seconds"),
            outside(parserLimits.inlineBytesMax, Range.inlineBytes, "--max-inline-bytes"),
            outside(parserLimits.bulkBytesMax, Range.bulkBytes, "--max-bulk-bytes"),
            outside(parserLimits.argumentsMax, Range.arguments, "--max-arguments"),
            outside(parserLimits.requestBytesMax, Range.requestBytes, "--max-request-bytes"),
            outside(partialRequestBytesMax, Range.partialRequestBytes, "--max-partial-request-bytes"),
            // Halved, not doubled: the request limit may be far out of its range (checked above).
            parserLimits.requestBytesMax > partialRequestBytesMax / 2
                ? "--max-partial-request-bytes (\(partialRequestBytesMax)) must be at least twice --max-request-bytes (\(parserLimits.requestBytesMax)): one request of the largest size must fit, and its buffers take up to twice its bytes while they grow" : nil,
            outside(snapshotEveryChanges, Range.snapshotChanges, "--snapshot-every-changes", " (0: never by count)"),
            outside(snapshotEverySeconds, Range.snapshotSeconds, "--snapshot-every-seconds", " (0: never by time)"),
            outside(eventsRetentionSegments, Range.retentionSegments, "--events-retention-segments"),
            outside(logPreallocateBytes, Range.preallocateBytes, "--log-preallocate-bytes", " (0: off)"),
            outside(ioThreads, Range.ioThreads, "--io-threads", " (0: one per core)"),
            outside(minReplicasToWrite, 0...64, "--min-replicas-to-write", " (0: answer once durable here)"),
            outside(minReplicasTimeoutMillis, 1...3_600_000, "--min-replicas-timeout-ms"),
            outside(leaseSeconds, 1...60, "--lease-seconds"),
            coordinator != nil && replicaOf != nil ? "--replica-of and --coordinator exclude each other: under a coordinator, etcd names the primary" : nil,
            cluster.isEmpty || cluster.utf8.count > 128 || cluster.contains("/") ? "--cluster must be 1 to 128 bytes without '/'" : nil,
        ]
        if let first = checks.compactMap({ $0 }).first { return first }
        // Not a flag, but checked with them: the process's open-files limit must leave room for clients
        // beside the descriptors the server keeps for its own files. Below that it accepted no client
        // and, its descriptors gone, the runtime's thread-pool monitor trapped the process.
        let filesLimit = openFilesLimit()
        if filesLimit > 0, filesLimit < Self.openFilesLimitMin {
            return "the open-files limit (ulimit -n) must be at least \(Self.openFilesLimitMin), not \(filesLimit): the server keeps \(StockadeServer.descriptorsReserved) descriptors for its own files (log, snapshots, loops) and needs room for clients besides"
        }
        // AUTH must fit the limits a client has before it is authenticated (and the configured ones).
        let passwordBytesMax = min(Self.passwordBytesMax, parserLimits.bulkBytesMax, parserLimits.requestBytesMax - 64)
        if let password = requirePassword, password.utf8.count > passwordBytesMax {
            return "--requirepass must be at most \(passwordBytesMax) bytes (what AUTH may carry), not \(password.utf8.count)"
        }
        let passwordSet = !(requirePassword ?? "").isEmpty
        switch ListenAddress.resolve(host) {
        case .failure(let why): return "--host \(host): \(why)"
        case .success(let address) where !address.isLoopback && !passwordSet:
            return "refusing to listen on \(address.naming(host)) without a password: anyone who can reach it could place and cancel orders. "
                + "Set --requirepass, or bind 127.0.0.1."
        default: break
        }
        if metricsPort != nil {
            switch ListenAddress.resolve(metricsHost) {
            case .failure(let why): return "--metrics-host \(metricsHost): \(why)"
            case .success(let address) where !address.isLoopback && !passwordSet:
                return "refusing to serve metrics on \(address.naming(metricsHost)) without a password set: "
                    + "the metrics port has no authentication. Set --requirepass, or keep --metrics-host on loopback."
            default: break
            }
        }
        return nil
    }
}

/// A listening address decided by what a host name resolves to, not by how it is spelled:
/// `127.example.com` may well resolve to a public address.
public struct ListenAddress: Sendable, Equatable {
    /// The numeric address the listener binds (the first the resolver gave).
    public var numeric: String
    /// Every address the name resolved to is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x).
    public var isLoopback: Bool

    /// `host`, followed by the address it resolved to when that is spelled differently.
    func naming(_ host: String) -> String { numeric == host ? host : "\(host) (\(numeric))" }

    /// Resolves `host` with getaddrinfo (numeric addresses need no lookup).
    public static func resolve(_ host: String) -> Result<ListenAddress, ResolveError> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_flags = AI_PASSIVE
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, nil, &hints, &list)
        guard status == 0, let first = list else {
            return .failure(ResolveError(message: "cannot resolve it (\(String(cString: gai_strerror(status))))"))
        }
        defer { freeaddrinfo(list) }
        var numerics: [String] = []
        var allLoopback = true
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let info = entry {
            if let address = info.pointee.ai_addr {
                switch Int32(address.pointee.sa_family) {
                case AF_INET:
                    let ip = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                    let bytes = withUnsafeBytes(of: ip) { Array($0) }  // network order
                    numerics.append(bytes.map(String.init).joined(separator: "."))
                    allLoopback = allLoopback && bytes[0] == 127
                case AF_INET6:
                    let ip = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                    let bytes = withUnsafeBytes(of: ip) { Array($0) }
                    var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                    var copy = ip
                    inet_ntop(AF_INET6, &copy, &text, socklen_t(text.count))
                    numerics.append(text.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
                    let isOne = bytes[0..<15].allSatisfy { $0 == 0 } && bytes[15] == 1
                    let mapped = bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xff && bytes[11] == 0xff && bytes[12] == 127
                    allLoopback = allLoopback && (isOne || mapped)
                default:
                    allLoopback = false
                }
            }
            entry = info.pointee.ai_next
        }
        guard let chosen = numerics.first else { return .failure(ResolveError(message: "it resolved to no IP address")) }
        return .success(ListenAddress(numeric: chosen, isLoopback: allLoopback))
    }

    /// Why a host name could not be used.
    public struct ResolveError: Error, Sendable, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }
}
