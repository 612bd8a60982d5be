import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// What the sink is told on its command line.
public struct SinkConfiguration: Sendable {
    public var server: ServerAddress
    public var database: DatabaseAddress
    /// Events asked for per EVENTS, so per transaction at most. The server's bound is 10,000.
    public var batchEventsMax = 5000
    /// How long one EVENTS waits for the first new event (BLOCK) once the sink is at the end of the log.
    public var waitMillis = 1000
    /// Also append every event to the `events` table.
    public var keepEvents = false
    public var metricsHost = "127.0.0.1"
    /// nil: no metrics listener; 0: any free port (printed).
    public var metricsPort: Int?
    /// Seconds between progress lines on stderr; 0: none.
    public var progressSeconds = 5
    /// The longest wait between two tries to reach Stockade or PostgreSQL.
    public var retryDelayMillisMax = 5000

    public init(server: ServerAddress, database: DatabaseAddress) {
        self.server = server
        self.database = database
    }

    /// The server's bound on EVENTS COUNT.
    public static let batchEventsLimit = 10_000
    /// The server's bound on EVENTS BLOCK.
    public static let waitMillisLimit = 60_000

    /// Refuses values the server or the loop cannot work with, naming the flag.
    public func validate() throws(SinkError) {
        guard (1...Self.batchEventsLimit).contains(batchEventsMax) else {
            throw SinkError(.configuration, "--batch-events must be 1 to \(Self.batchEventsLimit) (the server's EVENTS COUNT bound)")
        }
        guard (1...Self.waitMillisLimit).contains(waitMillis) else {
            throw SinkError(.configuration, "--wait-ms must be 1 to \(Self.waitMillisLimit) (the server's EVENTS BLOCK bound)")
        }
        guard (0...86_400).contains(progressSeconds) else { throw SinkError(.configuration, "--progress-seconds must be 0 to 86400") }
        guard (100...600_000).contains(retryDelayMillisMax) else { throw SinkError(.configuration, "--retry-max-ms must be 100 to 600000") }
        if let metricsPort, !(0...65535).contains(metricsPort) { throw SinkError(.configuration, "--metrics-port must be 0 to 65535") }
    }
}

/// Follows a Stockade server's EVENTS and applies them to PostgreSQL, one transaction per batch
/// that also stores the batch's last position; on start it resumes from the stored position.
/// Connection failures on either side are retried with exponential backoff (after PostgreSQL
/// comes back, the stored position is read again: a COMMIT whose answer was lost may or may not
/// have happened). A gap (`-TRIMMED`), a position past the server's log (`-BEYOND`) or a database
/// that does not follow the log stop it with a message saying what to do.
public final class Sink: Sendable {
    private let configuration: SinkConfiguration
    private let metrics = SinkMetrics()
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    /// Closes the Stockade connection while the sink waits on EVENTS, so a stop does not wait out BLOCK.
    private let waitCloser = Mutex<(@Sendable () -> Void)?>(nil)
    private let progress = Mutex(Progress())
    private let started = ContinuousClock.now

    /// What the progress line and the lag gauges read.
    private struct Progress {
        var position: UInt64 = 0
        var serverPosition: UInt64?
        var events: UInt64 = 0
        var batches: UInt64 = 0
        /// The last fetch that returned fewer events than asked: the sink had reached the end of the log.
        var endSeen = ContinuousClock.now
        /// That fetch's events are committed: PostgreSQL holds the whole log as of then.
        var atEnd = false
        var waiting: String?
    }

    public init(configuration: SinkConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        // One loop: the sink does one thing at a time; PostgresNIO has its own group.
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    deinit { try? group.syncShutdownGracefully() }

    /// Asks the sink to stop: the batch being applied is committed, a wait on EVENTS is cut short,
    /// then ``run()`` returns. Safe from any thread (a signal handler's queue).
    public func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        let closer = waitCloser.withLock { $0 }
        closer?()
    }

    private var isStopping: Bool { stopping.load(ordering: .sequentiallyConsistent) }

    /// Runs until ``stop()`` (returns) or an error retrying cannot fix (throws it).
    public func run() async throws(SinkError) {
        try configuration.validate()
        var metricsChannel: Channel?
        if let port = configuration.metricsPort {
            do {
                metricsChannel = try await metrics.serve(host: configuration.metricsHost, port: port, group: group)
            } catch {
                throw SinkError(.configuration, "cannot serve metrics on \(configuration.metricsHost):\(port): \(error)")
            }
            say("metrics on http://\(configuration.metricsHost):\(metricsChannel?.localAddress?.port ?? port)/metrics")
        }
        let ticker = Task { await tick() }
        defer {
            ticker.cancel()
            metricsChannel?.close(promise: nil)
        }
        try await follow()
        let p = progress.withLock { $0 }
        say("stopped at position \(p.position) after \(p.events) events in \(p.batches) batches")
    }

    /// The loop: fetch a batch after the stored position, fold it, apply it; on failure, back off.
    private func follow() async throws(SinkError) {
        var database: Database?
        var source: EventSource?
        var stored: UInt64 = 0
        var pending: [SinkEvent] = []
        var pendingReachesEnd = false
        var pendingFetched = ContinuousClock.now
        var backoff = Backoff(maxMillis: configuration.retryDelayMillisMax)
        var lastServerPoll = ContinuousClock.now - .seconds(10)
        var lastProblem: String?
        while !(isStopping && pending.isEmpty) {
            do {
                if database == nil {
                    let connected = try await Database.connect(configuration.database, logger: quiet)
                    database = connected
                    let (from, to) = try await connected.migrate()
                    if from != to { say("schema of \(configuration.database.description) migrated from version \(from) to \(to)") }
                    stored = try await connected.storedPosition()
                    say("PostgreSQL \(configuration.database.description): applied up to position \(stored)")
                    progress.withLock { $0.position = stored; $0.waiting = nil }
                    metrics.position.set(Double(stored))
                }
                if pending.isEmpty {
                    if isStopping { break }
                    if source == nil {
                        source = try await EventSource.connect(configuration.server, group: group)
                        say("following \(configuration.server.description) from position \(stored + 1)")
                        progress.withLock { $0.waiting = nil }
                    }
                    let events = try await fetch(from: source!, after: stored, lastPoll: &lastServerPoll)
                    pendingFetched = ContinuousClock.now
                    pendingReachesEnd = events.count < configuration.batchEventsMax
                    pending = events
                    if events.isEmpty {
                        progress.withLock { $0.endSeen = pendingFetched; $0.atEnd = true }
                        continue
                    }
                    progress.withLock { $0.atEnd = false; if pendingReachesEnd { $0.endSeen = pendingFetched } }
                }
                guard let plan = try BatchPlan.fold(pending, after: stored, keepEvents: configuration.keepEvents) else {
                    pending = []
                    continue
                }
                let applyStarted = ContinuousClock.now
                try await database!.apply(plan)
                stored = plan.lastPosition
                pending = []
                backoff.reset()
                lastProblem = nil
                let seconds = (ContinuousClock.now - applyStarted).seconds
                metrics.batchSeconds.record(seconds)
                metrics.events.increment(by: Int64(plan.eventCount))
                metrics.batches.increment()
                metrics.position.set(Double(stored))
                progress.withLock { p in
                    p.position = stored
                    p.events += UInt64(plan.eventCount)
                    p.batches += 1
                    p.waiting = nil
                    if pendingReachesEnd { p.atEnd = true }
                }
            } catch {
                if isStopping && error.isRetryable { break }
                switch error.code {
                case .databaseUnavailable:
                    if let database { await database.close() }
                    database = nil
                    metrics.retriesPostgres.increment()
                case .serverUnavailable:
                    source?.close()
                    source = nil
                    metrics.retriesStockade.increment()
                case .concurrentSink:
                    // Another sink moved the position: what it applied is not applied again.
                    say("warning: \(error.message); reading the position again")
                    if let database { await database.close() }
                    database = nil
                    pending = []
                    continue
                default:
                    source?.close()
                    if let database { await database.close() }
                    throw error
                }
                let delay = backoff.next()
                if error.message != lastProblem {
                    say("\(error.message); retrying with backoff (up to \(configuration.retryDelayMillisMax) ms between tries)")
                    lastProblem = error.message
                }
                progress.withLock { $0.waiting = error.code == .databaseUnavailable ? "waiting for PostgreSQL" : "waiting for Stockade" }
                // The lag keeps growing while PostgreSQL is away: keep reading the server's position.
                if error.code == .databaseUnavailable, let connected = source {
                    do { try await pollServer(connected, lastPoll: &lastServerPoll) } catch { source?.close(); source = nil }
                }
                await sleep(millis: delay)
            }
        }
        source?.close()
        if let database { await database.close() }
    }

    /// Reads the server's position for the lag, at most about once a second.
    private func pollServer(_ source: EventSource, lastPoll: inout ContinuousClock.Instant) async throws(SinkError) {
        guard ContinuousClock.now - lastPoll >= .seconds(1) else { return }
        lastPoll = ContinuousClock.now
        if let position = try await source.serverPosition() {
            progress.withLock { $0.serverPosition = position }
            metrics.serverPosition.set(Double(position))
        }
    }

    /// One EVENTS after `stored` (and the server's position for the lag, about once a second).
    private func fetch(from source: EventSource, after stored: UInt64, lastPoll: inout ContinuousClock.Instant) async throws(SinkError) -> [SinkEvent] {
        try await pollServer(source, lastPoll: &lastPoll)
        waitCloser.withLock { $0 = source.closer }
        defer { waitCloser.withLock { $0 = nil } }
        // A stop that came before the closer was set: do not start a wait.
        if isStopping { return [] }
        return try await source.events(after: stored, count: configuration.batchEventsMax, blockMillis: configuration.waitMillis)
    }

    /// Once a second: the lag gauges; every ``SinkConfiguration/progressSeconds``: a progress line.
    private func tick() async {
        var lastLine = ContinuousClock.now
        var eventsAtLastLine: UInt64 = 0
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            let p = progress.withLock { $0 }
            let now = ContinuousClock.now
            let lagEvents = p.serverPosition.map { $0 > p.position ? $0 - p.position : 0 }
            let lagSeconds = p.atEnd ? 0 : (now - p.endSeen).seconds
            if let lagEvents { metrics.lagEvents.set(Double(lagEvents)) }
            metrics.lagSeconds.set(lagSeconds)
            guard configuration.progressSeconds > 0, now - lastLine >= .seconds(configuration.progressSeconds) else { continue }
            let rate = Double(p.events - eventsAtLastLine) / (now - lastLine).seconds
            lastLine = now
            eventsAtLastLine = p.events
            var line = "position \(p.position)"
            if let server = p.serverPosition, let lagEvents { line += " (server \(server), lag \(lagEvents) events, \(String(format: "%.1f", lagSeconds)) s)" }
            line += ", \(Int(rate.rounded())) events/s, \(p.events) events in \(p.batches) batches"
            if let waiting = p.waiting { line += ", \(waiting)" }
            say(line)
        }
    }

    /// Sleeps, but wakes within 100 ms of a stop.
    private func sleep(millis: Int) async {
        var left = millis
        while left > 0 && !isStopping {
            let step = min(left, 100)
            try? await Task.sleep(for: .milliseconds(step))
            left -= step
        }
    }

    /// PostgresNIO's own logging, kept to errors (the sink says what matters itself).
    private var quiet: Logger {
        var logger = logger
        logger.logLevel = .error
        return logger
    }

    private func say(_ message: String) {
        FileHandle.standardError.write(Data("[stockade-sink] \(message)\n".utf8))
    }
}

/// Exponential backoff: 100 ms doubling up to a bound, with jitter so sinks restarted together
/// do not retry in step.
struct Backoff {
    let maxMillis: Int
    private var nextMillis = 100

    init(maxMillis: Int) { self.maxMillis = maxMillis }

    mutating func next() -> Int {
        let delay = nextMillis
        nextMillis = min(nextMillis * 2, maxMillis)
        return delay / 2 + Int.random(in: 0...(delay / 2))
    }

    mutating func reset() { nextMillis = 100 }
}

extension Duration {
    var seconds: Double {
        let (s, attoseconds) = components
        return Double(s) + Double(attoseconds) / 1e18
    }
}
