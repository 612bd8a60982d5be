import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import StockadeJournal
import Synchronization

/// The server's Prometheus metrics (swift-prometheus), exposed as text on `/metrics`.
final class ServerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let commandCounters = Mutex<[Tally.Key: Counter]>([:])
    /// Every command counted by ``count(_:)-(Tally)`` (INFO's `total_commands_processed`).
    let commandsProcessed = Atomic<Int>(0)
    let roundDuration: DurationHistogram
    let connectedClients: Gauge
    let rejectedConnections: Counter
    let acceptFailures: Counter
    let logBatchRecords: ValueHistogram
    let fsyncSeconds: ValueHistogram
    let pendingLogBytes: Gauge
    let snapshotAgeSeconds: Gauge
    let snapshotDurationSeconds: Gauge
    let logPosition: Gauge
    /// Rounds with large replies (``HeavyRounds``) that took their turn at once, and that waited for it.
    let heavyRoundsAtOnce: Counter
    let heavyRoundsWaited: Counter

    init() {
        roundDuration = registry.makeDurationHistogram(
            name: "stockade_read_duration_seconds",
            buckets: [.microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
                      .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(50), .milliseconds(250), .seconds(1)],
            help: "From a read that carried commands to their replies being written (a pipelined read counts once).")
        connectedClients = registry.makeGauge(name: "stockade_connected_clients", help: "Open client connections.")
        rejectedConnections = registry.makeCounter(name: "stockade_rejected_connections_total", help: "Connections refused (maxclients).")
        acceptFailures = registry.makeCounter(
            name: "stockade_accept_failures_total", help: "Failed accepts on the client and metrics ports (out of file descriptors).")
        logBatchRecords = registry.makeValueHistogram(
            name: "stockade_log_batch_records", buckets: [1, 4, 16, 64, 256, 1024, 4096, 16384],
            help: "Records per group-commit batch (one write, one fdatasync), one observation per batch.")
        fsyncSeconds = registry.makeValueHistogram(
            name: "stockade_fsync_seconds", buckets: [0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5],
            help: "fdatasync latency of the log, one observation per sync.")
        pendingLogBytes = registry.makeGauge(name: "stockade_log_pending_bytes", help: "Records appended but not yet written.")
        snapshotAgeSeconds = registry.makeGauge(name: "stockade_snapshot_age_seconds", help: "Seconds since the last snapshot (or start).")
        snapshotDurationSeconds = registry.makeGauge(name: "stockade_snapshot_duration_seconds", help: "How long the last snapshot took.")
        logPosition = registry.makeGauge(name: "stockade_log_position", help: "Position of the last durable record.")
        let heavyHelp = "Rounds with large replies (pages of ORDERS, EVENTS, AUDIT) by how they took their turn on their event loop: at once, or after waiting while other clients were served."
        heavyRoundsAtOnce = registry.makeCounter(name: "stockade_heavy_rounds_total", labels: [("turn", "at_once")], help: heavyHelp)
        heavyRoundsWaited = registry.makeCounter(name: "stockade_heavy_rounds_total", labels: [("turn", "waited")], help: heavyHelp)
    }

    /// Counts one command by name and outcome (`ok` or the error code).
    func count(_ command: String, outcome: String) {
        var tally = Tally()
        tally.add(command, outcome)
        count(tally)
    }

    /// Adds a round's counts: one lock per read, not per command.
    func count(_ tally: Tally) {
        guard !tally.isEmpty else { return }
        // Counters increment atomically; doing it under the lock saves collecting them first.
        commandCounters.withLock { counters in
            var total = 0
            defer { commandsProcessed.add(total, ordering: .relaxed) }
            tally.forEach { key, n in
                total += n
                let counter = counters[key] ?? {
                    let made = registry.makeCounter(
                        name: "stockade_commands_total", labels: [("command", key.command), ("outcome", key.outcome)],
                        help: "Commands processed, by command and outcome.")
                    counters[key] = made
                    return made
                }()
                counter.increment(by: Int64(n))
            }
        }
    }

    /// One group-commit batch written (`records` > 0) and, when the policy synced it, its fdatasync
    /// (`syncNanos` > 0); a later sync of earlier batches comes with `records` 0. Called on the log
    /// writer's thread for every batch (``Journal/onBatch(_:)``), so the histograms' counts are the
    /// batches and syncs themselves and their buckets show the tail, not a mean per interval.
    func journalBatch(records: Int, syncNanos: UInt64) {
        if records > 0 { logBatchRecords.record(Double(records)) }
        if syncNanos > 0 { fsyncSeconds.record(Double(syncNanos) / 1e9) }
    }

    /// Samples the log's gauges (once a second).
    func observe(_ journal: Journal) {
        pendingLogBytes.set(Double(journal.pendingBytes))
        logPosition.set(Double(journal.lastDurableLSN))
    }
}

/// First on a metrics connection: counts it against ``ServerConfiguration/metricsConnectionsMax``
/// (past it the connection is closed at once) and closes it after `idle` whatever it does, so idle
/// or trickling connections cannot take the descriptors clients need.
final class MetricsConnectionGuard: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private let server: ServerContext
    private let idle: TimeAmount
    private var admitted = false
    private var timer: Scheduled<Void>?

    init(server: ServerContext, idle: TimeAmount) {
        self.server = server
        self.idle = idle
    }

    func channelActive(context: ChannelHandlerContext) {
        guard server.admitMetricsConnection() else {
            context.close(promise: nil)
            return
        }
        admitted = true
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(in: idle) { channel.close(promise: nil) }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        if admitted { server.releaseMetricsConnection() }
        admitted = false
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// Serves `GET /metrics` (and nothing else) over HTTP/1.1.
final class MetricsHTTPHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let metrics: ServerMetrics

    init(metrics: ServerMetrics) { self.metrics = metrics }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let head) = unwrapInboundIn(data) else { return }
        let found = head.method == .GET && (head.uri == "/metrics" || head.uri.hasPrefix("/metrics?"))
        var body = context.channel.allocator.buffer(capacity: 4096)
        if found {
            body.writeBytes(metrics.registry.emitToBuffer())
        } else {
            body.writeString("not found: try /metrics\n")
        }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4" : "text/plain")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let written = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
        written.futureResult.whenComplete { [channel = context.channel] _ in channel.close(promise: nil) }
    }
}

/// Command counts of one round, by command and outcome.
struct Tally {
    struct Key: Hashable, Sendable {
        var command: String
        var outcome: String
    }

    /// A round has few distinct (command, outcome) pairs, usually one: the first is kept inline in
    /// three plain fields (no array per round, and no optional pair copied out to be compared: that
    /// copy was 3% of a sold-out DEDUCT's samples), the others in a short list searched from its most
    /// recent entry, which beats hashing two strings per command. Labels are string literals, whose
    /// comparison is a pointer comparison when equal.
    private var firstCommand = ""
    private var firstOutcome = ""
    /// 0: nothing counted yet.
    private var firstCount = 0
    private var rest: [(key: Key, count: Int)] = []

    var isEmpty: Bool { firstCount == 0 }

    mutating func add(_ command: String, _ outcome: String) {
        if firstCount > 0 && firstCommand == command && firstOutcome == outcome {
            firstCount += 1
            return
        }
        if firstCount == 0 {
            firstCommand = command
            firstOutcome = outcome
            firstCount = 1
            return
        }
        for i in rest.indices.reversed() where rest[i].key.command == command && rest[i].key.outcome == outcome {
            rest[i].count += 1
            return
        }
        rest.append((Key(command: command, outcome: outcome), 1))
    }

    /// Each pair and its count.
    func forEach(_ body: (Key, Int) -> Void) {
        if firstCount > 0 { body(Key(command: firstCommand, outcome: firstOutcome), firstCount) }
        for entry in rest { body(entry.key, entry.count) }
    }
}
