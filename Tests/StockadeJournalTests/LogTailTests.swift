import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// The journal's newest records in memory (``LogTail``) answer a read only when they hold it whole,
/// and then as the files do.
@Suite struct LogTailTests {
    /// `count` DEDUCT records, quantities `first`, `first + 1`, …: each batch's records tell apart.
    static func records(_ count: Int, first: Int64) -> [UInt8] {
        var buffer = RecordBuffer()
        for i in 0..<count { buffer.deducted(shard: 0, skuIndex: 0, quantity: first + Int64(i)) }
        return buffer.bytes.withUnsafeBytes { [UInt8]($0) }  // exactly its bytes, as the journal adds them
    }

    static func quantities(_ read: [(position: UInt64, record: Record)]?) -> [Int64]? {
        read?.map {
            guard case .deducted(_, _, let quantity) = $0.record else { return -1 }
            return quantity
        }
    }

    /// A store (fsync off) with `skus` added, in a new directory the caller removes.
    static func store(
        _ name: String, shards: Int, skus: [Name], segmentBytesMax: Int? = nil, tailBytesMax: Int? = nil
    ) async throws -> (store: Store, path: String) {
        let path = temporaryDirectory(name)
        var options = Store.Options(shardCount: shards)
        options.journal.fsync = .none
        if let segmentBytesMax { options.journal.segmentBytesMax = segmentBytesMax }
        if let tailBytesMax { options.journal.tailBytesMax = tailBytesMax }
        let store = try Store(path: path, options: options)
        _ = await store.engine.execute(skus.map { .addSku(sku: $0, total: 1_000_000_000, limit: 0) }, now: 0)
        return (store, path)
    }

    /// `count` batches of one RESERVE each, of users `user-0`, `user-1`, …
    static func reserveOneByOne(_ store: Store, count: Int, sku: Name) async {
        for n in 0..<count {
            _ = await store.engine.execute([.reserve(user: Name("user-\(n)"), lines: [OrderLine(sku: sku, quantity: 1)], requestId: nil, ttlMillis: 600_000)], now: 0)
        }
    }

    @Test func holdsContiguousBatchesWithinItsBoundAndAnswersOnlyWhatItHoldsWhole() {
        let tail = LogTail(bytesMax: 1_000)
        let one = Self.records(3, first: 1)  // positions 1...3
        tail.add(firstLSN: 1, count: 3, bytes: one)
        tail.add(firstLSN: 4, count: 2, bytes: Self.records(2, first: 4))  // 4...5
        #expect(tail.range == 1..<6)
        #expect(Self.quantities(tail.records(from: 2, count: 3, durable: 5)) == [2, 3, 4])
        #expect(Self.quantities(tail.records(from: 5, count: 10, durable: 5)) == [5])
        // Up to the durable bound only, whatever else it holds.
        #expect(Self.quantities(tail.records(from: 1, count: 10, durable: 2)) == [1, 2])
        #expect(tail.records(from: 6, count: 1, durable: 6) == nil, "a position it does not hold")
        #expect(tail.records(from: 3, count: 1, durable: 2) == nil, "past the durable bound")
        // A batch that does not follow the last one: what it held would leave a gap, so it goes.
        tail.add(firstLSN: 9, count: 1, bytes: Self.records(1, first: 9))
        #expect(tail.range == 9..<10)
        #expect(tail.records(from: 4, count: 1, durable: 9) == nil)
        // Past its bound the oldest batches go, never the newest.
        for n in 0..<200 { tail.add(firstLSN: 10 + UInt64(n) * 4, count: 4, bytes: Self.records(4, first: 100 + Int64(n) * 4)) }
        let range = tail.range
        #expect(range.upperBound == 810 && range.lowerBound > 9)
        #expect(tail.bytesHeld <= tail.bytesMax && tail.bytesHeld > tail.bytesMax / 2, "\(tail.bytesHeld) bytes held")
        #expect(Self.quantities(tail.records(from: 809, count: 1, durable: 809)) == [899])
        #expect(tail.records(from: range.lowerBound - 1, count: 2, durable: 809) == nil)
        // A read it cannot answer whole (it ends before the durable bound) goes to the files.
        #expect(tail.records(from: 808, count: 5, durable: 812) == nil)
        // One batch larger than the bound empties it.
        tail.add(firstLSN: 810, count: 100, bytes: Self.records(100, first: 0))
        #expect(tail.range.isEmpty)
        tail.drop(below: 0)
        tail.reset()
        #expect(tail.range.isEmpty)
    }

    /// A journal's reads with its tail equal the files' reads, for random positions, counts and
    /// durable bounds; those at the end are answered from memory.
    @Test func readsWithTheTailEqualTheFiles() async throws {
        let (store, path) = try await Self.store("logTail", shards: 2, skus: ["tee", "cap"], segmentBytesMax: 32 << 10, tailBytesMax: 16 << 10)
        defer { try? FileManager.default.removeItem(atPath: path) }
        defer { store.close() }
        var rng = SplitMix64(seed: 46)
        for batch in 0..<1_500 {
            let commands: [Command] = (0..<Int.random(in: 1...10, using: &rng)).map { n in
                .reserve(user: Name("u\(batch)-\(n)"), lines: [OrderLine(sku: Bool.random(using: &rng) ? "tee" : "cap", quantity: 1)], requestId: nil, ttlMillis: 600_000)
            }
            _ = await store.engine.execute(commands, now: 0)
        }
        let journal = store.journal
        let durable = journal.lastDurableLSN
        let files = LogReader(directory: store.directory)
        let withTail = LogReader(directory: store.directory, index: journal.blockIndex, tail: journal.tail)
        let held = journal.tail.range
        #expect(held.lowerBound > 1 && held.upperBound == durable + 1, "\(held) of 1...\(durable)")
        var fromMemory = 0
        for _ in 0..<800 {
            let from = Bool.random(using: &rng) ? UInt64.random(in: 1...durable, using: &rng) : UInt64.random(in: held.lowerBound - 5...durable, using: &rng)
            let count = Int.random(in: 1...50, using: &rng)
            let bound = Bool.random(using: &rng) ? durable : UInt64.random(in: from...durable, using: &rng)
            if journal.tail.records(from: from, count: count, durable: bound) != nil { fromMemory += 1 }
            let want = try files.read(from: from, count: count, durable: bound)
            let got = try withTail.read(from: from, count: count, durable: bound)
            #expect(got.map(\.position) == want.map(\.position))
            #expect(got.map(\.record) == want.map(\.record))
        }
        #expect(fromMemory > 200, "\(fromMemory) of 800 reads from memory")
    }

    /// Batches of one record each (pipeline 1) keep the tail within its bound in memory too: each
    /// batch holds a copy of exactly its bytes, not the journal's reusable buffer of a megabyte.
    @Test func smallBatchesStayWithinTheBound() async throws {
        let (store, path) = try await Self.store("logTailSmall", shards: 1, skus: ["tee"], tailBytesMax: 64 << 10)
        defer { try? FileManager.default.removeItem(atPath: path) }
        defer { store.close() }
        await Self.reserveOneByOne(store, count: 3_000, sku: "tee")
        let tail = store.journal.tail
        #expect(tail.bytesHeld <= tail.bytesMax)
        #expect(tail.capacityHeld <= tail.bytesMax, "\(tail.capacityHeld) bytes of arrays held")
        #expect(tail.capacityHeldAll == tail.capacityHeld, "batches gone still hold \(tail.capacityHeldAll - tail.capacityHeld) bytes")
        #expect(tail.range.count > 300, "\(tail.range.count) records held")
    }

    /// The tail lets go of a removed segment's positions before its file goes: a removal that fails
    /// after unlinking (the directory's fsync, here) leaves no position answered from memory that
    /// the files no longer hold.
    @Test func positionsOfRemovedSegmentsLeaveMemoryBeforeTheirFiles() async throws {
        let disk = SimulatedStorage(seed: 47)
        let directory = DataDirectory("/sim/data", storage: disk)
        var options = Store.Options(shardCount: 1)
        options.journal.fsync = .none
        options.journal.segmentBytesMax = 4 << 10
        let store = try Store(directory: directory, options: options)
        defer { store.close() }
        _ = await store.engine.execute([.addSku(sku: "tee", total: 1_000_000, limit: 0)], now: 0)
        await Self.reserveOneByOne(store, count: 300, sku: "tee")
        let journal = store.journal
        let durable = journal.lastDurableLSN
        #expect(journal.tail.range == 1..<durable + 1)
        let segments = try directory.segments()
        #expect(segments.count > 4)
        disk.failNext(.syncDirectory)
        #expect(throws: JournalError.self) { try journal.removeSegments(coveredThrough: segments[3].firstLSN - 1, keep: 0) }
        #expect(!disk.exists(segments[0].path), "the files were unlinked before the failure")
        let reader = LogReader(directory: directory, index: journal.blockIndex, tail: journal.tail)
        #expect(throws: LogReader.ReadError.trimmed(oldest: segments[3].firstLSN)) { try reader.read(from: 2, count: 1, durable: durable) }
        #expect(journal.tail.range.lowerBound == segments[3].firstLSN)
    }

    /// Removed segments' positions are TRIMMED from memory too; a log started again forgets it all.
    @Test func removedSegmentsAreTrimmedAndALogStartedAgainForgets() async throws {
        let (store, path) = try await Self.store("logTailTrim", shards: 1, skus: ["tee"], segmentBytesMax: 4 << 10)
        defer { try? FileManager.default.removeItem(atPath: path) }
        defer { store.close() }
        await Self.reserveOneByOne(store, count: 300, sku: "tee")
        let journal = store.journal
        let durable = journal.lastDurableLSN
        #expect(journal.tail.range == 1..<durable + 1, "everything is held")
        let segments = try store.directory.segments()
        #expect(segments.count > 4)
        let removed = try journal.removeSegments(coveredThrough: segments[3].firstLSN - 1, keep: 0)
        #expect(removed.count == 3)
        let reader = LogReader(directory: store.directory, index: journal.blockIndex, tail: journal.tail)
        #expect(throws: LogReader.ReadError.trimmed(oldest: segments[3].firstLSN)) { try reader.read(from: 2, count: 1, durable: durable) }
        #expect(try reader.read(from: segments[3].firstLSN, count: 1, durable: durable).map(\.position) == [segments[3].firstLSN])
        try journal.rebase(to: durable + 10)
        #expect(journal.tail.range.isEmpty)
    }
}
