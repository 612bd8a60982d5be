import Dispatch
import Foundation
import StockadeCore
import Synchronization
import Testing
@testable import StockadeJournal

/// Writes by the callers that wait (``Journal/writeAsCaller()``, the server's event loops) beside the
/// writer thread, with appends that do not wake it (``Journal/Options/writerWakesOnAppend`` off).
///
/// Threads append and, at random, write as a caller, ask the writer (``Journal/requestWrite()``) or
/// leave their records to their next write; each ends with a write as a caller, as a loop whose
/// replies wait does. Segments roll over every few batches. Every record must reach the file once,
/// at its position, in each thread's order, and once the threads stop everything appended must
/// become durable with no one asking again. That a write which lets go with records pending (appended
/// while it wrote, by callers that then found it under way) hands them on is pinned down by
/// ``aRecordAppendedDuringACallersWriteIsHandedOn()``, which makes that order on purpose.
@Suite struct CallerWriteTests {
    @Test(arguments: [FsyncPolicy.always, .none])
    func everyRecordIsWrittenOnceInOrderWhoeverWrites(policy: FsyncPolicy) async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Journal.Options()
        options.fsync = policy
        options.writerWakesOnAppend = false
        options.segmentBytesMax = 16 << 10
        let directory = DataDirectory(path)
        let journal = try Journal(directory: directory, shardCount: 1, lsn: 0, options: options)
        let threads = 4
        let rounds = 1000
        let appended = Mutex<[(lsn: UInt64, thread: Int, sequence: UInt32)]>([])
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var rng = SystemRandomNumberGenerator()
            var sequence: UInt32 = 0
            for _ in 0..<rounds {
                var records = RecordBuffer()
                let count = Int.random(in: 1...3, using: &rng)
                for _ in 0..<count {
                    records.skuAdded(
                        shard: 0, skuIndex: UInt32(thread) << 24 | sequence, sku: Name("t\(thread)"), total: 0, limit: 0)
                    sequence += 1
                }
                guard let last = try? journal.append(records) else {
                    Issue.record("an append was refused")
                    return
                }
                appended.withLock { list in
                    for i in 0..<count {
                        list.append((last - UInt64(count - 1 - i), thread, sequence - UInt32(count - i)))
                    }
                }
                switch Int.random(in: 0..<10, using: &rng) {
                case 0..<7: journal.writeAsCaller()
                case 7: journal.requestWrite()
                default: break  // left to this thread's next write, or another's
                }
            }
            // A caller that waits writes last; it may find another write under way and return.
            journal.writeAsCaller()
        }
        // Nobody asks any more: what was appended before a caller's write must become durable.
        let total = UInt64(threads * rounds)
        try await waitUntilDurable(journal, journal.lastAppendedLSN, seconds: 10)
        let end = journal.lastAppendedLSN
        #expect(end >= total)
        #expect(journal.lastDurableLSN == end, "records appended were left pending with no writer")
        journal.close()

        let read = try LogReader(directory: directory).read(from: 1, count: Int(end) + 1, durable: end)
        #expect(read.map(\.position) == Array(1...end), "positions in the file are not 1...\(end) once each")
        let byPosition = Dictionary(uniqueKeysWithValues: appended.withLock { $0 }.map { ($0.lsn, ($0.thread, $0.sequence)) })
        var mismatches = 0
        for (position, record) in read {
            guard case let .skuAdded(_, skuIndex, _, _, _) = record, let (thread, sequence) = byPosition[position],
                  skuIndex == UInt32(thread) << 24 | sequence
            else {
                mismatches += 1
                continue
            }
        }
        #expect(mismatches == 0, "\(mismatches) records are not the ones appended at their positions")
    }

    /// A record appended while a caller writes, by a caller that then finds that write under way (another
    /// event loop), is written without anyone asking again: the first caller hands it on as it lets go.
    @Test func aRecordAppendedDuringACallersWriteIsHandedOn() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Journal.Options()
        options.writerWakesOnAppend = false
        let journal = try Journal(directory: DataDirectory(path), shardCount: 1, lsn: 0, options: options)
        defer { journal.close() }
        let second = Mutex<UInt64?>(nil)
        // Observers run while the batch's writer still holds the write: the other loop appends and tries.
        journal.onBatch { _, _ in
            let first = second.withLock { $0 == nil }
            guard first else { return }
            var record = RecordBuffer()
            record.skuAdded(shard: 0, skuIndex: 1, sku: "b", total: 0, limit: 0)
            let lsn = try? journal.append(record)
            second.withLock { $0 = lsn ?? 0 }
            journal.writeAsCaller()
        }
        var record = RecordBuffer()
        record.skuAdded(shard: 0, skuIndex: 0, sku: "a", total: 0, limit: 0)
        _ = try journal.append(record)
        journal.writeAsCaller()
        let lsn = try #require(second.withLock { $0 })
        #expect(lsn == 2)
        try await waitUntilDurable(journal, lsn)
        #expect(journal.lastDurableLSN == lsn, "the record appended during the write was left pending")
    }

    /// While a loop syncs, its other clients wait (PING too): after one write and sync slower than
    /// ``Journal/Options/callerWriteNanosMax``, callers leave the writing to the writer thread until a
    /// batch is fast again, so a stalled disk holds a loop for one sync, not for every one.
    @Test func afterASlowSyncCallersLeaveTheWritingToTheWriterThread() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let storage = SlowSyncStorage()
        var options = Journal.Options()
        options.writerWakesOnAppend = false
        options.callerWriteNanosMax = 20_000_000
        let journal = try Journal(directory: DataDirectory(path, storage: storage), shardCount: 1, lsn: 0, options: options)
        defer { journal.close() }
        let writers = Mutex<[UInt]>([])
        journal.onBatch { records, _ in
            if records > 0 { writers.withLock { $0.append(UInt(pthread_self())) } }
        }
        func appendOne() throws -> UInt64 {
            var record = RecordBuffer()
            record.skuAdded(shard: 0, skuIndex: 0, sku: "s", total: 0, limit: 0)
            return try journal.append(record)
        }
        func durable(_ lsn: UInt64) async throws {
            try await waitUntilDurable(journal, lsn)
            #expect(journal.lastDurableLSN >= lsn)
        }
        /// Appends a record, writes as a caller, and says whether the batch was written on this thread.
        func writtenHere() async throws -> Bool {
            let lsn = try appendOne()
            let before = writers.withLock { $0.count }
            let me = UInt(pthread_self())
            journal.writeAsCaller()
            try await durable(lsn)
            return writers.withLock { $0.count > before && $0[before] == me }
        }

        #expect(try await writtenHere(), "a caller did not write its batch on a fast disk")
        storage.syncDelayMillis.store(100, ordering: .relaxed)
        #expect(try await writtenHere(), "the first slow sync is the caller's own")
        #expect(!(try await writtenHere()), "a caller wrote again after a slow sync")
        storage.syncDelayMillis.store(0, ordering: .relaxed)
        // One batch by the writer thread finds the disk fast again; then the callers write again.
        let lsn = try appendOne()
        journal.requestWrite()
        try await durable(lsn)
        #expect(try await writtenHere(), "callers did not write again once the disk was fast")
    }
}

/// Polls every millisecond, for up to `seconds`, until `lsn` is durable (nothing here wakes a waiter:
/// what is checked is that the journal gets there by itself).
private func waitUntilDurable(_ journal: Journal, _ lsn: UInt64, seconds: UInt64 = 5) async throws {
    let deadline = DispatchTime.now().uptimeNanoseconds + seconds * 1_000_000_000
    while journal.lastDurableLSN < lsn && DispatchTime.now().uptimeNanoseconds < deadline {
        try await Task.sleep(for: .milliseconds(1))
    }
}

/// The real files, with an fdatasync that can be made to take `syncDelayMillis` longer.
private final class SlowSyncStorage: ForwardingStorage, @unchecked Sendable {
    let syncDelayMillis = Atomic<Int>(0)
    let base: any Storage = PosixStorage.shared

    func open(_ path: String, _ access: FileAccess) throws(JournalError) -> any StorageFile {
        SlowSyncFile(try base.open(path, access), storage: self)
    }
}

private final class SlowSyncFile: StorageFile {
    private let file: any StorageFile
    private let storage: SlowSyncStorage
    init(_ file: any StorageFile, storage: SlowSyncStorage) {
        self.file = file
        self.storage = storage
    }
    var path: String { file.path }
    func append(_ bytes: UnsafeRawBufferPointer) throws(JournalError) { try file.append(bytes) }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(JournalError) { try file.write(bytes, at: offset) }
    func read(at offset: Int, count: Int) throws(JournalError) -> [UInt8] { try file.read(at: offset, count: count) }
    func size() throws(JournalError) -> Int { try file.size() }
    func truncate(to length: Int) throws(JournalError) { try file.truncate(to: length) }
    func preallocate(to length: Int) throws(JournalError) -> Bool { try file.preallocate(to: length) }
    func dataSync() throws(JournalError) {
        let millis = storage.syncDelayMillis.load(ordering: .relaxed)
        if millis > 0 { usleep(UInt32(millis * 1000)) }
        try file.dataSync()
    }
    func sync() throws(JournalError) { try file.sync() }
    func close() { file.close() }
}
