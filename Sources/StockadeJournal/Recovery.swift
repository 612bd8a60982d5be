import Foundation
import StockadeCore

#if canImport(Glibc)
import Glibc
#endif

/// Rebuilds the state from a data directory: the newest snapshot that verifies, then the log after it.
public enum Recovery {
    public struct Options: Sendable {
        /// Shard count for a directory that holds nothing yet; an existing directory keeps its own.
        public var shardCount: Int
        /// Cut a torn last block off the file (start-up does; read-only tools and snapshots do not).
        public var repair: Bool
        /// On a checksum failure before the end of the log, truncate there instead of refusing to start.
        /// What followed the bad block, acknowledged or not, is lost.
        public var truncateCorrupt: Bool
        /// Stop after this log position (snapshots built while the log is being written).
        public var upToLSN: UInt64?

        public init(shardCount: Int, repair: Bool = true, truncateCorrupt: Bool = false, upToLSN: UInt64? = nil) {
            self.shardCount = shardCount
            self.repair = repair
            self.truncateCorrupt = truncateCorrupt
            self.upToLSN = upToLSN
        }
    }

    /// What recovery found and did, for the start-up log.
    public struct Report: Sendable, CustomStringConvertible {
        public var snapshotPath: String?
        public var snapshotLSN: UInt64 = 0
        /// The fingerprint of the log's last records that snapshot's header names (nil: none, or no snapshot).
        public var snapshotLastRecords: LogFingerprint?
        /// Whether that fingerprint was compared with the log's records through the snapshot's
        /// position (and matched); false when the log no longer holds them or the snapshot names none.
        public var snapshotMatchedLog = false
        /// Snapshots that failed verification, each with why; recovery used an older one and more log.
        public var skippedSnapshots: [String] = []
        /// Snapshots of another log, each with why (also in ``skippedSnapshots``): the log's last records
        /// through their position are not the ones they name. Never a sign of how far this
        /// log reached.
        public var foreignSnapshots: [String] = []
        public var segmentsRead = 0
        public var blocksRead = 0
        public var recordsReplayed = 0
        /// A torn last block that was cut off: file, offset, bytes removed.
        public var tornTail: String?
        /// Zeros past the last block of the last segment, cut off: space the log had allocated ahead
        /// of its writes and not yet written when the process stopped (or a batch whose write had
        /// not begun to reach the disk); bytes removed, 0 when there were none. A disk that zeroed
        /// whole blocks it had synced would look the same (docs/FORMAT.md, Recovery).
        public var unwrittenBytesCut = 0
        /// Corruption truncated on request (`truncateCorrupt`).
        public var truncatedCorruption: String?
        /// The last position the log's segments read here hold (the position before the first one's
        /// first record when they hold none): below ``snapshotLSN`` when the snapshot is past the
        /// log's end. Nil when no segment was read.
        public var logEnd: UInt64?
        /// The snapshot used holds changes past the end of the log read after it
        /// (``snapshotPastLogEnd``): nothing could compare it with this log.
        public var snapshotPastLogEnd: Bool { logEnd.map { $0 < snapshotLSN } ?? false }
        public var lsn: UInt64 = 0
        public var durationNanos: UInt64 = 0

        public var description: String {
            var parts = ["recovered to log position \(lsn)"]
            if let snapshotPath { parts.append("from snapshot \(snapshotPath) (position \(snapshotLSN))") } else { parts.append("without a snapshot") }
            parts.append("replayed \(recordsReplayed) records in \(blocksRead) blocks from \(segmentsRead) segments")
            parts.append(String(format: "in %.3f s", Double(durationNanos) / 1e9))
            for skipped in skippedSnapshots { parts.append("skipped snapshot \(skipped)") }
            if let tornTail { parts.append("cut torn tail: \(tornTail)") }
            if unwrittenBytesCut > 0 { parts.append("cut \(unwrittenBytesCut) bytes of allocated space past the last block") }
            if let truncatedCorruption { parts.append("TRUNCATED CORRUPTION: \(truncatedCorruption)") }
            if snapshotPastLogEnd, let logEnd {
                parts.append(
                    "the snapshot is past the end of the log (position \(logEnd)): its changes after that are in no log here "
                        + (truncatedCorruption != nil
                            ? "(the log was cut above)"
                            : "(a replica's full copy interrupted, a power cut with --fsync everysec or none, or a snapshot copied in "
                                + "from another data directory, which nothing here can tell apart)"))
            }
            return parts.joined(separator: "; ")
        }
    }

    public static func recover(_ directory: DataDirectory, options: Options) throws(JournalError) -> (EngineState, Report) {
        let started = monotonicNanos()
        var report = Report()
        var state = EngineState(shardCount: options.shardCount)
        var fromSnapshot = false
        /// The position of the newest snapshot that could not be read (0: none).
        var skippedLSN: UInt64 = 0
        for snapshot in try directory.snapshots().reversed() {
            if let upTo = options.upToLSN, snapshot.lsn > upTo { continue }
            do {
                let (loaded, lastRecords) = try SnapshotFile.load(snapshot.path, lsn: snapshot.lsn, storage: directory.storage)
                let matched = match(lsn: snapshot.lsn, lastRecords: lastRecords, in: directory)
                if case .another(let why) = matched {
                    // Not this log's: replaying this log after it would build a state neither store had.
                    report.skippedSnapshots.append("\(snapshot.path): \(why)")
                    report.foreignSnapshots.append("\(snapshot.path): \(why)")
                    continue
                }
                report.snapshotMatchedLog = matched == .same
                state = loaded
                report.snapshotPath = snapshot.path
                report.snapshotLSN = snapshot.lsn
                report.snapshotLastRecords = lastRecords
                fromSnapshot = true
                break
            } catch {
                report.skippedSnapshots.append("\(snapshot.path): \(error.message)")
                skippedLSN = max(skippedLSN, snapshot.lsn)
            }
        }

        let segments = try directory.segments()
        // Segments wholly before the state's position need not be read.
        var first = 0
        while first + 1 < segments.count, segments[first + 1].firstLSN <= state.lsn + 1 { first += 1 }
        var index = first
        /// The refusal when a snapshot that could not be read once reached further than what can be
        /// recovered: it names that snapshot, the file to restore (`gap`: where the log stops first).
        func lostState(gap: String? = nil) -> JournalError {
            JournalError(
                .gap,
                "the state once reached log position \(skippedLSN) (\(report.skippedSnapshots.first ?? "a snapshot")), "
                    + "but the readable snapshots and the log reach only position \(state.lsn)"
                    + (gap.map { " (\($0): the log before it was removed after that snapshot)" } ?? "")
                    + ": starting would lose the changes in between. Restore the data directory (or that snapshot) from a copy"
                    + (gap == nil ? ", or start with --truncate-corrupt to keep only what the log holds (if it starts at the beginning)." : "."))
        }
        segmentLoop: while index < segments.count {
            let segment = segments[index]
            let isLast = index == segments.count - 1
            let bytes = try directory.storage.readAll(segment.path)
            report.segmentsRead += 1
            let outcome: SegmentOutcome
            do {
                outcome = try typed {
                    try bytes.withUnsafeBytes { all in
                      try replaySegment(
                        all, path: segment.path, isLast: isLast, state: &state, adoptShardCount: !fromSnapshot && state.lsn == 0,
                        options: options, report: &report)
                    }
                }
            } catch where error.code == .gap && skippedLSN > state.lsn {
                // Records are missing because the snapshot that held them could not be read: that is
                // what to restore, not a log segment (the log before it was pruned by design).
                throw lostState(gap: error.message)
            }
            switch outcome {
            case .complete:
                index += 1
            case .reachedLimit:
                break segmentLoop
            case .unwritten(let offset):
                report.unwrittenBytesCut = bytes.count - offset
                if options.repair { try cut(segment.path, at: offset, in: directory) }
                break segmentLoop
            case .torn(let offset, let why):
                report.tornTail = "\(segment.path) at offset \(offset), \(bytes.count - offset) bytes (\(why))"
                if options.repair { try cut(segment.path, at: offset, in: directory) }
                break segmentLoop
            case .corrupt(let offset, let why):
                guard options.truncateCorrupt else {
                    throw JournalError(
                        .corrupt,
                        "\(segment.path) at offset \(offset): \(why). This is corruption before the end of the log, not a torn write; "
                            + "the records after it cannot be trusted. Restore the data directory from a copy, or start with "
                            + "--truncate-corrupt to keep only what precedes offset \(offset) (everything after it is lost).")
                }
                report.truncatedCorruption = "\(segment.path) at offset \(offset) (\(why)); later segments removed"
                if options.repair {
                    try cut(segment.path, at: offset, in: directory)
                    for later in segments[(index + 1)...] { try directory.storage.remove(later.path) }
                    try directory.storage.syncDirectory(directory.path)
                }
                break segmentLoop
            }
        }
        // A snapshot that could not be read still says how far the state once reached: recovering to
        // less (its log already pruned, or never there) would start without acknowledged changes.
        if skippedLSN > state.lsn, !options.truncateCorrupt { throw lostState() }
        report.lsn = state.lsn
        report.durationNanos = monotonicNanos() - started
        return (state, report)
    }

    /// Whether a snapshot of position `lsn` whose header names `lastRecords` is a snapshot of the log
    /// in `directory`: compared over its whole window where the log holds it, else by the record at
    /// `lsn` alone. Nothing can be compared when the snapshot names no fingerprint (an older build's)
    /// or the log does not hold that record (removed after a later snapshot, or never written here:
    /// a replica's full copy starts its log after the copy's position).
    public enum LogMatch: Equatable, Sendable {
        /// The log's records through the snapshot's position have the fingerprints the snapshot names.
        case same
        /// It has another: the snapshot was taken from another log. Says so, for the report.
        case another(String)
        case cannotTell
    }

    public static func match(lsn: UInt64, lastRecords: LogFingerprint?, in directory: DataDirectory) -> LogMatch {
        guard let lastRecords, lsn > 0 else { return .cannotTell }
        let reader = LogReader(directory: directory)
        let why = "it is a snapshot of another log (copied in from another data directory?): "
        // The whole window where the log holds it; else the last record alone (the window's start
        // removed after a later snapshot of this log, or never here).
        if let logs = reader.snapshotFingerprint(through: lsn, records: lastRecords.records, durable: lsn) {
            if logs == lastRecords { return .same }
            return .another(why + "its fingerprint of the last records through position \(lsn) is \(lastRecords), this log's \(logs)")
        }
        guard let last = reader.lastRecordFingerprint(at: lsn, durable: lsn) else { return .cannotTell }
        if last == lastRecords.last { return .same }
        return .another(
            why + "its fingerprint of the record at position \(lsn) is \(String(lastRecords.last, radix: 16)), this log's \(String(last, radix: 16))")
    }

    /// Why the snapshot is another log's (``match(lsn:lastRecords:in:)``), or nil.
    public static func foreignSnapshotReason(lsn: UInt64, lastRecords: LogFingerprint?, in directory: DataDirectory) -> String? {
        if case .another(let why) = match(lsn: lsn, lastRecords: lastRecords, in: directory) { return why }
        return nil
    }

    enum SegmentOutcome {
        case complete
        case reachedLimit
        /// Only zeros from a block boundary to the end of the last segment: space allocated ahead.
        case unwritten(offset: Int)
        case torn(offset: Int, String)
        case corrupt(offset: Int, String)
    }

    private static func replaySegment(
        _ all: UnsafeRawBufferPointer, path: String, isLast: Bool, state: inout EngineState, adoptShardCount: Bool,
        options: Options, report: inout Report
    ) throws(JournalError) -> SegmentOutcome {
        let header: SegmentHeader
        switch SegmentHeader.parse(all) {
        case .header(let parsed): header = parsed
        case .truncated:
            return isLast ? .torn(offset: 0, "segment header incomplete") : .corrupt(offset: 0, "segment header incomplete")
        case .invalid(let why):
            return isLast && allZero(all, from: 0) ? .torn(offset: 0, "zeroed segment header") : .corrupt(offset: 0, why)
        }
        if header.shardCount != state.shards.count {
            guard adoptShardCount else {
                throw JournalError(.format, "\(path) was written with \(header.shardCount) shards, the state has \(state.shards.count)")
            }
            state = EngineState(shardCount: header.shardCount)
        }
        if header.firstLSN > state.lsn + 1 {
            throw JournalError(.gap, "\(path) starts at log position \(header.firstLSN); records after \(state.lsn) are missing")
        }
        var offset = SegmentHeader.size
        var expectedLSN = header.firstLSN
        report.logEnd = max(report.logEnd ?? 0, header.firstLSN > 0 ? header.firstLSN - 1 : 0)
        while offset < all.count {
            if isLast && all[offset] == 0 && allZero(all, from: offset) { return .unwritten(offset: offset) }
            switch BlockCodec.read(all, at: offset) {
            case .truncated:
                return damage(all, at: offset, isLast: isLast, "block cut short")
            case .invalid(let why):
                return damage(all, at: offset, isLast: isLast, allZero(all, from: offset) ? "zeroed tail" : why)
            case .block(let h, let payload):
                guard h.firstLSN == expectedLSN else {
                    return .corrupt(offset: offset, "block starts at position \(h.firstLSN), expected \(expectedLSN)")
                }
                report.blocksRead += 1
                let (end, overflow) = h.firstLSN.addingReportingOverflow(UInt64(h.recordCount))
                if !overflow, end > 0 { report.logEnd = max(report.logEnd ?? 0, end - 1) }
                var lsn = h.firstLSN
                var decoded = 0
                do {
                    try payload.withUnsafeBytes { raw in
                        try Record.decodeAll(raw) { record in
                            decoded += 1
                            defer { lsn += 1 }
                            guard lsn > state.lsn else { return }
                            if let upTo = options.upToLSN, lsn > upTo { throw StopReplay() }
                            guard lsn == state.lsn + 1 else {
                                throw JournalError(.gap, "\(path): record \(lsn) follows \(state.lsn)")
                            }
                            try state.apply(record)
                            report.recordsReplayed += 1
                        }
                    }
                } catch is StopReplay {
                    return .reachedLimit
                } catch let error as JournalError {
                    throw error
                } catch let error as EngineState.ReplayError {
                    // The record that failed is the one after the state's position (`lsn` has
                    // already moved past it as the closure left).
                    throw JournalError(.replay, "\(path) block at offset \(offset), record \(state.lsn + 1): \(error.reason)")
                } catch {
                    return .corrupt(offset: offset, "\(error)")
                }
                guard decoded == h.recordCount else {
                    return .corrupt(offset: offset, "block holds \(decoded) records, header says \(h.recordCount)")
                }
                expectedLSN = h.firstLSN + UInt64(h.recordCount)
                offset += h.totalLength
                if let upTo = options.upToLSN, state.lsn >= upTo { return .reachedLimit }
            }
        }
        return .complete
    }

    private struct StopReplay: Error {}

    /// Decides what a block that fails at `offset` is. Only a true tail, with nothing valid after it
    /// in the last segment, is a torn write that can be cut: acknowledgement waits for the write, so a
    /// tail that never became a whole block held nothing acknowledged. Damage followed by a valid
    /// block, or in a segment that later segments follow, is corruption, whatever it looks like (a
    /// flipped bit in a length looks like a block cut short).
    static func damage(_ all: UnsafeRawBufferPointer, at offset: Int, isLast: Bool, _ why: String) -> SegmentOutcome {
        guard isLast else { return .corrupt(offset: offset, "\(why), in a segment that later segments follow") }
        // Past the damaged block when its header checked its own checksum (its length is then true and
        // the bytes inside it are its payload); from the next byte when it did not.
        var from = offset + 1
        if let header = BlockHeader.parse(UnsafeRawBufferPointer(rebasing: all[offset...])), header.headerVerified {
            from = offset + header.totalLength
        }
        if let next = BlockCodec.nextValidBlock(all, from: from) {
            return .corrupt(offset: offset, "\(why); a valid block follows at offset \(next), so this is not a torn tail")
        }
        // Nothing valid follows. A torn write leaves the last block cut short: by the end of the file
        // (an append), or by the zeros that run from where the write stopped to the end of the file
        // (space allocated ahead, or a file system that extended the file). A block that is all there
        // and fails its checksum was damaged after it was written, and may hold acknowledged records:
        // that is corruption too.
        let zerosFrom = trailingZerosStart(all)
        if all.count - offset < BlockHeader.size || zerosFrom <= offset {
            return .torn(offset: offset, why)
        }
        if let header = BlockHeader.parse(UnsafeRawBufferPointer(rebasing: all[offset...])) {
            if offset + header.totalLength > all.count { return .torn(offset: offset, why) }
            // Version 3 ends in a trailer that is never zero: zeros reaching into the block mean the
            // write stopped before its end. (Versions 1 and 2, written by appends, end in any byte.)
            if header.version >= 3 && zerosFrom < offset + header.totalLength { return .torn(offset: offset, why) }
        } else if zerosFrom < offset + BlockHeader.size {
            // The write stopped inside the header: a whole block has a payload (never all zeros) and,
            // from version 3, a trailer after its header, so zeros from there on were never written.
            return .torn(offset: offset, why)
        }
        return .corrupt(offset: offset, "\(why); the block is complete up to the end of the file, so it was damaged after it was written, not torn")
    }

    /// The offset where the run of zero bytes that ends the file begins (`all.count` when the last
    /// byte is not zero).
    static func trailingZerosStart(_ all: UnsafeRawBufferPointer) -> Int {
        var start = all.count
        while start > 0 && all[start - 1] == 0 { start -= 1 }
        return start
    }

    private static func allZero(_ all: UnsafeRawBufferPointer, from offset: Int) -> Bool {
        all[offset...].allSatisfy { $0 == 0 }
    }

    /// Cuts a file at `offset` and syncs the cut (a cut that a crash undid would bring back a torn
    /// block in front of the segment the journal starts next); a segment cut inside its header is
    /// removed, as it holds nothing.
    private static func cut(_ path: String, at offset: Int, in directory: DataDirectory) throws(JournalError) {
        if offset < SegmentHeader.size {
            try directory.storage.remove(path)
            try directory.storage.syncDirectory(directory.path)
        } else {
            let file = try directory.storage.open(path, .update)
            defer { file.close() }
            try file.truncate(to: offset)
            try file.sync()
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: for durations only.
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// CLOCK_REALTIME in milliseconds: the "now" the edges pass into the engine for deadlines.
public func wallClockMillis() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
