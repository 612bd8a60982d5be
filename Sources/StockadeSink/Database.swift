import Logging
import NIOCore
import NIOPosix
import PostgresNIO
import Synchronization

/// Where the sink writes: a PostgreSQL database, reached with PostgresNIO over one connection.
public struct DatabaseAddress: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var user: String
    public var password: String?
    public var database: String

    /// `postgres://user[:password]@host[:port][/database]` (or `postgresql://`); the password from
    /// the URL, else `PGPASSWORD`; the database defaults to the user's name, as in psql.
    public static func parse(_ url: String, environment: [String: String]) throws(SinkError) -> DatabaseAddress {
        let parts = try URLParts.parse(url, schemes: ["postgres", "postgresql"], defaultPort: 5432)
        guard let user = parts.user, !user.isEmpty else {
            throw SinkError(.configuration, "--to \(parts.redacted): name the user, as in postgres://user@host:5432/db")
        }
        for (key, value) in parts.query where key == "sslmode" && !["disable", "allow", "prefer"].contains(value) {
            throw SinkError(.configuration, "--to: sslmode=\(value) is not supported; the sink connects without TLS (use it on a trusted network, or through a local tunnel)")
        }
        let database = parts.path.isEmpty ? user : parts.path
        // PostgreSQL's start-up and password messages end each string at a NUL byte.
        guard ![user, database, parts.password ?? ""].contains(where: { $0.utf8.contains(0) }) else {
            throw SinkError(.configuration, "--to \(parts.redacted): the user, password and database cannot hold a NUL byte (%00)")
        }
        return DatabaseAddress(host: parts.host, port: parts.port, user: user, password: parts.password ?? environment["PGPASSWORD"], database: database)
    }

    /// For messages: never the password.
    public var description: String { "postgres://\(user)@\(host):\(port)/\(database)" }
}

/// What the database says the sink has applied.
struct StoredState: Equatable {
    /// The position of the last event applied (0: none yet); the next batch starts after it.
    var position: UInt64
    /// The highest position ever applied (`last_event_position`). It stays put when an operator
    /// moves ``position`` back: below it, rows may already hold a batch's events (a replay).
    var highWater: UInt64
    /// ``SinkEvent/fingerprint`` of the event at ``highWater`` (nil: nothing to compare: none
    /// applied, a database from before schema version 2, or cleared by a re-seed).
    var fingerprint: Int64?
    /// The server's term in force at ``highWater`` (``BatchPlan/lastTerm``; nil: unknown, as for
    /// ``fingerprint``, or when the server no longer kept it).
    var term: LogTerm?

    /// Whether the next batch may hold events rows already have (see ``SinkSQL/statements(for:replay:)``).
    var replaying: Bool { position < highWater }

    /// The state once `plan` is committed.
    func after(_ plan: BatchPlan) -> StoredState {
        plan.lastPosition >= highWater
            ? StoredState(position: plan.lastPosition, highWater: plan.lastPosition, fingerprint: plan.lastFingerprint, term: plan.lastTerm)
            : StoredState(position: plan.lastPosition, highWater: highWater, fingerprint: fingerprint, term: term)
    }
}

/// One connection to PostgreSQL: creates and migrates the schema, reads the stored position, and
/// applies a batch in one transaction. Every round trip is bounded by ``statementTimeoutMillis``:
/// a PostgreSQL that stops answering (a stopped process, a network that drops packets) costs the
/// connection, never a wait without end. Not Sendable: one task owns it.
final class Database {
    private let connection: PostgresConnection
    private let logger: Logger
    private let statementTimeoutMillis: Int64
    let address: DatabaseAddress
    /// Set, before the close, when a statement timed out or a stop cut the connection: nothing more is
    /// sent on it. (A query written to a channel that is closing never completes in PostgresNIO 1.33:
    /// a ROLLBACK after a timeout wedged the sink for good.)
    private let dropped = Dropped()

    final class Dropped: Sendable {
        private let flag = Atomic<Bool>(false)
        func set() { flag.store(true, ordering: .sequentiallyConsistent) }
        var isSet: Bool { flag.load(ordering: .sequentiallyConsistent) }
    }

    private init(connection: PostgresConnection, address: DatabaseAddress, statementTimeoutMillis: Int64, logger: Logger) {
        self.connection = connection
        self.address = address
        self.statementTimeoutMillis = statementTimeoutMillis
        self.logger = logger
    }

    /// How much longer than PostgreSQL's own statement_timeout the sink waits for an answer before it
    /// drops the connection: long enough for the server's cancel to arrive first.
    static let clientTimeoutGraceMillis: Int64 = 1000

    /// Time to wait for a TCP connection and the start-up handshake (PostgresNIO bounds both with it).
    static let connectTimeoutSeconds: Int64 = 5

    /// Connects, logs in and sets the session's statement timeout. `onChannel`: called with the TCP
    /// channel before it connects, so a stop can close it (ending the connect and the login at once).
    static func connect(
        _ address: DatabaseAddress, statementTimeoutMillis: Int64, logger: Logger, onChannel: (@Sendable (any Channel) -> Void)? = nil
    ) async throws(SinkError) -> Database {
        do {
            // The channel is the sink's own (PostgresNIO takes it over), so a stop can close it mid-connect.
            let channel = try await ClientBootstrap(group: PostgresConnection.defaultEventLoopGroup)
                .connectTimeout(.seconds(connectTimeoutSeconds))
                .channelInitializer { channel in
                    onChannel?(channel)
                    return channel.eventLoop.makeSucceededVoidFuture()
                }
                .connect(host: address.host, port: address.port).get()
            let configuration = PostgresConnection.Configuration(
                establishedChannel: channel, username: address.user, password: address.password, database: address.database)
            let connection: PostgresConnection
            do {
                connection = try await PostgresConnection.connect(on: channel.eventLoop, configuration: configuration, id: 1, logger: logger)
            } catch {
                channel.close(promise: nil)
                throw error
            }
            let database = Database(connection: connection, address: address, statementTimeoutMillis: statementTimeoutMillis, logger: logger)
            // PostgreSQL ends a statement of this session past the same bound (lock waits included):
            // a connection the sink dropped on a timeout leaves no backend waiting on, holding the
            // position row's lock and a connection slot.
            do {
                try await database.query(PostgresQuery(unsafeSQL: "SET statement_timeout = \(statementTimeoutMillis)"))
                // And it checks every second, during a long statement, that the sink is still there: a
                // sink killed mid-batch leaves no backend running on (holding the position row's lock,
                // which the next run would wait for) until the statement ends. PostgreSQL 14 and later,
                // where the system supports it; elsewhere the setting is left alone.
                try await database.query(PostgresQuery(unsafeSQL: Self.connectionCheck))
            } catch {
                await database.close()
                throw error
            }
            return database
        } catch let error as SinkError {
            throw error
        } catch {
            throw Self.classify(error, doing: "connecting to \(address.description)")
        }
    }

    /// Sets `client_connection_check_interval` for the session where the server knows it.
    static let connectionCheck = """
        DO $$ BEGIN PERFORM set_config('client_connection_check_interval', '\(connectionCheckMillis)', false);
        EXCEPTION WHEN OTHERS THEN NULL; END $$
        """
    /// How often a backend of the sink checks, during a statement, that the sink is still connected.
    static let connectionCheckMillis = 1000

    /// Closes the connection here, without a word to the server (which may not be answering): a
    /// statement waiting for its answer fails at once.
    func close() async {
        dropped.set()
        try? await connection.close()
    }

    /// A closer usable from any thread (how a stop cuts a hung statement short).
    var closer: @Sendable () -> Void {
        let connection = self.connection
        let dropped = self.dropped
        return {
            dropped.set()
            let _: EventLoopFuture<Void> = connection.close()
        }
    }

    /// Creates the tables, or brings them to ``SinkSQL/schemaVersion``. A database whose schema is
    /// newer than this sink knows is refused (an older sink would write what the newer one does not expect).
    func migrate() async throws(SinkError) -> (from: Int, to: Int) {
        var from = 0
        try await transaction("migrating the schema") {
            try await query(PostgresQuery(unsafeSQL: "SELECT pg_advisory_xact_lock(\(SinkSQL.migrationLockKey))"))
            // Under the lock: two sinks creating it at once collided on its unique type name (23505),
            // which read as "the database does not follow this server's log".
            try await query(Self.query(SinkStatement(sql: SinkSQL.createVersionTable, binds: [])))
            let current = try await singleInt("SELECT coalesce(max(version), 0)::int8 FROM stockade_schema_version")
            from = Int(current)
            guard from <= SinkSQL.schemaVersion else {
                throw SinkError(.schema, "the database's sink schema is version \(from), newer than this sink's \(SinkSQL.schemaVersion): run the newer stockade-sink")
            }
            for version in stride(from: from + 1, through: SinkSQL.schemaVersion, by: 1) {
                for statement in SinkSQL.migrations[version - 1] { try await query(PostgresQuery(unsafeSQL: statement)) }
                try await query(PostgresQuery(unsafeSQL: "INSERT INTO stockade_schema_version (version) VALUES (\(version))"))
            }
        }
        return (from, SinkSQL.schemaVersion)
    }

    /// The stored position, the highest ever applied, its event's fingerprint and its term. A database with
    /// no highest position (migrated from version 1, or cleared by a re-seed) gets it from the rows'
    /// own positions first, once (a scan of the tables).
    func storedState() async throws(SinkError) -> StoredState {
        do {
            // What was stored of the old highest position's event (its fingerprint and term) goes with
            // it: the recomputed position may be another event's.
            try await query(PostgresQuery(unsafeSQL: """
                UPDATE stockade_sink_position SET last_event_position = GREATEST(position,
                    (SELECT max(changed_position) FROM skus), (SELECT max(changed_position) FROM orders), (SELECT max(position) FROM events)),
                    last_event_fingerprint = NULL, last_event_epoch = NULL, last_event_epoch_start = NULL
                WHERE id = 1 AND last_event_position IS NULL
                """))
            let rows = try await query(PostgresQuery(unsafeSQL: """
                SELECT position, last_event_position, last_event_fingerprint, last_event_epoch, last_event_epoch_start
                FROM stockade_sink_position WHERE id = 1
                """))
            guard let row = rows.first else {
                throw SinkError(.diverged, "stockade_sink_position has no row: was it emptied by hand? Start over with --reset")
            }
            let (position, highest, fingerprint, epoch, start) = try row.decode((Int64, Int64?, Int64?, Int64?, Int64?).self)
            guard let stored = UInt64(exactly: position), let highWater = UInt64(exactly: highest ?? position) else {
                throw SinkError(.diverged, "stockade_sink_position holds position \(position), highest \(highest ?? 0): changed by hand?")
            }
            let known = highWater > 0 && highWater >= stored
            var term: LogTerm?
            if known, let epoch, let start {
                guard let epoch = UInt64(exactly: epoch), let start = UInt64(exactly: start), (epoch == 0) == (start == 0), start <= highWater else {
                    throw SinkError(.diverged, "stockade_sink_position holds epoch \(epoch) from position \(start) for position \(highWater): changed by hand? Start over with --reset")
                }
                term = LogTerm(epoch: epoch, start: start)
            }
            return StoredState(position: stored, highWater: max(stored, highWater), fingerprint: known ? fingerprint : nil, term: term)
        } catch {
            throw Self.classify(error, doing: "reading the stored position")
        }
    }

    /// Applies `plan` and stores its last position, all in one transaction: either every change of
    /// the batch and its position are committed, or none.
    func apply(_ plan: BatchPlan, replay: Bool) async throws(SinkError) {
        let statements = SinkSQL.statements(for: plan, replay: replay)
        try await transaction("applying positions \(plan.previousPosition + 1)-\(plan.lastPosition)") {
            for statement in statements {
                let rows = try await query(Self.query(statement))
                guard let expected = statement.expectedCount else { continue }
                let count = try rows.first?.decode(Int64.self) ?? -1
                if count != expected, let mismatch = statement.mismatch {
                    throw mismatch
                }
            }
        }
    }

    /// Empties the sink's tables and sets the position back to 0, in one transaction: the next run
    /// applies the server's log from its first event.
    func reset() async throws(SinkError) {
        try await transaction("emptying the sink's tables") {
            // The position row first: a sink writing meanwhile waits, then finds it moved.
            try await query("""
                UPDATE stockade_sink_position SET position = 0, last_event_position = NULL, last_event_fingerprint = NULL,
                    last_event_epoch = NULL, last_event_epoch_start = NULL, updated_at = now() WHERE id = 1
                """)
            try await query(PostgresQuery(unsafeSQL: SinkSQL.reset))
        }
    }

    /// Runs `body` between BEGIN and COMMIT; rolls back if it throws. A COMMIT whose answer was
    /// lost leaves the outcome unknown: the caller reads the stored position again to learn it.
    private func transaction(_ what: String, _ body: () async throws -> Void) async throws(SinkError) {
        do {
            try await query("BEGIN")
        } catch {
            throw Self.classify(error, doing: what)
        }
        do {
            try await body()
            try await query("COMMIT")
        } catch {
            if Self.leavesConnectionUsable(error) && !connection.isClosed && !dropped.isSet { _ = try? await query("ROLLBACK") }
            if let sinkError = error as? SinkError { throw sinkError }
            throw Self.classify(error, doing: what)
        }
    }

    /// Whether a statement's failure leaves a connection that takes a ROLLBACK: PostgreSQL answered
    /// it with an error, or the sink's own check threw. A connection-level failure (closed by a stop,
    /// by the server, by a timeout) is never written to again: PostgresNIO 1.33 fails the query in
    /// progress before its channel is inactive, so `isClosed` can still be false, and a ROLLBACK
    /// written then never completes (a stopped `--reset` waited out the statement timeout).
    /// The caller reconnects after such a failure (``classify(_:doing:)`` makes it unavailable).
    static func leavesConnectionUsable(_ error: any Error) -> Bool {
        if let psql = error as? PSQLError { return psql.code == .server }
        if let sinkError = error as? SinkError { return sinkError.code != .databaseUnavailable && sinkError.code != .databaseTimeout }
        return true
    }

    private func run(_ what: String, _ statement: SinkStatement) async throws(SinkError) {
        do {
            try await query(Self.query(statement))
        } catch {
            throw Self.classify(error, doing: what)
        }
    }

    /// Runs one statement and reads its rows, within ``statementTimeoutMillis``: past it the
    /// connection is closed (the statement fails, and the sink reconnects with backoff). A
    /// connection the server already closed (PostgreSQL shut down or restarted while the sink was
    /// between batches) is refused here: PostgresNIO 1.33 writes a query to a closed channel
    /// without a promise, so the query would wait forever.
    @discardableResult
    private func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        guard !connection.isClosed, !dropped.isSet else {
            throw SinkError(.databaseUnavailable, "PostgreSQL \(address.description) closed the connection, or the sink dropped it")
        }
        let connection = self.connection
        let dropped = self.dropped
        let timedOut = Atomic<Bool>(false)
        // A little past PostgreSQL's own statement_timeout (set per session): the server's cancel
        // comes first when it still answers; this one when it does not.
        let timer = connection.eventLoop.scheduleTask(in: .milliseconds(statementTimeoutMillis + Self.clientTimeoutGraceMillis)) {
            timedOut.store(true, ordering: .sequentiallyConsistent)
            dropped.set()
            let _: EventLoopFuture<Void> = connection.close()
        }
        defer { timer.cancel() }
        do {
            return try await connection.query(query, logger: logger).collect()
        } catch {
            if timedOut.load(ordering: .sequentiallyConsistent) {
                throw SinkError(.databaseTimeout, "PostgreSQL \(address.description) did not answer within \(statementTimeoutMillis) ms (--statement-timeout-ms); the connection was dropped")
            }
            throw error
        }
    }

    private func singleInt(_ sql: String) async throws -> Int64 {
        let rows = try await query(PostgresQuery(unsafeSQL: sql))
        guard let first = rows.first else { throw SinkError(.diverged, "no row from: \(sql) (was the sink's table emptied by hand?)") }
        return try first.decode(Int64.self)
    }

    /// The PostgresNIO form of a statement.
    static func query(_ statement: SinkStatement) -> PostgresQuery {
        var binds = PostgresBindings(capacity: statement.binds.count)
        for value in statement.binds {
            switch value {
            case .int64(let v): binds.append(v)
            case .optionalInt64(let v): if let v { binds.append(v) } else { binds.appendNull() }
            case .int64s(let v): binds.append(v)
            case .texts(let v): binds.append(v)
            case .bools(let v): binds.append(v)
            case .byteas(let v): binds.append(v.map { ByteBuffer(bytes: $0) })
            }
        }
        return PostgresQuery(unsafeSQL: statement.sql, binds: binds)
    }

    /// SQLSTATEs outside the retried classes that a later try can get past: 55P03 a lock held past
    /// `lock_timeout` (a long report, a VACUUM FULL), 55006 an object in use, 25006 a read-only
    /// transaction (the address names a standby during a failover), 72000 a snapshot too old.
    static let transientStates: Set<String> = ["55P03", "55006", "25006", "72000"]

    /// Sorts a PostgresNIO error into what the sink does next: connection trouble and a server
    /// shutting down or starting are retried; a refused login, a missing database or a broken
    /// constraint are not (retrying cannot fix them).
    static func classify(_ error: any Error, doing what: String) -> SinkError {
        if let sinkError = error as? SinkError { return sinkError }
        guard let psql = error as? PSQLError else {
            return SinkError(.databaseUnavailable, "PostgreSQL: \(what): \(error)")
        }
        guard psql.code == .server, let info = psql.serverInfo else {
            let underlying = psql.underlying.map { ": \($0)" } ?? ""
            return SinkError(.databaseUnavailable, "PostgreSQL: \(what): \(psql.code)\(underlying)")
        }
        let state = info[.sqlState] ?? "?????"
        let detail = [info[.message], info[.detail], info[.hint]].compactMap { $0 }.joined(separator: "; ")
        let text = "PostgreSQL: \(what): \(detail) (SQLSTATE \(state))"
        if state == "57014" { return SinkError(.databaseTimeout, text) }
        if Self.transientStates.contains(state) { return SinkError(.databaseUnavailable, text) }
        switch state.prefix(2) {
        // Connection exceptions, operator intervention (shutdown, starting up, a statement
        // cancelled), insufficient resources (too many connections, disk full), serialization
        // failures and deadlocks: a later try can succeed.
        case "08", "57", "53", "40": return SinkError(.databaseUnavailable, text)
        case "28", "3D": return SinkError(.configuration, text)
        case "23": return SinkError(.diverged, text + ": the database does not follow this server's log (another server's database, or changed by hand)")
        case "22": return SinkError(.database, text + ": an event's amounts do not fit the table's columns (a bigint past 64 bits): no server logs that")
        default: return SinkError(.database, text)
        }
    }
}
