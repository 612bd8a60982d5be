import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization

/// The sink's Prometheus metrics (swift-prometheus), served as text on `/metrics`.
final class SinkMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    let position: Gauge
    let serverPosition: Gauge
    let lagEvents: Gauge
    let lagSeconds: Gauge
    let events: Counter
    let batches: Counter
    let batchSeconds: ValueHistogram
    let retriesPostgres: Counter
    let retriesStockade: Counter

    init() {
        /// `stockade_sink_<metric>[_<unit>]`.
        func name(_ metric: String, _ unit: String = "", _ help: String) -> MetricNameDescriptor {
            MetricNameDescriptor(namespace: "stockade", subsystem: "sink", metricName: metric, unitName: unit, helpText: help)
        }
        position = registry.makeGauge(descriptor: name("position", "", "Position of the last event committed to PostgreSQL."))
        serverPosition = registry.makeGauge(
            descriptor: name("server_position", "", "The server's last durable position (INFO, polled about once a second)."))
        lagEvents = registry.makeGauge(descriptor: name("lag", "events", "Events the server has logged that are not in PostgreSQL yet."))
        lagSeconds = registry.makeGauge(
            descriptor: name("lag", "seconds", "How stale PostgreSQL is: 0 while the sink is at the end of the log, else the time since it last was."))
        events = registry.makeCounter(descriptor: name("events", "total", "Events applied to PostgreSQL."))
        batches = registry.makeCounter(descriptor: name("batches", "total", "Transactions committed (one per batch)."))
        batchSeconds = registry.makeValueHistogram(
            descriptor: name("batch", "seconds", "Time to apply and commit one batch."),
            buckets: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5])
        let retries = name("retries", "total", "Connection failures retried, by target.")
        retriesPostgres = registry.makeCounter(descriptor: retries, labels: [("target", "postgres")])
        retriesStockade = registry.makeCounter(descriptor: retries, labels: [("target", "stockade")])
    }

    /// Connections served at once: a scraper needs one; more are closed at once.
    static let connectionsMax = 16
    /// A connection that has not sent its request by then is closed (no idle descriptors kept).
    static let idleSeconds: Int64 = 10

    /// Serves `GET /metrics` on `host:port` (port 0: any free one); returns the listening channel.
    func serve(host: String, port: Int, group: EventLoopGroup) async throws -> Channel {
        let open = Atomic<Int>(0)
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard open.wrappingAdd(1, ordering: .relaxed).oldValue < Self.connectionsMax else {
                        open.wrappingSubtract(1, ordering: .relaxed)
                        channel.close(promise: nil)
                        return
                    }
                    channel.closeFuture.whenComplete { _ in open.wrappingSubtract(1, ordering: .relaxed) }
                    channel.eventLoop.scheduleTask(in: .seconds(Self.idleSeconds)) { channel.close(promise: nil) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(registry: self.registry))
                }
            }
            .bind(host: host, port: port).get()
    }
}

/// Answers `GET /metrics` with the registry's text, anything else with 404; then closes.
private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let registry: PrometheusCollectorRegistry

    init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let head) = unwrapInboundIn(data) else { return }
        let found = head.method == .GET && (head.uri == "/metrics" || head.uri.hasPrefix("/metrics?"))
        var body = context.channel.allocator.buffer(capacity: 2048)
        if found { body.writeBytes(registry.emitToBuffer()) } else { body.writeString("not found: try /metrics\n") }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4" : "text/plain")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
