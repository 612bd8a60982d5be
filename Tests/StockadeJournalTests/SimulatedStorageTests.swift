import Foundation
import Synchronization
import Testing
@testable import StockadeCore
@testable import StockadeJournal

#if canImport(Glibc)
import Glibc
#endif

/// One record (a restock of SKU 0 of shard 0) as a buffer.
func oneRecord() -> RecordBuffer {
    var records = RecordBuffer()
    records.restocked(shard: 0, skuIndex: 0, delta: 1)
    return records
}

/// A journal (no writer thread) over a fresh simulated disk, with the SKU its records name.
func simulatedJournal(seed: UInt64, fsync: FsyncPolicy = .always) throws -> (SimulatedStorage, DataDirectory, Journal) {
    let disk = SimulatedStorage(seed: seed)
    let directory = DataDirectory("/data", storage: disk)
    var options = Journal.Options()
    options.fsync = fsync
    options.writerThread = false
    options.segmentBytesMax = 2_000
    let journal = try Journal(directory: directory, shardCount: 1, lsn: 0, options: options)
    var add = RecordBuffer()
    add.skuAdded(shard: 0, skuIndex: 0, sku: "tv", total: 0, limit: 0)
    _ = try journal.append(add)
    journal.writePending()
    return (disk, directory, journal)
}

/// The storage seam (#7 E): the simulated disk's crash, torn writes and injected failures, and what
/// the journal and recovery do about them.
@Suite struct SimulatedStorageTests {
    /// A crash keeps synced bytes only (no torn prefix here): with fsync none, written records are
    /// gone; with fsync always, every written record survives.
    @Test(arguments: [FsyncPolicy.none, .always])
    func crashLosesExactlyTheUnsyncedBytes(policy: FsyncPolicy) throws {
        let (disk, directory, journal) = try simulatedJournal(seed: 1, fsync: policy)
        var faults = SimulatedStorage.FaultPlan()
        faults.crashKeepsTornPrefix = false
        disk.faults = faults
        for _ in 0..<10 {
            _ = try journal.append(oneRecord())
            journal.writePending()
        }
        #expect(journal.lastDurableLSN == 11)  // "durable" as the policy promises
        disk.crash()
        let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1))
        #expect(state.lsn == (policy == .always ? 11 : 0), "\(report)")
        // The journal's handle died with the crash: its next write fails.
        _ = try journal.append(oneRecord())
        journal.writePending()
        #expect(journal.failure?.contains("crashed") == true)
    }

    /// Over many seeds: synced batches, then one batch whose write lands but whose sync fails; a
    /// crash then keeps a random prefix of it (a torn write). Recovery always returns every record
    /// that was acknowledged (synced), cuts the torn part, and reads back clean after the cut.
    @Test func tornWriteAtCrashKeepsEverySyncedRecord() throws {
        var tornTails = 0
        for seed in 0..<200 as Range<UInt64> {
            let (disk, directory, journal) = try simulatedJournal(seed: seed)
            let batches = Int(disk.random(below: 12)) + 1
            for _ in 0..<batches {
                for _ in 0..<Int(disk.random(below: 5)) + 1 { _ = try journal.append(oneRecord()) }
                journal.writePending()
            }
            let acknowledged = journal.lastDurableLSN
            #expect(journal.failure == nil)
            disk.failNext(.sync)
            for _ in 0..<Int(disk.random(below: 40)) + 1 { _ = try journal.append(oneRecord()) }
            journal.writePending()
            #expect(journal.failure != nil && journal.lastDurableLSN == acknowledged)
            disk.crash()
            let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1))
            #expect(state.lsn >= acknowledged, "seed \(seed): acknowledged \(acknowledged), recovered \(state.lsn): \(report)")
            // Restocks of one unit each: the total says how many records were applied, in order.
            #expect(state.shards[0].info(0).total == Int64(state.lsn - 1), "seed \(seed)")
            if report.tornTail != nil { tornTails += 1 }
            let (again, second) = try Recovery.recover(directory, options: .init(shardCount: 1, repair: false))
            #expect(again.lsn == state.lsn && second.tornTail == nil, "seed \(seed)")
        }
        #expect(tornTails > 20, "the seeds hardly ever tore a write")
    }

    /// A batch's write torn at every byte in turn: after the process dies, recovery keeps every synced
    /// record and cuts the torn block as a tail; after the power goes too, the same.
    @Test func writeTornAtEveryByteKeepsEverySyncedRecord() throws {
        // The size of the batch to tear: three records in one block.
        // (Counted by the journal: the segment's file is longer than its blocks, its space allocated ahead.)
        let (_, _, probeJournal) = try simulatedJournal(seed: 0)
        let before = probeJournal.statistics.writtenBytes
        for _ in 0..<3 { _ = try probeJournal.append(oneRecord()) }
        probeJournal.writePending()
        let batchBytes = probeJournal.statistics.writtenBytes - before
        for keep in 0...batchBytes {
            let (disk, directory, journal) = try simulatedJournal(seed: UInt64(keep))
            _ = try journal.append(oneRecord())
            journal.writePending()
            let acknowledged = journal.lastDurableLSN
            disk.tearNextWrite(keeping: keep)
            for _ in 0..<3 { _ = try journal.append(oneRecord()) }
            journal.writePending()
            #expect(journal.failure != nil)
            let whole = keep == batchBytes  // the write stored everything, then reported EIO
            // The process dies (the page cache keeps the torn write): a torn tail iff part of the block is there.
            let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1, repair: false))
            #expect(state.lsn == acknowledged + (whole ? 3 : 0), "torn at \(keep) of \(batchBytes): \(report)")
            #expect((report.tornTail != nil) == (keep > 0 && !whole), "torn at \(keep): \(report)")
            // Then the power goes too: nothing of the torn batch was synced, at most a prefix survives.
            disk.crash()
            let (afterCrash, crashReport) = try Recovery.recover(directory, options: .init(shardCount: 1))
            #expect(afterCrash.lsn == acknowledged || (whole && afterCrash.lsn == acknowledged + 3), "torn at \(keep): \(crashReport)")
        }
    }

    /// EIO on fdatasync: the journal fails for good, says why (synchronously), refuses appends with
    /// that reason, and every caller waiting for durability is told it never will be.
    @Test func syncFailureFailsTheJournalAndItsWaiters() async throws {
        let disk = SimulatedStorage(seed: 3)
        let journal = try Journal(directory: DataDirectory("/data", storage: disk), shardCount: 1, lsn: 0)
        defer { journal.close() }
        let good = try journal.append(oneRecord())
        try await journal.waitDurable(good)
        #expect(journal.failure == nil && journal.admitsChanges)
        disk.failNext(.sync, errno: EIO)
        let doomed = try journal.append(oneRecord())
        await #expect(throws: Rejection.self) { try await journal.waitDurable(doomed) }
        let reason = try #require(journal.failure)
        #expect(reason.contains("fdatasync failed") && reason.contains("Input/output error"), "\(reason)")
        #expect(!journal.admitsChanges)
        #expect(journal.lastDurableLSN == good)
        #expect(throws: Rejection.unavailable(reason)) { _ = try journal.append(oneRecord()) }
        // What was durable stays answered as durable.
        try await journal.waitDurable(good)
    }

    /// ENOSPC on write: the same, and the reason says so.
    @Test func fullDiskFailsTheJournal() async throws {
        let (disk, _, journal) = try simulatedJournal(seed: 4)
        disk.failNext(.write, errno: ENOSPC)
        _ = try journal.append(oneRecord())
        journal.writePending()
        #expect(journal.failure?.contains("No space left on device") == true)
        #expect(!journal.admitsChanges)
    }

    /// Manual mode: an engine over a journal without a writer thread parks its reply until the driver
    /// calls writePending(); the waiting hook tells the driver when that happened.
    @Test func manualJournalParksRepliesUntilTheDriverWrites() async throws {
        let disk = SimulatedStorage(seed: 8)
        var options = Journal.Options()
        options.writerThread = false
        let journal = try Journal(directory: DataDirectory("/data", storage: disk), shardCount: 1, lsn: 0, options: options)
        let parked = AsyncStream<Void>.makeStream()
        journal.onWaiting { parked.continuation.yield() }
        let engine = Engine(state: EngineState(shardCount: 1), log: journal)
        let reply = Task { await engine.execute(.addSku(sku: "tv", total: 5, limit: 0), now: 0) }
        var events = parked.stream.makeAsyncIterator()
        _ = await events.next()
        #expect(journal.waiterCount == 1 && journal.lastDurableLSN == 0)
        #expect(journal.writePending() == 1)
        #expect(await reply.value == .done)
        #expect(journal.waiterCount == 0 && journal.lastDurableLSN == 1)
        journal.close()
        let (state, _) = try Recovery.recover(DataDirectory("/data", storage: disk), options: .init(shardCount: 1))
        #expect(state.lsn == 1)
    }

    /// A slow fsync is a hook, not a sleep: the simulator sees each one.
    @Test func slowSyncsCallTheHook() throws {
        let (disk, _, journal) = try simulatedJournal(seed: 5)
        let seen = Mutex(0)
        disk.onSlowSync = { _ in seen.withLock { $0 += 1 } }
        var faults = SimulatedStorage.FaultPlan()
        faults.slowSync = 1
        disk.faults = faults
        for _ in 0..<5 {
            _ = try journal.append(oneRecord())
            journal.writePending()
        }
        #expect(seen.withLock { $0 } == 5 && disk.counters.slowSyncs == 5)
        #expect(journal.failure == nil)
    }

    /// A process killed between a write and its sync leaves the records in the page cache, where the
    /// next process's recovery reads them. Failed before: the new process counted them durable without
    /// syncing them (and showed their state at once, a sold-out answer included); a power cut then took
    /// them back and left a gap in front of the segment it had started, so no later process could open
    /// the directory and what it acknowledged was stranded. Now the recovered segments are synced first:
    /// after the power cut every position the second process called durable is there.
    @Test(arguments: [0, 4_096])
    func whatRecoveryReadsIsSyncedBeforeItCountsAsDurable(preallocationBytes: Int) async throws {
        let disk = SimulatedStorage(seed: 21)
        let directory = DataDirectory("/srv/data", storage: disk)
        var options = Store.Options(shardCount: 1)
        options.journal.writerThread = false
        options.journal.preallocationBytes = preallocationBytes
        var store = try Store(directory: directory, options: options)
        var add = RecordBuffer()
        add.skuAdded(shard: 0, skuIndex: 0, sku: "tv", total: 0, limit: 0)
        _ = try store.journal.append(add)
        store.journal.writePending()
        #expect(store.journal.lastDurableLSN == 1)
        // Written, not synced: the sync fails (the journal stops), and the process is killed.
        _ = try store.journal.append(oneRecord())
        disk.failNext(.sync, pathContaining: "wal-")
        store.journal.writePending()
        #expect(store.journal.lastDurableLSN == 1 && store.journal.failure != nil)
        store.close()
        disk.processKilled()

        store = try Store(directory: directory, options: options)
        let durableAfterRestart = store.journal.lastDurableLSN
        #expect(durableAfterRestart == 2, "recovery read the written record back")
        _ = try store.journal.append(oneRecord())  // acknowledged after the restart, in a new segment
        store.journal.writePending()
        let acknowledged = store.journal.lastDurableLSN
        #expect(acknowledged == 3)
        store.close()
        disk.crash()  // a power cut

        store = try Store(directory: directory, options: options)
        #expect(store.recovery.lsn >= acknowledged, "\(store.recovery)")
        store.close()
    }

    /// A store on the simulated disk: a snapshot whose rename fails leaves no snapshot and no
    /// temporary file, and the store keeps working; after a crash, a new store recovers the state
    /// acknowledged before it.
    @Test func storeRunsOnTheSimulatedDisk() async throws {
        let disk = SimulatedStorage(seed: 6)
        let directory = DataDirectory("/srv/data", storage: disk)
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 800
        var store = try Store(directory: directory, options: options)
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        await makeChanges(store, tag: "a")
        disk.failNext(.rename)
        await #expect(throws: JournalError.self) { _ = try await store.snapshot() }
        #expect(try directory.snapshots().isEmpty && directory.unfinishedSnapshots().isEmpty)
        let snapshot = try await store.snapshot()
        await makeChanges(store, tag: "b")
        let live = await liveState(store)
        // A second store in the same process is refused by the simulated lock too.
        #expect(throws: JournalError.self) { try Store(directory: directory, options: options) }
        disk.crash()
        store = try Store(directory: directory, options: options)
        #expect(store.recovery.snapshotPath == snapshot.written.path)
        let recovered = await liveState(store)
        #expect(recovered.lsn == live.lsn && recovered.stateHash() == live.stateHash(), "\(store.recovery)")
        store.close()
    }

    /// Bit flips anywhere in a simulated log or snapshot (headers included): recovery either refuses
    /// with a located error or returns every acknowledged record. Over seeds, each flipping one
    /// random bit of one random file. The one exception, by nature: damage to the very last block
    /// looks exactly like a torn write, and is cut as one (reported as a torn tail).
    @Test func randomBitFlipsNeverLoseAcknowledgedRecords() async throws {
        var refused = 0
        for seed in 0..<60 as Range<UInt64> {
            let disk = SimulatedStorage(seed: seed)
            let directory = DataDirectory("/data", storage: disk)
            var options = Store.Options(shardCount: 2)
            options.journal.segmentBytesMax = 700
            let store = try Store(directory: directory, options: options)
            _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
            for round in 0..<Int(disk.random(below: 6)) + 2 {
                await makeChanges(store, tag: "r\(round)")
                if disk.random(below: 3) == 0 { _ = try await store.snapshot() }
            }
            let live = await liveState(store)
            store.close()
            let files = try directory.segments().map(\.path) + directory.snapshots().map(\.path)
            let victim = files[Int(disk.random(below: UInt64(files.count)))]
            let (offset, bit) = disk.flipRandomBit(victim)
            do {
                let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 2))
                #expect(state.lsn == live.lsn && state.stateHash() == live.stateHash(), "seed \(seed): \(victim) byte \(offset) bit \(bit): \(report)")
            } catch {
                refused += 1
                #expect(error.code == .corrupt && error.message.contains(victim) && error.message.contains("offset"), "seed \(seed): \(error)")
            }
        }
        #expect(refused > 0)
    }
}

/// Every bit of the newest snapshot's header and of its first block's header, one at a time: the
/// snapshot is skipped and the older one plus the log rebuild the same state. Bytes 40..<48, zeros
/// that meant nothing until snapshots named their log's last records, are covered too: a flip there
/// fails their own checksum, never passes for another log's fingerprint.
@Suite struct SnapshotHeaderDamageTests {
    @Test func everySnapshotHeaderBitFallsBackWithoutLoss() async throws {
        let disk = SimulatedStorage(seed: 9)
        let directory = DataDirectory("/data", storage: disk)
        let store = try Store(directory: directory, options: Store.Options(shardCount: 2))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 1_000, limit: 0), now: 0)
        await makeChanges(store, tag: "a")
        _ = try await store.snapshot()
        await makeChanges(store, tag: "b")
        let newest = try await store.snapshot()
        await makeChanges(store, tag: "c")
        let live = await liveState(store)
        store.close()
        let headerBytes = SnapshotFile.headerSize + BlockHeader.size
        for byte in 0..<headerBytes {
            for bit in 0..<8 {
                disk.flipBit(newest.written.path, at: byte, bit: bit)
                defer { disk.flipBit(newest.written.path, at: byte, bit: bit) }
                let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 2, repair: false))
                #expect(report.skippedSnapshots.count == 1 && report.foreignSnapshots.isEmpty, "byte \(byte) bit \(bit): \(report)")
                #expect(state.lsn == live.lsn && state.stateHash() == live.stateHash(), "byte \(byte) bit \(bit): \(report)")
            }
        }
    }
}

/// A small crash loop over the simulated disk, the shape the full simulator will have: a store runs
/// a random workload with write, sync and rename faults injected, takes snapshots now and then, and
/// the disk crashes (power cut, torn unsynced writes) at the end of each cycle. After every restart,
/// the state at every quiet point the journal had acknowledged is rebuilt exactly, and the recovered
/// log reaches at least the last acknowledged position.
@Suite struct SimulatedCrashLoopTests {
    @Test(arguments: 0..<24 as Range<UInt64>)
    func crashLoopKeepsEveryAcknowledgedState(seed: UInt64) async throws {
        let disk = SimulatedStorage(seed: seed)
        let directory = DataDirectory("/sim/data", storage: disk)
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 1_500
        options.coveredSegmentsKept = Int(seed % 2)
        var now: Int64 = 1_000
        var acknowledged: [(lsn: UInt64, hash: UInt64)] = []
        var store = try Store(directory: directory, options: options)
        _ = await store.engine.execute(["apple", "pear", "plum", "fig"].map { .addSku(sku: $0, total: 200, limit: 3) }, now: now)
        for cycle in 0..<3 {
            var faults = SimulatedStorage.FaultPlan()
            faults.writeEIO = 0.01
            faults.tornWrite = 0.01
            faults.syncEIO = 0.01
            faults.renameEIO = 0.2
            faults.crashKeepsTornPrefix = disk.random(below: 2) == 0
            disk.faults = faults
            for round in 0..<Int(disk.random(below: 8)) + 2 {
                await runWorkload(store, seed: seed &* 1_000 &+ UInt64(cycle * 100 + round), count: 48, now: &now)
                if disk.random(below: 4) == 0 { _ = try? await store.snapshot() }
                // A quiet point: everything appended is durable (or the journal failed).
                while store.journal.failure == nil && store.journal.lastDurableLSN < store.journal.lastAppendedLSN {
                    try await Task.sleep(for: .milliseconds(1))
                }
                if store.journal.failure == nil {
                    let live = await liveState(store)
                    if live.lsn == store.journal.lastDurableLSN { acknowledged.append((live.lsn, live.stateHash())) }
                }
            }
            disk.crash()
            disk.faults = SimulatedStorage.FaultPlan()
            store = try Store(directory: directory, options: options)
            let last = acknowledged.last?.lsn ?? 0
            #expect(store.recovery.lsn >= last, "seed \(seed) cycle \(cycle): acknowledged up to \(last): \(store.recovery)")
            // Every acknowledged quiet point still covered by the snapshots and log on disk.
            let oldest = try directory.snapshots().first?.lsn ?? 0
            for point in acknowledged where point.lsn >= oldest {
                let (state, _) = try Recovery.recover(directory, options: .init(shardCount: 2, repair: false, upToLSN: point.lsn))
                #expect(state.lsn == point.lsn && state.stateHash() == point.hash, "seed \(seed) cycle \(cycle): position \(point.lsn)")
            }
            let live = await liveState(store)
            #expect(live.stateHash() == (try Recovery.recover(directory, options: .init(shardCount: 2, repair: false)).0.stateHash()))
        }
        store.close()
        #expect(disk.counters.crashes == 3)
    }
}
