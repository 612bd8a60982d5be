import ArgumentParser
import Foundation
import Logging
import StockadeCore
import StockadeJournal
import StockadeServer

/// `stockade serve`: the RESP-compatible server.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the engine over TCP with a RESP-compatible protocol (redis-cli, redis-benchmark and Redis clients work).")

    @Option(help: "Address to listen on. Anything that resolves to other than loopback requires --requirepass.")
    var host = "127.0.0.1"

    @Option(help: "TCP port, 0 to 65535 (0: any free port, printed at start).")
    var port = 7379

    @OptionGroup var store: StoreOptions

    @Option(name: .customLong("snapshot-every-changes"), help: "Snapshot after this many logged changes, 0 to 2^40 (0: never by count).")
    var snapshotEveryChanges: UInt64 = 1_000_000

    @Option(name: .customLong("snapshot-every-seconds"), help: "Snapshot after this many seconds if anything changed, 0 to 31536000 (0: never by time).")
    var snapshotEverySeconds = 3600

    @Option(name: .customLong("events-retention-segments"), help: "Log segments kept for EVENTS readers after a snapshot covers them, 0 to 100000.")
    var eventsRetentionSegments = 4

    @Option(name: .customLong("log-preallocate-bytes"), help: "Write zeros this far ahead of the log's writes in its segment, 0 to 4194304 (0: the file grows with each write).")
    var logPreallocateBytes = 1 << 20

    @Option(help: "Password clients must send with AUTH.")
    var requirepass: String?

    @Option(help: "Most client connections at once, 1 to 1000000.")
    var maxclients = 10_000

    @Option(name: .customLong("metrics-port"), help: "Serve Prometheus metrics on http://METRICS-HOST:PORT/metrics (no authentication).")
    var metricsPort: Int?

    @Option(name: .customLong("metrics-host"), help: "Address of the metrics listener; other than loopback requires --requirepass.")
    var metricsHost = "127.0.0.1"

    @Option(name: .customLong("rate-limit"), help: "Changes per second per client, 0 to 1000000000 (0: no limit); over it: -BUSY.")
    var rateLimit = 0

    @Option(name: .customLong("max-output-bytes"), help: "Unread reply bytes after which a client is disconnected, 4 MiB to 1 TiB.")
    var maxOutputBytes = 64 << 20

    @Option(name: .customLong("client-stall-seconds"), help: "Seconds a client may leave its replies unread before it is disconnected, 1 to 86400.")
    var clientStallSeconds = 30

    @Option(name: .customLong("max-inline-bytes"), help: "Longest inline command line, 16 bytes to 64 MiB.")
    var maxInlineBytes = 64 * 1024

    @Option(name: .customLong("max-bulk-bytes"), help: "Longest bulk string argument, 16 bytes to 512 MiB.")
    var maxBulkBytes = 512 * 1024

    @Option(name: .customLong("max-arguments"), help: "Most arguments in one command, 1 to 1048576.")
    var maxArguments = 1024

    @Option(name: .customLong("max-request-bytes"), help: "Largest request (one command with all its arguments), 1 KiB to 1 GiB.")
    var maxRequestBytes = 4 << 20

    @Option(name: .customLong("max-partial-request-bytes"), help: "Bytes all clients together may hold in requests begun and not finished; past it the oldest unfinished requests are refused and their clients closed. 1 MiB to 1 TiB, and at least twice --max-request-bytes.")
    var maxPartialRequestBytes = 512 << 20

    @Option(name: .customLong("io-threads"), help: "Event-loop threads for connections, 0 to 64 (0: one per core).")
    var ioThreads = 0

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    @Option(name: .customLong("replica-of"), help: "Follow the primary at HOST:PORT: read-only, its log applied here (docs/REPLICATION.md).")
    var replicaOf: String?

    @Option(name: .customLong("primary-auth"), help: "The password of the primary (its --requirepass), for --replica-of.")
    var primaryAuth: String?

    @Option(name: .customLong("min-replicas-to-write"), help: "Answer a change only once this many replicas have it durably, 0 to 64 (0: once durable here).")
    var minReplicasToWrite = 0

    @Option(name: .customLong("coordinator"), help: "etcd://HOST:PORT: etcd decides who is primary (leases; automatic failover).")
    var coordinator: String?

    @Option(name: .customLong("cluster"), help: "The name the nodes of one cluster share under --coordinator.")
    var cluster = "stockade"

    @Option(name: .customLong("advertise"), help: "HOST:PORT other nodes use to reach this one under --coordinator (default: the listening address).")
    var advertise: String?

    @Option(name: .customLong("lease-seconds"), help: "The primary's etcd lease, 1 to 60: a failover takes about this long.")
    var leaseSeconds = 2

    @Option(name: .customLong("min-replicas-timeout-ms"), help: "How long a change waits for those replicas before it is answered NOREPLICAS, 1 to 3600000.")
    var minReplicasTimeoutMillis = 10_000

    /// Every flag is checked here, before anything is recovered or bound: a bad one is a usage
    /// error (exit 64) with a sentence naming it, never a trap or a silent default later.
    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), not \(logLevel)")
        }
        if let coordinator, !coordinator.hasPrefix("etcd://") || ServerConfiguration.hostAndPort(String(coordinator.dropFirst(7))) == nil {
            throw ValidationError("--coordinator must be etcd://HOST:PORT, not \(coordinator)")
        }
        if let advertise, ServerConfiguration.hostAndPort(advertise) == nil {
            throw ValidationError("--advertise must be HOST:PORT, not \(advertise)")
        }
        if let replicaOf, ServerConfiguration.hostAndPort(replicaOf) == nil {
            throw ValidationError("--replica-of must be HOST:PORT with a port of 1 to 65535, not \(replicaOf)")
        }
        if let problem = configuration().problem() { throw ValidationError(problem) }
    }

    func configuration() -> ServerConfiguration {
        var config = ServerConfiguration()
        config.host = host
        config.port = port
        config.dataDirectory = store.path
        config.shards = store.shards
        config.fsync = FsyncPolicy(rawValue: store.fsync) ?? .always
        config.truncateCorrupt = store.truncateCorrupt
        config.snapshotEveryChanges = snapshotEveryChanges
        config.snapshotEverySeconds = snapshotEverySeconds
        config.eventsRetentionSegments = eventsRetentionSegments
        config.logPreallocateBytes = logPreallocateBytes
        config.requirePassword = requirepass
        config.maxClients = maxclients
        config.metricsPort = metricsPort
        config.metricsHost = metricsHost
        config.rateLimitPerSecond = rateLimit
        config.clientOutputBytesMax = maxOutputBytes
        config.clientStallSeconds = clientStallSeconds
        config.parserLimits.inlineBytesMax = maxInlineBytes
        config.parserLimits.bulkBytesMax = maxBulkBytes
        config.parserLimits.argumentsMax = maxArguments
        config.parserLimits.requestBytesMax = maxRequestBytes
        config.partialRequestBytesMax = maxPartialRequestBytes
        config.ioThreads = ioThreads
        config.replicaOf = replicaOf.flatMap(ServerConfiguration.hostAndPort)
        config.primaryPassword = primaryAuth
        config.coordinator = coordinator.flatMap { ServerConfiguration.hostAndPort(String($0.dropFirst("etcd://".count))) }
        config.cluster = cluster
        config.advertise = advertise
        config.leaseSeconds = leaseSeconds
        config.minReplicasToWrite = minReplicasToWrite
        config.minReplicasTimeoutMillis = minReplicasTimeoutMillis
        return config
    }

    func run() async throws {
        // A closed pipe on stdout or stderr (a log collector gone, `| head`) must fail a write, not
        // kill the server: SwiftNIO ignores SIGPIPE only once it makes its first socket, after
        // recovery has logged (Redis ignores it at start-up too).
        signal(SIGPIPE, SIG_IGN)
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let config = configuration()
        let logger = Logger(label: "stockade")
        do {
            try await StockadeServer(configuration: config, logger: logger).run()
        } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
    }
}
