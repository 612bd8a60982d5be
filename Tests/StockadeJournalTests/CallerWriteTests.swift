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
/// become durable with no one asking again: a write that lets go with records pending (appended
/// while it wrote, by callers that then found it under way) must hand them on.
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
        let deadline = DispatchTime.now().uptimeNanoseconds + 10_000_000_000
        while journal.lastDurableLSN < journal.lastAppendedLSN && DispatchTime.now().uptimeNanoseconds < deadline {
            try await Task.sleep(for: .milliseconds(1))
        }
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
        let deadline = DispatchTime.now().uptimeNanoseconds + 5_000_000_000
        while journal.lastDurableLSN < lsn && DispatchTime.now().uptimeNanoseconds < deadline {
            try await Task.sleep(for: .milliseconds(1))
        }
        #expect(journal.lastDurableLSN == lsn, "the record appended during the write was left pending")
    }
}
