import Foundation
import Synchronization
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// A fresh directory under the system temporary folder, removed by the caller.
func temporaryDirectory(_ name: String = #function) -> String {
    let path = NSTemporaryDirectory() + "stockade-test-\(name.filter(\.isLetter))-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Runs `count` random commands (seeded) through a store; returns how many changed state.
@discardableResult
func runWorkload(_ store: Store, seed: UInt64, count: Int, now: inout Int64) async -> Int {
    var workload = RandomWorkload(seed: seed)
    var changes = 0
    for _ in 0..<count / 8 {
        now += Int64.random(in: 0...40, using: &workload.rng)
        await store.engine.expire(now: now)
        let commands = (0..<8).map { _ in workload.next() }
        for reply in await store.engine.execute(commands, now: now) {
            workload.observe(reply)
            if case .reserved(_, _, false) = reply { changes += 1 }
        }
    }
    return changes
}

func liveState(_ store: Store) async -> EngineState {
    await store.engine.captureState(lsn: store.journal.lastAppendedLSN)
}

func recover(_ path: String, repair: Bool = false, truncateCorrupt: Bool = false) throws -> (EngineState, Recovery.Report) {
    try Recovery.recover(DataDirectory(path), options: .init(shardCount: 3, repair: repair, truncateCorrupt: truncateCorrupt))
}

@Suite struct RecoveryTests {
    /// The state rebuilt from the log alone, and from a snapshot plus the log after it, hashes the
    /// same as the live engine at the same log position.
    @Test(arguments: [11 as UInt64, 12, 13])
    func recoveredStateEqualsLiveState(seed: UInt64) async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 3)
        options.journal.segmentBytesMax = 4096  // many segments
        let store = try Store(path: path, options: options)
        var now: Int64 = 1_000
        _ = await store.engine.execute(["apple", "pear", "plum", "fig", "kiwi", "lime", "date"].map { .addSku(sku: $0, total: 40, limit: 3) }, now: now)
        let placed = await runWorkload(store, seed: seed, count: 1_500, now: &now)
        #expect(placed > 50)
        let logOnlyCopy = path + "-logonly"
        try FileManager.default.copyItem(atPath: path, toPath: logOnlyCopy)
        defer { try? FileManager.default.removeItem(atPath: logOnlyCopy) }
        _ = try await store.snapshot()
        await runWorkload(store, seed: seed + 100, count: 1_500, now: &now)
        let live = await liveState(store)
        store.close()

        // Snapshot + log tail.
        let (fromSnapshot, report) = try recover(path)
        #expect(report.snapshotPath != nil && report.recordsReplayed > 0)
        #expect(fromSnapshot.lsn == live.lsn)
        #expect(fromSnapshot.stateHash() == live.stateHash())
        // Log alone: the copy made before the snapshot, plus every segment written since.
        for segment in try DataDirectory(path).segments() {
            let target = logOnlyCopy + "/" + (segment.path as NSString).lastPathComponent
            if !FileManager.default.fileExists(atPath: target) { try FileManager.default.copyItem(atPath: segment.path, toPath: target) }
        }
        for file in try FileManager.default.contentsOfDirectory(atPath: logOnlyCopy) where file.hasPrefix("wal-") {
            // The copy's last segment was still open then; the original has its final bytes.
            if FileManager.default.fileExists(atPath: path + "/" + file) {
                try FileManager.default.removeItem(atPath: logOnlyCopy + "/" + file)
                try FileManager.default.copyItem(atPath: path + "/" + file, toPath: logOnlyCopy + "/" + file)
            }
        }
        let (fromLog, logReport) = try recover(logOnlyCopy)
        #expect(logReport.snapshotPath == nil)
        #expect(fromLog.lsn == live.lsn)
        #expect(fromLog.stateHash() == live.stateHash())
        // A snapshot's image decodes to the same hash it was encoded from.
        let image = live.encodeImage()
        let decoded = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(decoded.stateHash() == live.stateHash())
    }

    /// Cutting the log at every byte offset of its last blocks: recovery always succeeds, with a
    /// prefix of the changes, and reports what it cut.
    @Test func tornTailAtEveryOffsetRecoversAPrefix() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        var hashes: [UInt64: UInt64] = [:]  // position -> state hash at that position
        hashes[store.journal.lastAppendedLSN] = await liveState(store).stateHash()
        for round in 0..<6 {
            let commands = (0..<(round + 1)).map { Command.reserve(user: Name("u\(round)-\($0)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 60_000) }
            _ = await store.engine.execute(commands, now: 0)
            hashes[store.journal.lastAppendedLSN] = await liveState(store).stateHash()
        }
        store.close()
        let segment = try DataDirectory(path).segments().last!.path
        let original = try Data(contentsOf: URL(fileURLWithPath: segment))
        // Offsets covering the last three blocks.
        var blockStarts: [Int] = []
        var offset = SegmentHeader.size
        while offset < original.count {
            blockStarts.append(offset)
            offset += original.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[offset...]))!.totalLength }
        }
        let from = blockStarts[max(0, blockStarts.count - 3)]
        let scratch = path + "-torn"
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        for cut in from..<original.count {
            try? FileManager.default.removeItem(atPath: scratch)
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            try original.prefix(cut).write(to: URL(fileURLWithPath: scratch + "/" + (segment as NSString).lastPathComponent))
            let (state, report) = try Recovery.recover(DataDirectory(scratch), options: .init(shardCount: 2, repair: true))
            #expect(hashes[state.lsn] == state.stateHash(), "cut at \(cut): position \(state.lsn) is not an acknowledged prefix")
            #expect(blockStarts.contains(cut) ? report.tornTail == nil : report.tornTail != nil, "cut at \(cut)")
            // The repair left a file that reads back clean.
            let (again, second) = try Recovery.recover(DataDirectory(scratch), options: .init(shardCount: 2, repair: false))
            #expect(second.tornTail == nil && again.lsn == state.lsn)
        }
    }

    /// A flipped byte in a block before the last is corruption: start-up refuses, naming file and
    /// offset; with truncateCorrupt it keeps what precedes it.
    @Test func midLogCorruptionIsRefused() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        let afterAdd = store.journal.lastAppendedLSN
        for round in 0..<4 {
            _ = await store.engine.execute((0..<8).map { Command.reserve(user: Name("u\(round)-\($0)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 60_000) }, now: 0)
        }
        store.close()
        let segment = try DataDirectory(path).segments().last!.path
        var bytes = try Data(contentsOf: URL(fileURLWithPath: segment))
        let firstBlockLength = bytes.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[SegmentHeader.size...]))!.totalLength }
        let secondBlock = SegmentHeader.size + firstBlockLength
        bytes[secondBlock + BlockHeader.size + 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: segment))
        do {
            _ = try recover(path, repair: true)
            Issue.record("recovery accepted a corrupt log")
        } catch let error as JournalError {
            #expect(error.code == .corrupt)
            #expect(error.message.contains(segment) && error.message.contains("offset \(secondBlock)"))
        }
        // Nothing was changed by the refusal.
        #expect(try Data(contentsOf: URL(fileURLWithPath: segment)) == bytes)
        let (state, report) = try recover(path, repair: true, truncateCorrupt: true)
        #expect(state.lsn == afterAdd && report.truncatedCorruption != nil)
    }

    /// An invalid newest snapshot is skipped for the previous one plus more log.
    @Test func invalidSnapshotFallsBackToThePreviousOne() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        _ = try await store.snapshot()
        _ = await store.engine.execute((0..<20).map { Command.reserve(user: Name("u\($0)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 60_000) }, now: 0)
        let newest = try await store.snapshot()
        let live = await liveState(store)
        store.close()
        var bytes = try Data(contentsOf: URL(fileURLWithPath: newest.written.path))
        bytes[bytes.count - 5] ^= 0xFF
        try bytes.write(to: URL(fileURLWithPath: newest.written.path))
        let (state, report) = try recover(path)
        #expect(report.skippedSnapshots.count == 1 && report.snapshotLSN < newest.written.lsn)
        #expect(state.stateHash() == live.stateHash())
    }

    /// A snapshot that cannot be read while the log no longer reaches its position (the segments it
    /// covered are gone): recovery refuses to start rather than start without the changes it held,
    /// where it used to start empty. With `truncateCorrupt` the operator takes what the log has.
    @Test(arguments: ["no log", "log removed up to the snapshot"])
    func anUnreadableSnapshotBeyondTheLogIsRefused(layout: String) async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 3))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        _ = await store.engine.execute((0..<20).map { Command.reserve(user: Name("u\($0)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 60_000) }, now: 0)
        let newest = try await store.snapshot()
        store.close()
        let directory = DataDirectory(path)
        for segment in try directory.segments() {
            if layout == "no log" || segment.firstLSN <= newest.written.lsn {
                try FileManager.default.removeItem(atPath: segment.path)
            }
        }
        var bytes = try Data(contentsOf: URL(fileURLWithPath: newest.written.path))
        bytes[bytes.count - 5] ^= 0xFF
        try bytes.write(to: URL(fileURLWithPath: newest.written.path))
        do {
            let (state, _) = try recover(path)
            Issue.record("recovery started at position \(state.lsn) without the snapshot's \(newest.written.lsn)")
        } catch let error as JournalError {
            #expect(error.code == .gap)
            #expect(error.message.contains("\(newest.written.lsn)"))
        }
        let (state, report) = try recover(path, truncateCorrupt: true)
        #expect(report.skippedSnapshots.count == 1 && state.lsn < newest.written.lsn)
    }

    /// The same with the log going on after the snapshot (a restart began a segment after it, the
    /// segments before were pruned): the refusal names the snapshot to restore, with or without
    /// `truncateCorrupt`. It named the first segment, "records after 0 are missing", and no file was
    /// missing (review).
    @Test func anUnreadableSnapshotBeforeAPrunedLogIsNamedAsWhatToRestore() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var store = try Store(path: path, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        _ = await store.engine.execute((0..<20).map { Command.reserve(user: Name("u\($0)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 60_000) }, now: 0)
        let newest = try await store.snapshot()
        store.close()
        store = try Store(path: path, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.restock(sku: "tv", delta: 5), now: 0)
        store.close()
        let directory = DataDirectory(path)
        let segments = try directory.segments()
        #expect(segments.contains { $0.firstLSN == newest.written.lsn + 1 })
        for segment in segments where segment.firstLSN <= newest.written.lsn {
            try FileManager.default.removeItem(atPath: segment.path)
        }
        var bytes = try Data(contentsOf: URL(fileURLWithPath: newest.written.path))
        bytes[100] ^= 0xFF
        try bytes.write(to: URL(fileURLWithPath: newest.written.path))
        for truncateCorrupt in [false, true] {
            do {
                let (state, _) = try recover(path, truncateCorrupt: truncateCorrupt)
                Issue.record("recovery started at position \(state.lsn) without the snapshot's \(newest.written.lsn)")
            } catch let error as JournalError {
                #expect(error.code == .gap)
                #expect(error.message.hasPrefix("the state once reached log position \(newest.written.lsn) (\(newest.written.path): "))
                #expect(error.message.contains("starts at log position \(newest.written.lsn + 1); records after 0 are missing"))
            }
        }
    }

    /// A logged record that does not fit the state (valid checksums) stops recovery naming its
    /// position and why. The position named was one past the record (review).
    @Test func aRecordThatDoesNotFitIsRefusedNamingItsPosition() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let journal = try Journal(directory: DataDirectory(path), shardCount: 1, lsn: 0)
        var records = RecordBuffer()
        records.skuAdded(shard: 0, skuIndex: 0, sku: "k", total: 1 << 40, limit: 0)
        records.orderCreated(
            Record.OrderCreated(
                id: OrderID(shard: 0, tag: 0, sequence: 1), deadlineMillis: 1_000, user: "u", requestId: "",
                items: [Record.Item(shard: 0, skuIndex: 0, quantity: 1 << 31)]))
        let lsn = try journal.append(records)
        try await journal.waitDurable(lsn)
        journal.close()
        #expect {
            try Recovery.recover(DataDirectory(path), options: .init(shardCount: 1))
        } throws: { error in
            guard let error = error as? JournalError else { return false }
            return error.code == .replay && error.message.contains("record 2: ") && error.message.contains("outside 1 to")
        }
    }

    /// Group commit: concurrent writers share fdatasyncs, and every append is answered once durable.
    @Test func groupCommitSharesSyncs() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let journal = try Journal(directory: DataDirectory(path), shardCount: 1, lsn: 0)
        var records = RecordBuffer()
        records.restocked(shard: 0, skuIndex: 0, delta: 1)
        let batch = records
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<16 {
                group.addTask {
                    for _ in 0..<20 {
                        let lsn = try! journal.append(batch)
                        try! await journal.waitDurable(lsn)
                        #expect(journal.lastDurableLSN >= lsn)
                    }
                }
            }
        }
        let stats = journal.statistics
        journal.close()
        #expect(stats.records == 320)
        #expect(stats.syncs < 320)
        #expect(stats.syncs == stats.batches)
    }

    /// Every sync that makes records durable is counted and observed, not only the policy's: with
    /// `fsync none` a full segment is still synced before the next one starts, and so is the last
    /// one when the writer stops. (The metrics' `stockade_fsync_seconds` is fed by the observer.)
    @Test func everySyncOfRecordsIsCountedAndObserved() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Journal.Options()
        options.fsync = .none
        options.segmentBytesMax = 2048
        let journal = try Journal(directory: DataDirectory(path), shardCount: 1, lsn: 0, options: options)
        let observed = Mutex<(syncs: Int, records: Int)>((0, 0))
        journal.onBatch { records, nanos in
            observed.withLock {
                $0.records += records
                if nanos > 0 { $0.syncs += 1 }
            }
        }
        var records = RecordBuffer()
        records.restocked(shard: 0, skuIndex: 0, delta: 1)
        for _ in 0..<400 {
            let lsn = try journal.append(records)
            try await journal.waitDurable(lsn)
        }
        journal.close()
        let stats = journal.statistics
        let segments = try DataDirectory(path).segments().count
        #expect(segments > 3)
        #expect(stats.syncs >= segments)  // every full segment, and the last one at close
        let seen = observed.withLock { $0 }
        #expect(seen.syncs == stats.syncs)
        #expect(seen.records == 400)
    }
}

@Suite struct RetentionTests {
    /// With two snapshots, segments wholly covered by the older one are removed (all but the number
    /// kept for readers), and recovery still rebuilds the live state.
    @Test(arguments: [0, 2])
    func coveredSegmentsAreRemoved(kept: Int) async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 2048
        options.coveredSegmentsKept = kept
        let store = try Store(path: path, options: options)
        var now: Int64 = 1_000
        _ = await store.engine.execute(["apple", "pear", "plum", "fig"].map { .addSku(sku: $0, total: 500, limit: 0) }, now: now)
        await runWorkload(store, seed: 5, count: 800, now: &now)
        let first = try await store.snapshot()
        #expect(first.removedSegments.isEmpty)  // no older snapshot yet: nothing may go
        let segmentsBefore = try DataDirectory(path).segments().count
        await runWorkload(store, seed: 6, count: 800, now: &now)
        let second = try await store.snapshot()
        let segments = try DataDirectory(path).segments()
        #expect(second.removedSegments.count > 0)
        #expect(segments.count < segmentsBefore + 20)
        // Every segment still present after the older snapshot's position is kept, plus `kept` covered ones.
        let covered = segments.enumerated().filter { $0.offset + 1 < segments.count && segments[$0.offset + 1].firstLSN <= first.written.lsn + 1 }
        #expect(covered.count == kept)
        let live = await liveState(store)
        store.close()
        let (recovered, _) = try recover(path)
        #expect(recovered.stateHash() == live.stateHash())
    }
}
