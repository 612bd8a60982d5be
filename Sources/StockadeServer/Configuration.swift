import StockadeCore
import StockadeJournal
import StockadeWire

/// Everything `stockade serve` can be told. Each limit is explicit, with its default and why.
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
    public var requirePassword: String?
    /// Connections beyond this are answered with an error and closed. Each costs a few KiB.
    public var maxClients = 10_000
    /// Prometheus text on http://host:metricsPort/metrics; nil: no metrics listener.
    public var metricsPort: Int?
    /// Changes a client may make per second (token bucket, burst of the same size); 0: no limit.
    public var rateLimitPerSecond = 0
    public var parserLimits = RESPParser.Limits()
    /// Replies buffered for a client that does not read, past which it is disconnected: a slow
    /// consumer must not hold the server's memory.
    public var clientOutputBytesMax = 64 << 20
    /// A client whose socket stays unwritable this long (it stopped reading) is disconnected.
    public var clientStallSeconds = 30
    /// SwiftNIO event-loop threads serving connections (0: one per core).
    public var ioThreads = 0
    /// How long shutdown waits for commands in flight to be answered.
    public var shutdownGraceSeconds = 10

    public init() {}

    /// Why the configuration cannot be served; nil when it can.
    public func problem() -> String? {
        let loopback = host == "127.0.0.1" || host == "::1" || host == "localhost" || host.hasPrefix("127.")
        if !loopback && (requirePassword ?? "").isEmpty {
            return "refusing to listen on \(host) without a password: anyone who can reach it could place and cancel orders. "
                + "Set --requirepass, or bind 127.0.0.1."
        }
        if port < 0 || port > 65535 { return "--port must be 0 to 65535" }
        if shards < 1 || shards > Limits.shardCountMax { return "--shards must be 1 to \(Limits.shardCountMax)" }
        if maxClients < 1 { return "--maxclients must be at least 1" }
        if rateLimitPerSecond < 0 { return "--rate-limit must be 0 (none) or more" }
        if ioThreads < 0 || ioThreads > 64 { return "--io-threads must be 0 (one per core) to 64" }
        if let problem = parserLimits.problem() { return problem }
        return nil
    }
}
