import Dispatch
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
    /// The longest wait for PostgreSQL to answer one statement, after which the connection is
    /// dropped and made again with backoff. 30 s: a batch's statements take milliseconds to a few
    /// seconds on a loaded database, so only a PostgreSQL that stopped answering (or a lock held
    /// that long) reaches it, and an operator waits half a minute at most to see the sink say so.
    public var statementTimeoutMillis = 30_000
    /// `--reset`: empty the sink's tables and position, then return (``Sink/run()``).
    public var reset = false

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
        guard (100...3_600_000).contains(statementTimeoutMillis) else { throw SinkError(.configuration, "--statement-timeout-ms must be 100 to 3600000") }
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
    /// Closes the Stockade connection, so a stop does not wait out a BLOCK (or a server that does
    /// not answer); set while the sink has one.
    private let sourceCloser = Mutex<(@Sendable () -> Void)?>(nil)
    /// Closes the PostgreSQL connection: a stop lets the batch in progress finish for
    /// ``stopGraceMillis``, then closes it (a batch not committed is simply not applied).
    private let databaseCloser = Mutex<(@Sendable () -> Void)?>(nil)
    /// The sink is connecting to PostgreSQL or reading its schema and position: no batch to finish,
    /// so a stop closes the connection at once.
    private let databaseConnecting = Atomic<Bool>(false)
    /// A stop's grace for the batch in progress is over.
    private let graceOver = Atomic<Bool>(false)
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

    /// How long a stop lets the batch in progress finish before dropping the PostgreSQL connection:
    /// a batch commits in well under a second on a database that answers, and a SIGTERM (from an
    /// orchestrator with its own kill deadline, often 10 s) must not wait on one that does not.
    static let stopGraceMillis = 3000

    /// The pause after an empty EVENTS page that came back in less than half its BLOCK.
    static let emptyPagePauseMillis = 100

    /// Asks the sink to stop: the batch being applied is committed if PostgreSQL does so within
    /// ``stopGraceMillis`` (else it is not, and exactly once still holds), a wait on EVENTS is cut
    /// short, then ``run()`` returns. Safe from any thread (a signal handler's queue).
    /// A connection being made (TCP connect, AUTH, PostgreSQL's login, the schema's migration lock)
    /// is closed at once: there is nothing of it to finish.
    public func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        let closer = sourceCloser.withLock { $0 }
        closer?()
        if databaseConnecting.load(ordering: .sequentiallyConsistent) { databaseCloser.withLock { $0 }?() }
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Self.stopGraceMillis)) {
            self.graceOver.store(true, ordering: .sequentiallyConsistent)
            let closer = self.databaseCloser.withLock { $0 }
            closer?()
        }
    }

    private var isStopping: Bool { stopping.load(ordering: .sequentiallyConsistent) }

    /// Sets how a stop closes the Stockade connection; closes it now if a stop came first (a stop
    /// and this may both close it: closing twice is harmless).
    private func setSourceCloser(_ closer: (@Sendable () -> Void)?) {
        sourceCloser.withLock { $0 = closer }
        if isStopping { closer?() }
    }

    /// Sets how a stop closes the PostgreSQL connection; closes it now if a stop came first and
    /// there is no batch to let finish (connecting, or the grace is over).
    private func setDatabaseCloser(_ closer: (@Sendable () -> Void)?) {
        databaseCloser.withLock { $0 = closer }
        if isStopping && (databaseConnecting.load(ordering: .sequentiallyConsistent) || graceOver.load(ordering: .sequentiallyConsistent)) {
            closer?()
        }
    }

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
        if configuration.reset {
            try await reset()
            return
        }
        let unfinished = try await follow()
        let p = progress.withLock { $0 }
        say("stopped at position \(p.position) after \(p.events) events in \(p.batches) batches"
            + (unfinished.map { ", positions \($0) left to the next run (not committed before the stop; the next run reads whether they were)" } ?? ""))
    }

    /// `--reset`: checks that the server's log still starts at position 1 (else starting over
    /// would leave out what came before it), then empties the tables and the position.
    /// A stop closes both connections at once (the reset is one transaction: cut short, it changes nothing).
    private func reset() async throws(SinkError) {
        databaseConnecting.store(true, ordering: .sequentiallyConsistent)
        do throws(SinkError) {
            let database = try await Database.connect(
                configuration.database, statementTimeoutMillis: Int64(configuration.statementTimeoutMillis), logger: quiet,
                onChannel: { channel in self.setDatabaseCloser { channel.close(promise: nil) } })
            // From here a stop marks the connection dropped before it closes it: nothing more is written to it.
            setDatabaseCloser(database.closer)
            do {
                try await reset(database)
                await database.close()
            } catch {
                await database.close()
                throw error
            }
        } catch {
            if isStopping { throw SinkError(error.code, "--reset was stopped by a signal before it finished: nothing was changed") }
            throw error
        }
    }

    private func reset(_ database: Database) async throws(SinkError) {
        _ = try await database.migrate()
        let source = try await EventSource.connect(
            configuration.server, group: group, onChannel: { channel in self.setSourceCloser { channel.close(promise: nil) } })
        defer { source.close() }
        do {
            _ = try await source.events(after: 0, count: 1, blockMillis: nil)
        } catch where error.code == .trimmed {
            throw SinkError(.trimmed, """
                --reset refused: \(configuration.server.description) no longer has the start of its log (\(error.message)). \
                Starting over from it would leave out every SKU and order from before its first retained position, and the \
                first later event that touches one would stop the sink. Re-seed the tables from an export taken at a \
                snapshot instead (docs/OPERATIONS.md, "A trimmed log"). Nothing was changed.
                """)
        }
        let before = try await database.storedState()
        try await database.reset()
        say("emptied skus, orders, order_items and events of \(configuration.database.description) (it had applied up to position \(before.position)); run the sink without --reset to apply the log of \(configuration.server.description) from position 1")
    }

    /// Compares what the database stored of its last event with the server's log there: the event's
    /// fingerprint, and the term in force at it (LOG.TERM). A database filled from another server's
    /// log must not be followed on as if it were this one's. The term tells a log that went another
    /// way before that position although the event at it is the same (a replica promoted without
    /// the database's last events, whose own next events happen to match).
    private func checkSameLog(_ stored: StoredState, source: EventSource) async throws(SinkError) {
        guard stored.highWater > 0 else { return }
        let last = (position: stored.highWater, fingerprint: stored.fingerprint, term: stored.term)
        let otherLog = """
            \(configuration.database.description) holds another log's orders: the last event it applied, at position \
            \(last.position), is not the event \(configuration.server.description) has at that position. It was filled from \
            another server; or this server's data directory was replaced; or this server is a replica promoted after \
            its primary failed, without the database's last events (lost in the failover: the database may be the only \
            record of those orders, so export them first). Point --from at the server it follows, or start over for \
            this one: run the sink once with --reset (it empties the sink's tables, that record included), then again \
            without it.
            """
        if let term = last.term {
            let serverTerm: LogTerm?
            do {
                serverTerm = try await source.term(at: last.position)
            } catch where error.code == .beyond {
                throw try await behindOrDiverged(source, at: last.position, otherLog: otherLog)
            }
            if let serverTerm, serverTerm != term {
                throw SinkError(.diverged, otherLog + " (at position \(last.position) the database's events are of \(term), the server's of \(serverTerm))")
            }
            if serverTerm == nil {
                say("warning: cannot compare terms with \(configuration.server.description): it no longer keeps the term of position \(last.position)")
            }
        }
        guard let fingerprint = last.fingerprint else { return }
        let events: [SinkEvent]
        do {
            events = try await source.events(after: last.position - 1, count: 1, blockMillis: nil).events
        } catch where error.code == .trimmed {
            say("warning: cannot check that \(configuration.server.description) is the server this database followed: its log no longer has position \(last.position)")
            return
        } catch where error.code == .beyond {
            // (Not the BEYOND message itself: it names the position asked after, one before this one.)
            throw try await behindOrDiverged(source, at: last.position, otherLog: otherLog)
        }
        guard let event = events.first else {
            // Its log reaches the position (else BEYOND) but it does not serve it yet: a
            // semi-synchronous primary serves what its replicas acknowledged, none when none is back.
            throw SinkError(.serverUnavailable, "\(configuration.server.description) does not serve position \(last.position) yet (a primary with --min-replicas-to-write serves what its replicas acknowledged): waiting")
        }
        guard event.position == last.position else {
            throw SinkError(.diverged, otherLog + " (the server sent position \(event.position) for position \(last.position))")
        }
        guard event.fingerprint == fingerprint else { throw SinkError(.diverged, otherLog) }
    }

    /// The error for a server whose log ends before `position`, which the database holds: a replica
    /// may only be behind (retried until it catches up); a primary has another log.
    private func behindOrDiverged(_ source: EventSource, at position: UInt64, otherLog: String) async throws(SinkError) -> SinkError {
        if try await source.isReplica() {
            return SinkError(.serverUnavailable, "\(configuration.server.description) is a replica whose log ends before position \(position), which the database holds: waiting for it to catch up")
        }
        return SinkError(.diverged, otherLog + " (the server's log ends before position \(position))")
    }

    /// The loop: fetch a batch after the stored position, fold it, apply it; on failure, back off.
    /// Returns the positions of a batch a stop left uncommitted, if any.
    private func follow() async throws(SinkError) -> String? {
        var database: Database?
        var source: EventSource?
        var stored: UInt64 = 0
        var storedState = StoredState(position: 0, highWater: 0)
        /// Whether ``checkSameLog`` has run since the last new connection to either side.
        var sameLogChecked = false
        var pending: [SinkEvent] = []
        /// The server's term in force just before `pending` (nil: unknown).
        var pendingTermBefore: LogTerm?
        /// Events per batch: halved after a batch ran past the statement timeout (a role's own
        /// `statement_timeout` may be shorter than a full batch takes), and after a batch's
        /// statements failed twice in a row with an error that is retried (a `temp_file_limit` or
        /// `work_mem` a large batch passes: SQLSTATE 53400, 53200); grown back after each success,
        /// so a batch that cannot fit is not retried whole for ever.
        var batchLimit = configuration.batchEventsMax
        /// Tries in a row in which the batch's statements themselves failed (not the connection to
        /// either side): the second halves the batch.
        var batchFailures = 0
        /// The smallest batch limit said in the log since the limit was last whole: a limit that
        /// settles just under what fits (grown back, halved again) is said once, not at every halving.
        var smallestLimitSaid: Int?
        /// For the log: whether a database was reached in this run, the position this run last left
        /// there, and whether "following" was said since the position or the server changed.
        var databaseSeen = false
        var expectedStored: UInt64 = 0
        /// The position "following ... from" was last said for: said again only when it differs (a
        /// reconnect to the server at the same position adds no line).
        var announcedFrom: UInt64?
        var pendingReachesEnd = false
        var pendingFetched = ContinuousClock.now
        var backoff = Backoff(maxMillis: configuration.retryDelayMillisMax)
        var lastServerPoll = ContinuousClock.now - .seconds(10)
        var lastProblem: String?
        while !(isStopping && pending.isEmpty) {
            do throws(SinkError) {
                if database == nil {
                    // A stop does not wait for a new connection: what is pending is left to the next run.
                    if isStopping { break }
                    // Until the position is read there is no batch to finish: a stop closes the connection at once.
                    databaseConnecting.store(true, ordering: .sequentiallyConsistent)
                    do throws(SinkError) {
                        let connected = try await Database.connect(
                            configuration.database, statementTimeoutMillis: Int64(configuration.statementTimeoutMillis), logger: quiet,
                            onChannel: { channel in self.setDatabaseCloser { channel.close(promise: nil) } })
                        database = connected
                        setDatabaseCloser(connected.closer)
                        let (from, to) = try await connected.migrate()
                        if from != to { say("schema of \(configuration.database.description) migrated from version \(from) to \(to)") }
                        storedState = try await connected.storedState()
                    } catch {
                        databaseConnecting.store(false, ordering: .sequentiallyConsistent)
                        throw error
                    }
                    databaseConnecting.store(false, ordering: .sequentiallyConsistent)
                    stored = storedState.position
                    // Events fetched before the reconnect that no longer follow the stored position
                    // (it was moved back meanwhile) are fetched again, not taken for a gap.
                    if let first = pending.first, first.position > stored + 1 { pending = [] }
                    sameLogChecked = false
                    // Said once, and again only when the position is not the one this run left there
                    // (moved by hand or by another sink): a reconnect after each retry adds no line.
                    if !databaseSeen || stored != expectedStored {
                        say("PostgreSQL \(configuration.database.description): applied up to position \(stored)")
                        announcedFrom = nil
                    }
                    databaseSeen = true
                    expectedStored = stored
                    progress.withLock { $0.position = stored; $0.waiting = nil }
                    metrics.position.set(Double(stored))
                }
                if pending.isEmpty {
                    if isStopping { break }
                    if source == nil {
                        source = try await EventSource.connect(
                            configuration.server, group: group, onChannel: { channel in self.setSourceCloser { channel.close(promise: nil) } })
                        setSourceCloser(source?.closer)
                        // A stop that came before the closer was set: do not start a wait.
                        if isStopping { break }
                        sameLogChecked = false
                    }
                    if !sameLogChecked {
                        try await checkSameLog(storedState, source: source!)
                        sameLogChecked = true
                        if announcedFrom != stored + 1 { say("following \(configuration.server.description) from position \(stored + 1)") }
                        announcedFrom = stored + 1
                        progress.withLock { $0.waiting = nil }
                    }
                    let asked = ContinuousClock.now
                    let (events, termBefore) = try await fetch(from: source!, after: stored, count: batchLimit, lastPoll: &lastServerPoll)
                    pendingFetched = ContinuousClock.now
                    pendingReachesEnd = events.count < batchLimit
                    pending = events
                    pendingTermBefore = termBefore
                    if events.isEmpty {
                        progress.withLock { $0.endSeen = pendingFetched; $0.atEnd = true }
                        // An empty page is the end of a BLOCK wait; one much sooner (a server shutting
                        // down, or one that ignores BLOCK) is not asked again in a tight loop.
                        if pendingFetched - asked < .milliseconds(configuration.waitMillis / 2) {
                            await sleep(millis: min(Self.emptyPagePauseMillis, configuration.waitMillis))
                        }
                        continue
                    }
                    progress.withLock { $0.atEnd = false; if pendingReachesEnd { $0.endSeen = pendingFetched } }
                }
                guard let plan = try BatchPlan.fold(pending, after: stored, termBefore: pendingTermBefore, keepEvents: configuration.keepEvents) else {
                    pending = []
                    continue
                }
                let applyStarted = ContinuousClock.now
                do throws(SinkError) {
                    try await database!.apply(plan, replay: storedState.replaying)
                } catch {
                    batchFailures += 1
                    throw error
                }
                batchFailures = 0
                stored = plan.lastPosition
                storedState = storedState.after(plan)
                pending = []
                backoff.reset()
                lastProblem = nil
                expectedStored = stored
                // Grows back an eighth at a time (halved at once after a timeout): a limit close to
                // what fits is not doubled straight back into another timeout.
                batchLimit = min(configuration.batchEventsMax, batchLimit + max(1, batchLimit / 8))
                if batchLimit == configuration.batchEventsMax { smallestLimitSaid = nil }
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
                var error = error
                // A replica past whose log the database is may only be behind: wait for it.
                if error.code == .beyond, let connected = source, (try? await connected.isReplica()) == true {
                    error = SinkError(.serverUnavailable, "\(configuration.server.description) is a replica whose log ends before position \(stored), which the database holds: waiting for it to catch up")
                }
                if isStopping && error.isRetryable { break }
                switch error.code {
                case .databaseUnavailable, .databaseTimeout:
                    let timedOut = error.code == .databaseTimeout
                    if (timedOut || batchFailures >= 2) && batchLimit > 1 {
                        // Half of what was tried (a short batch that failed is not retried whole).
                        batchLimit = max(1, (pending.isEmpty ? batchLimit : min(batchLimit, pending.count)) / 2)
                        if pending.count > batchLimit {
                            pending.removeLast(pending.count - batchLimit)
                            pendingReachesEnd = false
                        }
                        batchFailures = 0
                        if batchLimit < smallestLimitSaid ?? .max {
                            smallestLimitSaid = batchLimit
                            say(timedOut
                                ? "a batch ran past the statement timeout: batches of at most \(batchLimit) events until one commits"
                                : "a batch failed twice in a row: batches of at most \(batchLimit) events until one commits")
                        }
                    }
                    if let database { await database.close() }
                    database = nil
                    setDatabaseCloser(nil)
                    metrics.retriesPostgres.increment()
                case .serverUnavailable:
                    source?.close()
                    source = nil
                    metrics.retriesStockade.increment()
                case .concurrentSink:
                    // Another sink moved the position: what it applied is not applied again.
                    // With a pause: two sinks on one database would otherwise reconnect in a tight loop.
                    say("warning: \(error.message); reading the position again")
                    batchFailures = 0
                    if let database { await database.close() }
                    database = nil
                    setDatabaseCloser(nil)
                    pending = []
                    await sleep(millis: backoff.next())
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
                let postgres = error.code == .databaseUnavailable || error.code == .databaseTimeout
                progress.withLock { $0.waiting = postgres ? "waiting for PostgreSQL" : "waiting for Stockade" }
                // The lag keeps growing while PostgreSQL is away: keep reading the server's position.
                if postgres, let connected = source {
                    do { try await pollServer(connected, lastPoll: &lastServerPoll) } catch { source?.close(); source = nil }
                }
                await sleep(millis: delay)
            }
        }
        source?.close()
        if let database { await database.close() }
        setDatabaseCloser(nil)
        guard let first = pending.first(where: { $0.position > stored }), let last = pending.last else { return nil }
        return "\(first.position)-\(last.position)"
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
    private func fetch(from source: EventSource, after stored: UInt64, count: Int, lastPoll: inout ContinuousClock.Instant) async throws(SinkError) -> (events: [SinkEvent], termBefore: LogTerm?) {
        if isStopping { return ([], nil) }
        try await pollServer(source, lastPoll: &lastPoll)
        // A stop that came before the closer was set: do not start a wait.
        if isStopping { return ([], nil) }
        return try await source.events(after: stored, count: count, blockMillis: configuration.waitMillis)
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
        try? FileHandle.standardError.write(contentsOf: Data("[stockade-sink] \(message)\n".utf8))
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
