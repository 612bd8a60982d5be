import Foundation
import StockadeCore
import Synchronization

/// A data directory opened for service: recovery, then the engine writing to the journal, with
/// snapshots taken on demand or by cadence.
///
/// A snapshot is built off to the side, not from the live shards: the newest snapshot plus the
/// durable log is replayed into a fresh state up to the durable position and written out. The shards
/// never pause for it, and a snapshot is, by construction, exactly what recovery would rebuild.
///
/// A store holds the directory's exclusive lock (``DataDirectory/lock()``) from before recovery until
/// ``close()``: a second store on the same directory, in this process or another, fails at once.
public final class Store: Sendable {
    public struct Options: Sendable {
        public var shardCount: Int
        public var journal = Journal.Options()
        public var truncateCorrupt = false
        /// Verified snapshots kept; the older one (and the log after it) is the fallback if the newest
        /// fails to verify later. Invalid snapshots are never counted, and are removed.
        public var snapshotsKept = 2
        /// Log segments wholly covered by the oldest kept snapshot that are kept anyway (for readers of the log).
        public var coveredSegmentsKept = 0
        /// Where the shards run (``Engine/init(state:log:executors:)``): the server's event loops.
        /// Empty: each shard on a queue of its own.
        public var shardExecutors: [any SerialExecutor] = []
        /// How engine work pauses between slices on a shard's executor (``Engine/LaterTurn``); nil: it yields.
        public var laterTurn: Engine.LaterTurn?
        /// How large those slices are (``Engine/Slicing``).
        public var slicing = Engine.Slicing()
        /// A replica: the engine starts read-only (``EngineRole``), its state moved by a primary's log.
        public var readOnly = false
        /// How long the last written snapshot's checksums, once checked, are taken as whole by a
        /// snapshot with nothing new (which then writes nothing): a pipeline of SNAPSHOTs reads the
        /// file once per this at most (a read is linear in its size: about 31 ms for 8 MB), and damage
        /// done to it is found within this.
        public var snapshotRecheckNanos: UInt64 = 1_000_000_000
        public init(shardCount: Int) { self.shardCount = shardCount }
    }

    public let directory: DataDirectory
    public let options: Options
    public let engine: Engine
    public let journal: Journal
    public let recovery: Recovery.Report
    /// Unfinished snapshots (`.snap.tmp`) a crash left behind, removed at start-up.
    public let removedUnfinishedSnapshots: [String]
    /// Moves of a log into a `diverged-*` subdirectory that a crash interrupted, finished at start-up
    /// (``DataDirectory/finishSettingAside()``): the subdirectories.
    public let finishedSetAside: [String]
    private let snapshotLock = AsyncLock()
    /// The snapshot this store wrote last (verified and pruned around), while it is the newest on disk,
    /// and when its checksums were last found whole (monotonic nanoseconds).
    private let lastWritten = Mutex<(written: SnapshotFile.Written, checkedAt: UInt64)?>(nil)
    private let directoryLock: any StorageLock

    /// Opens the data directory at `path` on real files.
    public convenience init(path: String, options: Options) throws(JournalError) {
        try self.init(directory: DataDirectory(path), options: options)
    }

    /// Opens a data directory on any storage: creates it (and missing parents), takes its lock,
    /// removes unfinished snapshots, recovers, and starts the journal at the recovered position.
    public init(directory: DataDirectory, options: Options) throws(JournalError) {
        self.directory = directory
        self.options = options
        try directory.create()
        let lock = try directory.lock()
        do {
            // Only under the lock: another process's files are not ours to move or remove. First the
            // move of a diverged log a crash interrupted (decided before the crash: it is finished).
            finishedSetAside = try directory.finishSettingAside()
            var removed: [String] = []
            for tmp in try directory.unfinishedSnapshots() {
                try directory.storage.remove(tmp)
                removed.append(tmp)
            }
            if !removed.isEmpty { try directory.storage.syncDirectory(directory.path) }
            removedUnfinishedSnapshots = removed
            let (state, report) = try Recovery.recover(
                directory, options: Recovery.Options(shardCount: options.shardCount, truncateCorrupt: options.truncateCorrupt))
            recovery = report
            journal = try Journal(directory: directory, shardCount: state.shards.count, lsn: state.lsn, options: options.journal)
            engine = Engine(
                state: state, log: journal, executors: options.shardExecutors, laterTurn: options.laterTurn,
                readOnly: options.readOnly, slicing: options.slicing)
        } catch {
            lock.release()
            throw error
        }
        directoryLock = lock
    }

    /// What a snapshot did.
    public struct SnapshotReport: Sendable, CustomStringConvertible {
        public var written: SnapshotFile.Written
        public var durationNanos: UInt64
        public var removedSegments: [String]
        public var removedSnapshots: [String]
        /// Snapshots that failed verification while pruning (each with why); removed, never counted.
        public var invalidSnapshots: [String] = []
        /// Nothing was written: the snapshot this store wrote last covers the durable position
        /// already (`written` is that one).
        public var unchanged = false
        public var description: String {
            if unchanged {
                return "snapshot \(written.path) at position \(written.lsn) covers the log already: nothing written"
            }
            var text = String(
                format: "snapshot %@ at position %llu: %d bytes (%d raw) in %.3f s; removed %d segments, %d snapshots",
                written.path, written.lsn, written.bytes, written.rawBytes, Double(durationNanos) / 1e9,
                removedSegments.count, removedSnapshots.count)
            for invalid in invalidSnapshots { text += "; removed INVALID snapshot \(invalid)" }
            return text
        }
    }

    /// Runs `body` while no snapshot is written or pruned (one that is under way finishes first): a
    /// replica puts a full copy in place this way, renaming files and starting its log again where
    /// a concurrent snapshot would read and prune them.
    public func withoutSnapshots<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        try await snapshotLock.run(body)
    }

    /// What ``startOver(setAsideAs:)`` did.
    public struct StartOver: Sendable {
        /// Where the old files are now, and their names.
        public var setAside: DataDirectory.SetAside
        /// The old log's durable position (its last record).
        public var previousLSN: UInt64
    }

    /// A node whose log went another way from its primary's starts over empty, keeping its files:
    /// every segment and snapshot moves into the subdirectory `name` (``DataDirectory/setAside(into:)``),
    /// the log starts again at position 0 (``Journal/restart(at:)``), and the engine (read-only) is
    /// given an empty state. No snapshot runs meanwhile; nothing may be appended meanwhile (a replica's
    /// link is its only writer). A crash at any point leaves the old directory or an empty one.
    public func startOver(setAsideAs name: String) async throws -> StartOver {
        try await snapshotLock.run {
            let previous = journal.lastDurableLSN
            let setAside = try directory.setAside(into: name)
            try journal.restart(at: 0)
            lastWritten.withLock { $0 = nil }
            await engine.installReplicated(EngineState(shardCount: engine.shardCount))
            return StartOver(setAside: setAside, previousLSN: previous)
        }
    }

    /// Writes a snapshot of everything durable now, then prunes old snapshots and covered segments.
    /// One at a time; the engine keeps serving throughout.
    public func snapshot() async throws -> SnapshotReport {
        try await snapshotLock.run {
            let started = monotonicNanos()
            let upTo = journal.lastDurableLSN
            // Nothing new since the last one this store wrote (a pipeline of SNAPSHOTs, a cadence
            // with no changes): writing the same state again would only cost a core for a while. Only
            // while that file is still whole: it was verified in full when written, so its checksums
            // (and its header's position) find any damage since (then it is written again, and
            // pruning removes the damaged one); checked again once ``Options/snapshotRecheckNanos`` have passed.
            if let (last, checkedAt) = lastWritten.withLock({ $0 }), last.lsn == upTo, try directory.snapshots().last?.path == last.path {
                let now = monotonicNanos()
                let whole = now &- checkedAt < options.snapshotRecheckNanos
                    || (try? SnapshotFile.verifyBlocks(last.path, lsn: last.lsn, storage: directory.storage)) != nil
                if whole {
                    if now &- checkedAt >= options.snapshotRecheckNanos { lastWritten.withLock { $0?.checkedAt = now } }
                    return SnapshotReport(
                        written: last, durationNanos: monotonicNanos() - started, removedSegments: [], removedSnapshots: [], unchanged: true)
                }
            }
            let (state, recovered) = try Recovery.recover(
                directory, options: Recovery.Options(shardCount: options.shardCount, repair: false, upToLSN: upTo))
            // The header names the log's last records through the snapshot's position, read back from
            // the log (up to ``LogFingerprint/windowMax``, as many as it holds); else the fingerprints
            // the snapshot it started from named, when no record followed that one and the log no
            // longer holds any of them.
            let lastRecords = LogReader(directory: directory).snapshotFingerprint(through: state.lsn, durable: upTo)
                ?? (state.lsn == recovered.snapshotLSN ? recovered.snapshotLastRecords : nil)
            let written = try SnapshotFile.write(state, lastRecords: lastRecords, to: directory)
            let pruned = try prune(justWritten: written.path)
            lastWritten.withLock { $0 = (written, monotonicNanos()) }
            return SnapshotReport(
                written: written, durationNanos: monotonicNanos() - started, removedSegments: pruned.segments,
                removedSnapshots: pruned.snapshots, invalidSnapshots: pruned.invalid)
        }
    }

    /// Keeps the newest ``Options/snapshotsKept`` snapshots that verify now and the log after the
    /// oldest of them; removes every other snapshot (older ones, and any that fail verification) and
    /// the segments that oldest one covers. Until that many verify, no segment is removed.
    ///
    /// So what remains always recovers everything: if any one kept snapshot goes bad later, another
    /// kept one plus the log after the oldest covers it; and a bad one found here is not counted, so a
    /// second fault later is covered the same way.
    private func prune(justWritten: String) throws(JournalError) -> (snapshots: [String], segments: [String], invalid: [String]) {
        let keepCount = max(1, options.snapshotsKept)
        var kept: [(lsn: UInt64, path: String)] = []
        var doomed: [String] = []
        var invalid: [String] = []
        for snapshot in try directory.snapshots().reversed() {
            if kept.count == keepCount {
                doomed.append(snapshot.path)
                continue
            }
            do throws(JournalError) {
                let (_, lastRecords) = try SnapshotFile.load(snapshot.path, lsn: snapshot.lsn, storage: directory.storage)
                // Another log's snapshot (copied in) is no fallback for this one: counting it would let
                // this log's segments go on its word.
                if let why = Recovery.foreignSnapshotReason(lsn: snapshot.lsn, lastRecords: lastRecords, in: directory) {
                    throw JournalError(.corrupt, why)
                }
                kept.append(snapshot)
            } catch {
                invalid.append("\(snapshot.path): \(error.message)")
                doomed.append(snapshot.path)
            }
        }
        guard kept.contains(where: { $0.path == justWritten }) else {
            // Nothing is removed on the word of a snapshot that did not read back.
            let why = invalid.first { $0.hasPrefix(justWritten) } ?? justWritten
            try? directory.storage.remove(justWritten)
            throw JournalError(.corrupt, "snapshot failed verification right after it was written, removed it: \(why)")
        }
        for path in doomed { try directory.storage.remove(path) }
        if !doomed.isEmpty { try directory.storage.syncDirectory(directory.path) }
        var segments: [String] = []
        if kept.count == keepCount, let oldest = kept.last {
            segments = try journal.removeSegments(coveredThrough: oldest.lsn, keep: options.coveredSegmentsKept)
        }
        return (doomed.filter { path in !invalid.contains { $0.hasPrefix(path + ":") } }, segments, invalid)
    }

    /// Flushes and syncs the log, stops its writer, and releases the directory's lock. The engine
    /// refuses changes afterwards.
    public func close() {
        journal.close()
        directoryLock.release()
    }
}

/// Runs one async operation at a time (snapshots; a server's role changes), without blocking a
/// thread while waiting.
package actor AsyncLock {
    private var busy = false
    private var queue: [CheckedContinuation<Void, Never>] = []

    package init() {}

    package func run<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        if busy {
            // Checked again in the body: the `await` may suspend before the body runs, and the holder
            // may finish meanwhile; a waiter that joined then would wait for the next caller.
            await withCheckedContinuation { waiter in
                if busy { queue.append(waiter) } else { busy = true; waiter.resume() }
            }
        }
        // Ours: taken above, or handed over by the previous holder with `busy` left set.
        busy = true
        defer {
            if queue.isEmpty { busy = false } else { queue.removeFirst().resume() }
        }
        return try await body()
    }
}
