import Foundation
import Synchronization
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// A node whose log went another way from its primary's starts over: its files move into a
/// `diverged-*` subdirectory (``DataDirectory/setAside(into:)``), its log starts again at a lower
/// position (``Journal/restart(at:)``), and its engine is emptied (``Store/startOver(setAsideAs:)``).
@Suite struct StartOverTests {
    /// A store with a snapshot and several segments after it, its engine read-only (as a replica's).
    static func filledStore(_ directory: DataDirectory) async throws -> (store: Store, live: EngineState) {
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 700
        let writer = try Store(directory: directory, options: options)
        _ = await writer.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        await makeChanges(writer, tag: "a")
        _ = try await writer.snapshot()
        await makeChanges(writer, tag: "b")
        for tag in ["c", "d", "e", "f"] { await makeChanges(writer, tag: tag) }
        writer.close()
        options.readOnly = true
        options.shardExecutors = [QueueExecutor(label: "replica")]  // a replica's shards share one
        let store = try Store(directory: directory, options: options)
        let live = await liveState(store)
        #expect(live.lsn > 20)
        let segments = try directory.segments()
        #expect(try segments.count >= 2 && directory.snapshots().count == 1, "\(segments)")
        return (store, live)
    }

    static func recovered(_ directory: DataDirectory) throws -> EngineState {
        try Recovery.recover(directory, options: .init(shardCount: 2, repair: false)).0
    }

    /// The positions go back, no segment of the old log stays, waits for old positions end with the
    /// reason, records appended after go at the new positions, and a reopen recovers exactly them.
    @Test func restartGoesBackAndLeavesNoOldSegment() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let directory = DataDirectory(path)
        let (store, live) = try await Self.filledStore(directory)
        let journal = store.journal
        #expect(journal.lastDurableLSN == live.lsn)
        // Going forward only: a rebase below the durable position is refused.
        #expect(throws: JournalError.self) { try journal.rebase(to: live.lsn - 1) }
        let waiting = Task { () -> String? in
            do throws(Rejection) {
                try await journal.waitDurable(live.lsn + 10)
                return nil
            } catch {
                return "\(error)"
            }
        }
        while journal.waiterCount == 0 { try await Task.sleep(for: .milliseconds(1)) }
        let observed = Mutex<[UInt64]>([])
        journal.onDurable { lsn in observed.withLock { $0.append(lsn) } }

        try journal.restart(at: 3)

        #expect(journal.lastDurableLSN == 3 && journal.lastAppendedLSN == 3)
        #expect(try directory.segments().map(\.firstLSN) == [4])
        #expect(observed.withLock { $0.contains(3) })
        let reason = await waiting.value
        #expect(reason?.contains("started again") == true, "\(String(describing: reason))")
        var records = RecordBuffer()
        records.restocked(shard: 0, skuIndex: 0, delta: 1)
        #expect(try journal.append(records) == 4)
        try await journal.waitDurable(4)
        store.close()
        // A segment that starts at 4 alone: what recovery sees is that record, at its position, and
        // no record of the old log (the first segment now starts past a gap it reports).
        let segments = try directory.segments()
        #expect(segments.count == 1)
        let blocks = try LogReader(directory: directory).readBlocks(from: 4, bytesMax: 1 << 20, durable: 4)
        #expect(blocks.map(\.firstLSN) == [4] && blocks.map(\.recordCount) == [1])
    }

    /// The whole start over: every old file is in the subdirectory and still recovers the old state
    /// there; the data directory recovers an empty state at position 0, before and after a reopen;
    /// the engine is empty and its visible positions went back; a later start over gets a new name.
    @Test func startOverKeepsTheOldFilesAndLeavesAnEmptyDirectory() async throws {
        let disk = SimulatedStorage(seed: 31)
        let directory = DataDirectory("/srv/a", storage: disk)
        let (store, live) = try await Self.filledStore(directory)
        let before = Set(try disk.list("/srv/a").filter { $0.hasPrefix("wal-") || $0.hasPrefix("snap-") })
        let name = directory.freeSetAsideName(epoch: 7, unixMillis: 1_000)
        #expect(name == "diverged-7-1000")

        let result = try await store.startOver(setAsideAs: name)

        #expect(result.previousLSN == live.lsn)
        #expect(result.setAside.path == "/srv/a/diverged-7-1000" && Set(result.setAside.files) == before)
        #expect(Set(try disk.list("/srv/a/diverged-7-1000")) == before)  // the marker is gone
        #expect(try directory.snapshots().isEmpty && directory.segments().map(\.firstLSN) == [1])
        #expect(store.journal.lastDurableLSN == 0)
        let empty = EngineState(shardCount: 2)
        #expect(await store.engine.captureState(lsn: 0).stateHash() == empty.stateHash())
        for shard in store.engine.shards { #expect(await shard.visiblePosition == 0) }
        #expect(store.engine.available("tv") == nil)
        let kept = try Self.recovered(DataDirectory("/srv/a/diverged-7-1000", storage: disk))
        #expect(kept.lsn == live.lsn && kept.stateHash() == live.stateHash())
        #expect(try Self.recovered(directory).lsn == 0)
        #expect(directory.freeSetAsideName(epoch: 7, unixMillis: 1_000) == "diverged-7-1001")
        store.close()
        // Reopened (the lock works as before): empty, and the kept files are not read.
        let again = try Store(directory: directory, options: Store.Options(shardCount: 2))
        #expect(again.recovery.snapshotLSN == 0 && again.journal.lastDurableLSN == 0 && again.finishedSetAside.isEmpty)
        #expect(throws: JournalError.self) { _ = try Store(directory: directory, options: Store.Options(shardCount: 2)) }
        again.close()
    }

    /// A crash at every step of the move: the directory recovers either the old state (the move was
    /// not decided yet) or, once the marker is durable, an empty one with every old file in the
    /// subdirectory (the reopen finishes the move). Never a mix.
    @Test func aCrashAtAnyStepLeavesTheOldStateOrAnEmptyOne() async throws {
        var outcomes: Set<String> = []
        // Each case stops the start over at one operation, then the power goes.
        var cases: [(SimulatedStorage.Operation, String)] = [
            (.open, "MOVING"), (.sync, "MOVING"), (.syncDirectory, "diverged-"),
            // After the move: the marker's removal, the new log's first segment.
            (.remove, "MOVING"), (.open, "wal-00000000000000000001.log"),
        ]
        let probe = try await Self.filledStore(DataDirectory("/p", storage: SimulatedStorage(seed: 40)))
        let files = try probe.store.directory.snapshots().map(\.path) + probe.store.directory.segments().map(\.path)
        probe.store.close()
        for file in files { cases.append((.rename, String(file.split(separator: "/").last!))) }
        for (index, (operation, path)) in cases.enumerated() {
            let disk = SimulatedStorage(seed: 40)
            let directory = DataDirectory("/p", storage: disk)
            let (store, live) = try await Self.filledStore(directory)
            disk.failNext(operation, pathContaining: path)
            await #expect(throws: (any Error).self, "case \(index)") { _ = try await store.startOver(setAsideAs: "diverged-9-5") }
            disk.crash()
            store.close()
            let reopened = try Store(directory: directory, options: Store.Options(shardCount: 2))
            let state = await reopened.engine.captureState(lsn: reopened.journal.lastDurableLSN)
            reopened.close()
            if state.lsn == live.lsn {
                #expect(state.stateHash() == live.stateHash(), "case \(index)")
                outcomes.insert("old")
            } else {
                #expect(state.lsn == 0 && state.stateHash() == EngineState(shardCount: 2).stateHash(), "case \(index): \(state.lsn)")
                #expect(!disk.exists("/p/diverged-9-5/MOVING"), "case \(index)")
                let kept = try Self.recovered(DataDirectory("/p/diverged-9-5", storage: disk))
                #expect(kept.lsn == live.lsn && kept.stateHash() == live.stateHash(), "case \(index)")
                outcomes.insert("empty")
            }
        }
        #expect(outcomes == ["old", "empty"])
    }
}
