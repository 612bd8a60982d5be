/// Why the journal, a snapshot or recovery failed: what, where (file and offset), and what to do.
public struct JournalError: Error, CustomStringConvertible, Sendable {
    /// What kind of failure, for callers that branch; new codes may be added.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: Hashable, Sendable { case io, corrupt, gap, format, replay, locked }
        private let value: Value
        /// A system call on a file failed.
        public static let io = Code(value: .io)
        /// A checksum failed before the end of the log: corruption, not a crash.
        public static let corrupt = Code(value: .corrupt)
        /// Log records are missing between a snapshot and the segments.
        public static let gap = Code(value: .gap)
        /// A file is not in a format this build reads.
        public static let format = Code(value: .format)
        /// A record does not fit the state it is replayed onto.
        public static let replay = Code(value: .replay)
        /// Another process (or another ``Store`` in this one) has the data directory open.
        public static let locked = Code(value: .locked)
        public var description: String { "\(value)" }
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}

/// Runs `body`, passing a ``JournalError`` through and wrapping anything else: for closures handed to
/// standard-library methods that erase typed throws.
func typed<T>(_ body: () throws -> T) throws(JournalError) -> T {
    do {
        return try body()
    } catch let error as JournalError {
        throw error
    } catch {
        throw JournalError(.io, "\(error)")
    }
}
