import Foundation
import StockadeCore

/// A data directory opened for service: recovery, then the engine writing to the journal, with
/// snapshots taken on demand or by cadence.
///
/// A snapshot is built off to the side, not from the live shards: the newest snapshot plus the
/// durable log is replayed into a fresh state up to the durable position and written out. The shards
/// never pause for it, and a snapshot is, by construction, exactly what recovery would rebuild.
public final class Store: Sendable {
    public struct Options: Sendable {
        public var shardCount: Int
        public var journal = Journal.Options()
        public var truncateCorrupt = false
        /// Snapshots kept; the older one (and the log after it) is the fallback if the newest fails to verify.
        public var snapshotsKept = 2
        /// Log segments wholly covered by the oldest kept snapshot that are kept anyway (for readers of the log).
        public var coveredSegmentsKept = 0
        public init(shardCount: Int) { self.shardCount = shardCount }
    }

    public let directory: DataDirectory
    public let options: Options
    public let engine: Engine
    public let journal: Journal
    public let recovery: Recovery.Report
    private let snapshotLock = AsyncLock()

    public init(path: String, options: Options) throws(JournalError) {
        directory = DataDirectory(path)
        self.options = options
        try directory.create()
        let (state, report) = try Recovery.recover(
            directory, options: Recovery.Options(shardCount: options.shardCount, truncateCorrupt: options.truncateCorrupt))
        recovery = report
        journal = try Journal(directory: directory, shardCount: state.shards.count, lsn: state.lsn, options: options.journal)
        engine = Engine(state: state, log: journal)
    }

    /// What a snapshot did.
    public struct SnapshotReport: Sendable, CustomStringConvertible {
        public var written: SnapshotFile.Written
        public var durationNanos: UInt64
        public var removedSegments: [String]
        public var removedSnapshots: [String]
        public var description: String {
            String(
                format: "snapshot %@ at position %llu: %d bytes (%d raw) in %.3f s; removed %d segments, %d snapshots",
                written.path, written.lsn, written.bytes, written.rawBytes, Double(durationNanos) / 1e9,
                removedSegments.count, removedSnapshots.count)
        }
    }

    /// Writes a snapshot of everything durable now, then prunes old snapshots and covered segments.
    /// One at a time; the engine keeps serving throughout.
    public func snapshot() async throws -> SnapshotReport {
        try await snapshotLock.run {
            let started = monotonicNanos()
            let upTo = journal.lastDurableLSN
            let (state, _) = try Recovery.recover(
                directory, options: Recovery.Options(shardCount: options.shardCount, repair: false, upToLSN: upTo))
            let written = try SnapshotFile.write(state, to: directory)
            var removedSnapshots: [String] = []
            let snapshots = try directory.snapshots()
            for old in snapshots.dropLast(max(1, options.snapshotsKept)) {
                try File.remove(old.path)
                removedSnapshots.append(old.path)
            }
            // Only once the fallback snapshot exists: the log after it is what an invalid newest snapshot needs.
            let kept = try directory.snapshots()
            var removed: [String] = []
            if kept.count >= max(1, options.snapshotsKept), let oldest = kept.first {
                removed = try journal.removeSegments(coveredThrough: oldest.lsn, keep: options.coveredSegmentsKept)
            }
            return SnapshotReport(
                written: written, durationNanos: monotonicNanos() - started, removedSegments: removed,
                removedSnapshots: removedSnapshots)
        }
    }

    /// Flushes and syncs the log and stops its writer. The engine refuses changes afterwards.
    public func close() { journal.close() }
}

/// Runs one async operation at a time (snapshots), without blocking a thread while waiting.
actor AsyncLock {
    private var busy = false
    private var queue: [CheckedContinuation<Void, Never>] = []

    func run<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        if busy {
            await withCheckedContinuation { queue.append($0) }
        }
        busy = true
        defer {
            if queue.isEmpty { busy = false } else { queue.removeFirst().resume() }
        }
        return try await body()
    }
}
