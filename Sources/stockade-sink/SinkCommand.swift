import ArgumentParser
import Dispatch
import Foundation
import Logging
import StockadeSink

/// `stockade-sink` (also run as `stockade sink`): follows a Stockade server's EVENTS into PostgreSQL.
@main
struct SinkCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stockade-sink",
        abstract: "Follow a Stockade server's EVENTS and apply them to PostgreSQL, exactly once.",
        discussion: """
            Creates and migrates its tables (skus, orders, order_items, events) in the database and keeps the last \
            position applied there, in the same transaction as each batch; a restart resumes from it. SIGTERM or \
            SIGINT: the batch in progress is committed (if PostgreSQL does so within 3 s), then it exits 0. Exits 1 with a message on what retrying cannot \
            fix (a trimmed log, a database that does not follow the server, a refused login).
            """)

    @Option(help: "The Stockade server: redis://[:password@]host[:port].")
    var from = "redis://127.0.0.1:7379"

    @Option(help: "The database: postgres://user[:password]@host[:port]/database (password also from PGPASSWORD).")
    var to: String

    @Option(help: "Events per EVENTS request, so per transaction at most (1 to 10000).")
    var batchEvents = 5000

    @Option(help: "How long one EVENTS waits for a new event at the end of the log (BLOCK, ms).")
    var waitMs = 1000

    @Flag(help: "Also append every event to the events table.")
    var keepEvents = false

    @Option(help: "Serve Prometheus metrics on this port (0: any free port, printed).")
    var metricsPort: Int?

    @Option(help: "Address for the metrics listener.")
    var metricsHost = "127.0.0.1"

    @Option(help: "Seconds between progress lines on stderr (0: none).")
    var progressSeconds = 5

    @Option(help: "Longest wait between two tries to reach Stockade or PostgreSQL (ms).")
    var retryMaxMs = 5000

    @Option(help: "Longest wait for PostgreSQL to answer one statement before the connection is dropped and made again (ms).")
    var statementTimeoutMs = 30_000

    @Flag(help: "Start over: empty the sink's tables and position (only while the server's log still starts at position 1), then exit.")
    var reset = false

    func run() async throws {
        // As the server: a closed pipe on stdout or stderr fails a write instead of killing the sink.
        signal(SIGPIPE, SIG_IGN)
        do {
            try await runSink()
        } catch {
            try? FileHandle.standardError.write(contentsOf: Data("[stockade-sink] error: \(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }

    /// Runs the sink until a signal (returns) or an error retrying cannot fix (throws).
    private func runSink() async throws(SinkError) {
        var configuration = SinkConfiguration(
            server: try ServerAddress.parse(from),
            database: try DatabaseAddress.parse(to, environment: ProcessInfo.processInfo.environment))
        configuration.batchEventsMax = batchEvents
        configuration.waitMillis = waitMs
        configuration.keepEvents = keepEvents
        configuration.metricsPort = metricsPort
        configuration.metricsHost = metricsHost
        configuration.progressSeconds = progressSeconds
        configuration.retryDelayMillisMax = retryMaxMs
        configuration.statementTimeoutMillis = statementTimeoutMs
        configuration.reset = reset
        try configuration.validate()
        let sink = Sink(configuration: configuration, logger: Logger(label: "stockade-sink"))
        let signals = [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                try? FileHandle.standardError.write(contentsOf: Data("[stockade-sink] \(number == SIGTERM ? "SIGTERM" : "SIGINT"): finishing the current batch\n".utf8))
                sink.stop()
            }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }
        try await sink.run()
    }
}
