import CJemalloc
import Dispatch
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import StockadeCore
import StockadeJournal
import StockadeWire
import Synchronization

/// What every connection shares: the engine, the store, limits, counters.
final class ServerContext: Sendable {
    let configuration: ServerConfiguration
    let store: Store
    let engine: Engine
    let metrics: ServerMetrics
    let logger: Logger
    let protocolErrorLog = ProtocolErrorLog()
    let startedNanos = monotonicNanos()
    let startedWallMillis = wallClockMillis()
    /// Called by SHUTDOWN.
    let requestShutdown: @Sendable () -> Void

    private struct Counters {
        var clients: [ObjectIdentifier: Channel] = [:]
        var connectionsReceived = 0
        var connectionsRejected = 0
        var roundsInFlight = 0
        var lastSnapshotLSN: UInt64 = 0
        var lastSnapshotNanos: UInt64 = 0
        var lastSnapshotDurationNanos: UInt64 = 0
        var snapshotsTaken = 0
    }

    private let counters: Mutex<Counters>

    init(configuration: ServerConfiguration, store: Store, logger: Logger, requestShutdown: @escaping @Sendable () -> Void) {
        self.configuration = configuration
        self.store = store
        engine = store.engine
        metrics = ServerMetrics()
        self.logger = logger
        self.requestShutdown = requestShutdown
        counters = Mutex(Counters(lastSnapshotLSN: store.recovery.snapshotLSN, lastSnapshotNanos: monotonicNanos()))
    }

    // MARK: Connections

    /// Counts a new connection; false when it would pass maxclients.
    func admit(_ channel: Channel) -> Bool {
        let admitted = counters.withLock { c in
            c.connectionsReceived += 1
            guard c.clients.count < configuration.maxClients else {
                c.connectionsRejected += 1
                return false
            }
            c.clients[ObjectIdentifier(channel)] = channel
            return true
        }
        if admitted {
            metrics.connectedClients.increment()
        } else {
            metrics.rejectedConnections.increment()
        }
        return admitted
    }

    func release(_ channel: Channel) {
        counters.withLock { _ = $0.clients.removeValue(forKey: ObjectIdentifier(channel)) }
        metrics.connectedClients.decrement()
    }

    var clientChannels: [Channel] { counters.withLock { Array($0.clients.values) } }
    var connectedCount: Int { counters.withLock { $0.clients.count } }

    func beginRound() { counters.withLock { $0.roundsInFlight += 1 } }
    func endRound() { counters.withLock { $0.roundsInFlight -= 1 } }
    var roundsInFlight: Int { counters.withLock { $0.roundsInFlight } }

    // MARK: Snapshots

    /// Takes a snapshot now (one at a time) and records it for INFO and metrics.
    func snapshot() async throws -> Store.SnapshotReport {
        let report = try await store.snapshot()
        counters.withLock { c in
            c.lastSnapshotLSN = report.written.lsn
            c.lastSnapshotNanos = monotonicNanos()
            c.lastSnapshotDurationNanos = report.durationNanos
            c.snapshotsTaken += 1
        }
        metrics.snapshotDurationSeconds.set(Double(report.durationNanos) / 1e9)
        logger.info("\(report)")
        return report
    }

    /// Whether the cadence asks for a snapshot now.
    func snapshotDue() -> Bool {
        let durable = store.journal.lastDurableLSN
        let (lastLSN, lastNanos) = counters.withLock { ($0.lastSnapshotLSN, $0.lastSnapshotNanos) }
        metrics.snapshotAgeSeconds.set(Double(monotonicNanos() - lastNanos) / 1e9)
        guard durable > lastLSN else { return false }
        if configuration.snapshotEveryChanges > 0, durable - lastLSN >= configuration.snapshotEveryChanges { return true }
        let seconds = configuration.snapshotEverySeconds
        return seconds > 0 && monotonicNanos() - lastNanos >= UInt64(seconds) * 1_000_000_000
    }

    // MARK: Commands answered without the engine

    func writeLocal(_ request: Request, clientID: ObjectIdentifier, into out: inout ByteBuffer) {
        switch request {
        case .ping(let message):
            if let message { out.writeRESPBulk(message) } else { out.writeRESPSimple("PONG") }
        case .echo(let message):
            out.writeRESPBulk(message)
        case .commandInfo:
            out.writeRESPArrayHeader(0)
        case .configGet(let pattern):
            let values: [(String, String)] = [
                ("save", ""), ("appendonly", configuration.fsync == .none ? "no" : "yes"),
                ("appendfsync", configuration.fsync.rawValue), ("maxclients", String(configuration.maxClients)),
                ("port", String(configuration.port)), ("databases", "1"),
            ]
            let matching = values.filter { globMatch(pattern, $0.0) }
            out.writeRESPArrayHeader(matching.count * 2)
            for (key, value) in matching { out.writeRESPBulk(key); out.writeRESPBulk(value) }
        case .clientAccepted:
            out.writeRESPSimple("OK")
        case .clientID:
            out.writeRESPInteger(Int64(truncatingIfNeeded: UInt64(UInt(bitPattern: clientID.hashValue)) >> 1))
        case .hello(let version, _):
            // Replies are the same in RESP2 and RESP3 (no maps, sets or doubles), so both are
            // accepted; only this reply differs: a map for 3, an array for 2.
            if let version, version != 2 && version != 3 {
                out.writeRESPError("NOPROTO sorry, this protocol version is not supported")
                return
            }
            if version == 3 { out.writeRESP3MapHeader(7) } else { out.writeRESPArrayHeader(14) }
            out.writeRESPBulk("server"); out.writeRESPBulk("stockade")
            out.writeRESPBulk("version"); out.writeRESPBulk(stockadeVersion)
            out.writeRESPBulk("proto"); out.writeRESPInteger(Int64(version ?? 2))
            out.writeRESPBulk("id"); out.writeRESPInteger(1)
            out.writeRESPBulk("mode"); out.writeRESPBulk("standalone")
            out.writeRESPBulk("role"); out.writeRESPBulk("master")
            out.writeRESPBulk("modules"); out.writeRESPArrayHeader(0)
        case .select(let db):
            if db == 0 { out.writeRESPSimple("OK") } else { out.writeRESPError("ERR DB index is out of range") }
        case .invalid(let message):
            out.writeRESPError(message)
        default:
            out.writeRESPError("ERR internal: \(request.metricName) is not a local command")
        }
    }

    /// Runs the step that ends a round; returns its reply (nil: none) and whether to close after it.
    func run(step: RoundStep) async -> (ByteBuffer?, Bool) {
        var out = ByteBufferAllocator().buffer(capacity: 256)
        switch step {
        case .snapshot:
            do {
                _ = try await snapshot()
                out.writeRESPSimple("OK")
                metrics.count("snapshot", outcome: "ok")
            } catch {
                out.writeRESPError("ERR snapshot failed: \(error)")
                metrics.count("snapshot", outcome: "err")
            }
        case .shutdown:
            metrics.count("shutdown", outcome: "ok")
            logger.info("SHUTDOWN requested by a client")
            requestShutdown()
            return (nil, true)
        case .info(let section):
            out.writeRESPBulk(await info(section: section))
            metrics.count("info", outcome: "ok")
        case .events(let from, let count, let blockMillis):
            await events(from: from, count: count, blockMillis: blockMillis, into: &out)
        }
        return (out, false)
    }

    /// EVENTS: durable records from `from`, waiting up to `blockMillis` for the first one.
    func events(from: UInt64, count: Int, blockMillis: Int, into out: inout ByteBuffer) async {
        let start = max(from, 1)
        let deadline = monotonicNanos() + UInt64(blockMillis) * 1_000_000
        let reader = LogReader(directory: store.directory)
        while true {
            let durable = store.journal.lastDurableLSN
            if start <= durable {
                do {
                    let records = try reader.read(from: start, count: count, durable: durable)
                    if !records.isEmpty {
                        out.writeRESPArrayHeader(records.count)
                        for (position, record) in records {
                            ReplyEncoding.writeEvent(position: position, record: record, skuName: skuName, into: &out)
                        }
                        metrics.count("events", outcome: "ok")
                        return
                    }
                } catch .trimmed(let oldest) {
                    out.writeRESPError("TRIMMED \(oldest) events before position \(oldest) were removed after a snapshot; resume from \(oldest) or rebuild from STOCK and ORDERS")
                    metrics.count("events", outcome: "trimmed")
                    return
                } catch {
                    out.writeRESPError("ERR cannot read the log: \(error)")
                    metrics.count("events", outcome: "err")
                    return
                }
            }
            if blockMillis == 0 || monotonicNanos() >= deadline { break }
            try? await Task.sleep(for: .milliseconds(5))
        }
        out.writeRESPArrayHeader(0)
        metrics.count("events", outcome: "ok")
    }

    func skuName(_ shard: Int, _ index: UInt32) -> Name {
        guard shard < engine.shards.count else { return "?" }
        return engine.shards[shard].directory.name(at: Int(index)) ?? "?"
    }

    /// INFO, in Redis's `# Section` / `key:value` text.
    func info(section: String?) async -> String {
        let wanted = section.map { [$0] } ?? ["server", "clients", "stats", "persistence", "shards", "memory"]
        let journal = store.journal
        let stats = journal.statistics
        let c = counters.withLock { $0 }
        var text = ""
        func add(_ title: String, _ pairs: [(String, String)]) {
            guard wanted.contains(title.lowercased()) || section == "all" || section == "everything" else { return }
            text += "# \(title)\r\n"
            for (key, value) in pairs { text += "\(key):\(value)\r\n" }
            text += "\r\n"
        }
        add("Server", [
            ("stockade_version", stockadeVersion), ("redis_version", "7.0.0-stockade"), ("process_id", String(getpid())),
            ("tcp_port", String(configuration.port)), ("uptime_in_seconds", String((monotonicNanos() - startedNanos) / 1_000_000_000)),
            ("shards", String(engine.shardCount)), ("data_dir", store.directory.path),
        ])
        add("Clients", [("connected_clients", String(c.clients.count)), ("maxclients", String(configuration.maxClients))])
        add("Stats", [
            ("total_connections_received", String(c.connectionsReceived)), ("rejected_connections", String(c.connectionsRejected)),
            ("log_records", String(stats.records)), ("log_batches", String(stats.batches)),
            ("rounds_in_flight", String(c.roundsInFlight)),
        ])
        let syncMeanMillis = stats.syncs > 0 ? Double(stats.syncNanosTotal) / Double(stats.syncs) / 1e6 : 0
        add("Persistence", [
            ("fsync", configuration.fsync.rawValue), ("log_position_appended", String(journal.lastAppendedLSN)),
            ("log_position_durable", String(journal.lastDurableLSN)), ("log_pending_bytes", String(journal.pendingBytes)),
            ("log_fsyncs", String(stats.syncs)), ("log_fsync_mean_ms", String(format: "%.3f", syncMeanMillis)),
            ("log_fsync_max_ms", String(format: "%.3f", Double(stats.syncNanosMax) / 1e6)),
            ("log_failure", journal.failureReason ?? ""),
            ("snapshots_taken", String(c.snapshotsTaken)), ("last_snapshot_position", String(c.lastSnapshotLSN)),
            ("last_snapshot_age_seconds", String((monotonicNanos() - c.lastSnapshotNanos) / 1_000_000_000)),
            ("last_snapshot_duration_ms", String(c.lastSnapshotDurationNanos / 1_000_000)),
            ("recovery", store.recovery.description),
        ])
        if wanted.contains("shards") || section == "all" || section == "everything" {
            var pairs: [(String, String)] = []
            for shard in engine.shards {
                let state = await shard.snapshotState()
                pairs.append(("shard\(shard.index)", "skus=\(state.skuCount),orders=\(state.orderCount)"))
            }
            add("Shards", pairs)
        }
        add("Memory", [("used_memory", String(allocatedBytes()))])
        return text
    }
}

/// A step that needs the server beyond the engine batch; it ends a connection's round.
enum RoundStep: Sendable {
    case snapshot, shutdown, info(String?), events(from: UInt64, count: Int, blockMillis: Int)
}

/// The version this build reports.
public let stockadeVersion = "0.1.0"

/// Bytes allocated and not freed, from jemalloc (the process allocator).
public func allocatedBytes() -> Int {
    var epoch: UInt64 = 1
    _ = mallctl("epoch", nil, nil, &epoch, MemoryLayout<UInt64>.size)
    var allocated = 0
    var size = MemoryLayout<Int>.size
    guard mallctl("stats.allocated", &allocated, &size, nil, 0) == 0 else { return 0 }
    return allocated
}

/// Redis-style glob with `*` and `?` (CONFIG GET patterns), on bytes (no Unicode work on what a
/// client sent). Iterative, remembering only the last `*`, so a pattern of many stars costs
/// O(pattern x text), never exponential time; our texts are short config names.
func globMatch(_ pattern: [UInt8], _ text: String) -> Bool {
    let p = pattern, t = Array(text.utf8)
    var i = 0, j = 0
    var star: Int?
    var resume = 0
    while j < t.count {
        if i < p.count && (p[i] == UInt8(ascii: "?") || p[i] == t[j]) {
            i += 1
            j += 1
        } else if i < p.count && p[i] == UInt8(ascii: "*") {
            star = i
            resume = j
            i += 1
        } else if let s = star {
            i = s + 1
            resume += 1
            j = resume
        } else {
            return false
        }
    }
    while i < p.count && p[i] == UInt8(ascii: "*") { i += 1 }
    return i == p.count
}

/// `stockade serve`: recovers the data directory, listens, and runs until SIGTERM, SIGINT or SHUTDOWN.
public final class StockadeServer: Sendable {
    public let configuration: ServerConfiguration
    private let logger: Logger
    private let stopRequested = Mutex<CheckedContinuation<Void, Never>?>(nil)
    private let stopFlag = Mutex(false)

    public init(configuration: ServerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Asks the server to stop (signals, SHUTDOWN). Safe to call more than once, from anywhere.
    public func requestStop() {
        let continuation = stopRequested.withLock { c -> CheckedContinuation<Void, Never>? in
            defer { c = nil }
            return c
        }
        stopFlag.withLock { $0 = true }
        continuation?.resume()
    }

    /// Runs until stopped. Returns after a graceful shutdown: the log is flushed and synced.
    public func run() async throws {
        if let problem = configuration.problem() { throw ServerError(message: problem) }
        var storeOptions = Store.Options(shardCount: configuration.shards)
        storeOptions.journal.fsync = configuration.fsync
        storeOptions.truncateCorrupt = configuration.truncateCorrupt
        storeOptions.coveredSegmentsKept = configuration.eventsRetentionSegments
        let store = try Store(path: configuration.dataDirectory, options: storeOptions)
        let state = store.recovery
        logger.info("recovered \(configuration.dataDirectory): \(state)")
        let context = ServerContext(configuration: configuration, store: store, logger: logger) { [self] in requestStop() }
        var skus = 0, orders = 0
        for shard in store.engine.shards {
            let copy = await shard.snapshotState()
            skus += copy.skuCount
            orders += copy.orderCount
        }
        logger.info("\(skus) SKUs and \(orders) orders on \(store.engine.shardCount) shards, log position \(state.lsn), fsync \(configuration.fsync.rawValue)")

        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.ioThreads > 0 ? configuration.ioThreads : max(1, System.coreCount))
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 << 10, high: 1 << 20))
            .childChannelOption(.autoRead, value: true)
            .childChannelOption(.allowRemoteHalfClosure, value: true)  // answer a client that half-closed (ConnectionHandler)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionHandler(server: context))
                }
            }
        let listener: Channel
        do {
            listener = try await bootstrap.bind(host: configuration.host, port: configuration.port).get()
        } catch {
            store.close()
            try? await group.shutdownGracefully()
            throw ServerError(message: "cannot listen on \(configuration.host):\(configuration.port): \(error)")
        }
        let port = listener.localAddress?.port ?? configuration.port
        logger.info("listening on \(configuration.host):\(port)")
        // A line the tests and scripts can wait for.
        FileHandle.standardOutput.write(Data("stockade listening on \(configuration.host):\(port)\n".utf8))

        var metricsListener: Channel?
        if let metricsPort = configuration.metricsPort {
            let metrics = context.metrics
            metricsListener = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                        try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(metrics: metrics))
                    }
                }
                .bind(host: configuration.host, port: metricsPort).get()
            logger.info("metrics on http://\(configuration.host):\(metricsListener?.localAddress?.port ?? metricsPort)/metrics")
        }

        let signals = installSignalHandlers()
        let background = Task { await self.housekeeping(context) }

        await withCheckedContinuation { continuation in
            let alreadyStopped = stopFlag.withLock { $0 }
            if alreadyStopped { continuation.resume() } else { stopRequested.withLock { $0 = continuation } }
        }

        logger.info("shutting down: no new connections, answering what is in flight")
        background.cancel()
        try? await listener.close()
        try? await metricsListener?.close()
        let graceEnd = monotonicNanos() + UInt64(configuration.shutdownGraceSeconds) * 1_000_000_000
        while context.roundsInFlight > 0 && monotonicNanos() < graceEnd {
            try? await Task.sleep(for: .milliseconds(5))
        }
        for channel in context.clientChannels { try? await channel.close() }
        store.close()
        logger.info("log flushed and synced at position \(store.journal.lastDurableLSN); bye")
        for source in signals { source.cancel() }
        try? await group.shutdownGracefully()
    }

    /// Expiry every 10 ms, snapshot cadence and metrics every second.
    private func housekeeping(_ context: ServerContext) async {
        var ticks = 0
        while !Task.isCancelled {
            await context.engine.expire(now: wallClockMillis())
            ticks += 1
            if ticks % 100 == 0 {
                context.metrics.observe(context.store.journal)
                if context.snapshotDue() {
                    do { _ = try await context.snapshot() } catch { logger.error("snapshot failed: \(error)") }
                }
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    private func installSignalHandlers() -> [DispatchSourceSignal] {
        [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { [self] in
                logger.info("received signal \(number)")
                requestStop()
            }
            source.resume()
            return source
        }
    }
}

/// Why the server cannot start.
public struct ServerError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}
