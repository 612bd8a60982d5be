/// Why the sink stopped or could not do something, with what to do about it. One type for the
/// module, extensible by ``Code`` (as swift-service-lifecycle does it).
public struct SinkError: Error, CustomStringConvertible, Sendable {
    /// What kind of failure; the sink decides from it whether to retry.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        public var description: String { name }

        /// A flag or URL that cannot work: fix the command line.
        public static let configuration = Code("configuration")
        /// The server answered something that is not an EVENTS entry as documented.
        public static let badEvent = Code("badEvent")
        /// The events do not follow the stored position (a gap or a repeat inside a batch).
        public static let gap = Code("gap")
        /// `-TRIMMED`: the events after the stored position were removed from the server's log.
        public static let trimmed = Code("trimmed")
        /// `-BEYOND`: the stored position is past the end of the server's log.
        public static let beyond = Code("beyond")
        /// The database does not hold what the events say it must (a SKU or a pending order is
        /// missing, an order changes state twice): it was changed by someone else, or the sink is
        /// pointed at another server's database.
        public static let diverged = Code("diverged")
        /// Another sink moved the stored position meanwhile: two sinks on one database.
        public static let concurrentSink = Code("concurrentSink")
        /// The database's schema is newer than this sink knows.
        public static let schema = Code("schema")
        /// Stockade cannot be reached or dropped the connection: retried with backoff.
        public static let serverUnavailable = Code("serverUnavailable")
        /// PostgreSQL cannot be reached, dropped the connection or is shutting down or starting:
        /// retried with backoff, and the stored position read again (a lost COMMIT answer).
        public static let databaseUnavailable = Code("databaseUnavailable")
        /// A statement ran past the statement timeout (PostgreSQL's 57014, which a role's or
        /// database's own `statement_timeout` raises too, or no answer at all): retried like
        /// ``databaseUnavailable``, with smaller batches until one fits.
        public static let databaseTimeout = Code("databaseTimeout")
        /// An error from PostgreSQL that retrying will not fix.
        public static let database = Code("database")
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    /// Whether trying again later (new connections, same position) can succeed.
    public var isRetryable: Bool { code == .serverUnavailable || code == .databaseUnavailable || code == .databaseTimeout }
}
