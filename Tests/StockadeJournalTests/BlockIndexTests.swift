import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// Reads that start where the ``BlockIndex`` says a block starts give what a walk from each segment's
/// start gives, whatever the index holds: what earlier reads taught it, or entries that no longer
/// match the segment (a log started again, a damaged index).
@Suite struct BlockIndexTests {
    /// A log of thousands of small blocks in segments of several index strides each.
    static func makeLog(seed: UInt64) async throws -> (store: Store, path: String) {
        let path = temporaryDirectory("blockIndex\(seed)")
        var options = Store.Options(shardCount: 3)
        options.journal.fsync = .none
        options.journal.segmentBytesMax = 5 * BlockIndex.strideBytes
        let store = try Store(path: path, options: options)
        let skus: [Name] = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date"]
        _ = await store.engine.execute(skus.map { .addSku(sku: $0, total: 1_000_000, limit: 0) }, now: 0)
        // One block a batch, of 1 to 8 records of varied sizes.
        var rng = SplitMix64(seed: seed)
        for batch in 0..<5_000 {
            let commands: [Command] = (0..<Int.random(in: 1...8, using: &rng)).map { n in
                let lines = (0..<Int.random(in: 1...3, using: &rng)).map { _ in OrderLine(sku: skus.randomElement(using: &rng)!, quantity: 1) }
                return .reserve(user: Name("user-\(batch)-\(n)"), lines: lines, requestId: nil, ttlMillis: 600_000)
            }
            _ = await store.engine.execute(commands, now: 0)
        }
        return (store, path)
    }

    /// Random reads (records and raw blocks) through one shared index equal the same reads without
    /// one, and the index learned enough that later reads start near their position.
    @Test(arguments: [41, 42, 43] as [UInt64])
    func readsThroughTheIndexEqualWalksFromTheStart(seed: UInt64) async throws {
        let (store, path) = try await Self.makeLog(seed: seed)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let durable = store.journal.lastDurableLSN
        let segments = try store.directory.segments()
        #expect(segments.count >= 3, "\(segments.count) segments")
        print("BlockIndexTests: \(segments.count) segments, \(durable) records")
        let plain = LogReader(directory: store.directory)
        let indexed = LogReader(directory: store.directory, index: store.journal.blockIndex)
        var rng = SplitMix64(seed: seed)
        for _ in 0..<300 {
            let from = UInt64.random(in: 1...durable + 1, using: &rng)
            let count = Int.random(in: 1...400, using: &rng)
            let bound = Bool.random(using: &rng) ? durable : UInt64.random(in: from...durable + 1, using: &rng)
            let expected = try plain.read(from: from, count: count, durable: bound)
            let got = try indexed.read(from: from, count: count, durable: bound)
            #expect(got.map(\.position) == expected.map(\.position))
            #expect(got.map(\.record) == expected.map(\.record))
            let bytesMax = Int.random(in: 1...20_000, using: &rng)
            let blocks = try indexed.readBlocks(from: max(from, 1), bytesMax: bytesMax, durable: bound)
            let expectedBlocks = try plain.readBlocks(from: max(from, 1), bytesMax: bytesMax, durable: bound)
            #expect(blocks.map(\.bytes) == expectedBlocks.map(\.bytes))
        }
        // Learned: every segment but a short last one has blocks past its first stride.
        for segment in segments.dropLast() {
            let known = store.journal.blockIndex.block(atOrBefore: .max, in: segment.path)
            #expect((known?.offset ?? 0) >= BlockIndex.strideBytes, "nothing learned of \(segment.path)")
        }
        store.close()
    }

    /// A read that starts inside a block decodes only the records it returns (those before are
    /// stepped over by their framing): every such read equals the same positions of one read of the
    /// whole log, which decodes every block from its first record.
    @Test func readsFromInsideABlockEqualTheWholeLogsRecords() async throws {
        let (store, path) = try await Self.makeLog(seed: 44)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let durable = store.journal.lastDurableLSN
        let reader = LogReader(directory: store.directory, index: store.journal.blockIndex)
        let all = try LogReader(directory: store.directory).read(from: 1, count: Int(durable) + 1, durable: durable)
        #expect(all.map(\.position) == Array(1...durable))
        let blockStarts = Set(try reader.readBlocks(from: 1, bytesMax: .max, durable: durable).map(\.firstLSN))
        var rng = SplitMix64(seed: 44)
        var inside = 0
        for _ in 0..<600 {
            let from = UInt64.random(in: 1...durable, using: &rng)
            let count = Int.random(in: 1...12, using: &rng)
            let bound = UInt64.random(in: from...min(durable, from + 20), using: &rng)
            let got = try reader.read(from: from, count: count, durable: bound)
            let want = all[Int(from - 1)..<Int(min(from - 1 + UInt64(count), bound))]
            #expect(got.map(\.position) == want.map(\.position))
            #expect(got.map(\.record) == want.map(\.record))
            if !blockStarts.contains(from) { inside += 1 }
        }
        #expect(inside > 50, "reads from inside a block: \(inside) of 600")
        store.close()
    }

    /// Blocks larger than the reader's 64 KiB window (a batch of thousands of reservations of
    /// long, random user ids) among small ones: records and raw blocks read from random positions,
    /// through the index and without it, equal what the segment files hold, walked whole here
    /// without the reader (each file read at once, its blocks checked and decoded one after another).
    @Test func blocksLargerThanTheReadWindowReadAsTheFilesHoldThem() async throws {
        let skus: [Name] = ["apple", "pear", "plum"]
        let (store, path) = try await LogTailTests.store("blockIndexLarge", shards: 2, skus: skus, segmentBytesMax: 1 << 20, tailBytesMax: 0)
        defer { try? FileManager.default.removeItem(atPath: path) }
        var rng = SplitMix64(seed: 45)
        for batch in 0..<400 {
            let large = batch % 40 == 7
            let commands: [Command] = (0..<(large ? Int.random(in: 1_500...3_000, using: &rng) : Int.random(in: 1...8, using: &rng))).map { _ in
                let user = Name(bytes: (0..<Int.random(in: 40...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
                return .reserve(user: user, lines: [OrderLine(sku: skus.randomElement(using: &rng)!, quantity: 1)], requestId: nil, ttlMillis: 600_000)
            }
            _ = await store.engine.execute(commands, now: 0)
        }
        defer { store.close() }
        let durable = store.journal.lastDurableLSN
        // The files' truth: every block of every segment, walked from each file read whole.
        var truthRecords: [(position: UInt64, record: Record)] = []
        var truthBlocks: [(firstLSN: UInt64, bytes: [UInt8])] = []
        for segment in try store.directory.segments() {
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: segment.path)))
            var offset = SegmentHeader.size
            walk: while true {
                switch bytes.withUnsafeBytes({ BlockCodec.read($0, at: offset) }) {
                case .block(let header, let payload):
                    var position = header.firstLSN
                    try payload.withUnsafeBytes { raw in
                        try Record.decodeAll(raw) { record in
                            truthRecords.append((position, record))
                            position += 1
                        }
                    }
                    truthBlocks.append((header.firstLSN, Array(bytes[offset..<offset + header.totalLength])))
                    offset += header.totalLength
                case .truncated, .invalid:
                    break walk  // the end of what was written (the rest of the segment is zeros)
                }
            }
        }
        #expect(truthRecords.map(\.position) == Array(1...durable))
        let largeBlocks = truthBlocks.filter { $0.bytes.count > 64 << 10 }
        #expect(largeBlocks.count >= 8, "blocks over 64 KiB: \(largeBlocks.count)")
        let readers = [LogReader(directory: store.directory), LogReader(directory: store.directory, index: store.journal.blockIndex)]
        // Positions in, at, just before and just after the large blocks, and anywhere.
        var starts: [UInt64] = []
        for block in largeBlocks {
            let count = UInt64(block.bytes.count)  // an upper bound of its records, for a random position inside
            starts += [block.firstLSN - 1, block.firstLSN, block.firstLSN + 1, UInt64.random(in: block.firstLSN...block.firstLSN + count / 40, using: &rng)]
        }
        for _ in 0..<200 { starts.append(UInt64.random(in: 1...durable, using: &rng)) }
        for from in starts where from >= 1 && from <= durable {
            let count = Int.random(in: 1...5_000, using: &rng)
            let bound = Bool.random(using: &rng) ? durable : UInt64.random(in: from...durable, using: &rng)
            let want = truthRecords[Int(from - 1)..<Int(min(from - 1 + UInt64(count), bound))]
            let bytesMax = Int.random(in: 1...300_000, using: &rng)
            for reader in readers {
                let got = try reader.read(from: from, count: count, durable: bound)
                #expect(got.map(\.position) == want.map(\.position), "from \(from) count \(count)")
                #expect(got.map(\.record) == want.map(\.record), "from \(from) count \(count)")
                // Raw blocks: from the block holding `from`, whole blocks up to `bound`, until about bytesMax.
                let blocks = try reader.readBlocks(from: from, bytesMax: bytesMax, durable: bound)
                var expected: [[UInt8]] = []
                var total = 0
                for block in truthBlocks {
                    let records = try Self.recordCount(block.bytes)
                    let last = block.firstLSN + UInt64(records) - 1
                    if last < from { continue }
                    if last > bound || total >= bytesMax { break }
                    expected.append(block.bytes)
                    total += block.bytes.count
                }
                #expect(blocks.map(\.bytes) == expected, "blocks from \(from), bytesMax \(bytesMax)")
            }
        }
    }

    /// The record count of a block's header.
    static func recordCount(_ block: [UInt8]) throws -> Int {
        try #require(block.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[0..<BlockHeader.size])) }).recordCount
    }

    /// Entries that do not match their segment (a block at another position, an offset inside a
    /// block, past the end) are not trusted: the read walks from the start, as without the index.
    @Test func entriesThatDoNotMatchTheSegmentAreNotTrusted() async throws {
        let (store, path) = try await Self.makeLog(seed: 7)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let durable = store.journal.lastDurableLSN
        let plain = LogReader(directory: store.directory)
        let segments = try store.directory.segments()
        let second = segments[1]
        // A few positions well inside the second segment.
        let wanted = [second.firstLSN + 50, second.firstLSN + 400, segments[2].firstLSN - 1]
        let truth = BlockIndex()
        for from in wanted { _ = try LogReader(directory: store.directory, index: truth).read(from: from, count: 5, durable: durable) }
        let real = try #require(truth.block(atOrBefore: segments[2].firstLSN - 1, in: second.path))
        let bogus: [BlockIndex.Entry] = [
            BlockIndex.Entry(firstLSN: real.firstLSN + 1, offset: real.offset),  // another position
            BlockIndex.Entry(firstLSN: real.firstLSN, offset: real.offset + 7),  // inside a block
            BlockIndex.Entry(firstLSN: second.firstLSN + 10, offset: 5 * BlockIndex.strideBytes + 1_000),  // past the end
        ]
        for entry in bogus {
            let index = BlockIndex()
            index.learn(entry, in: second.path, generation: index.generation)
            let reader = LogReader(directory: store.directory, index: index)
            for from in wanted {
                let expected = try plain.read(from: from, count: 5, durable: durable)
                #expect(try reader.read(from: from, count: 5, durable: durable).map(\.record) == expected.map(\.record), "\(entry)")
                #expect(try reader.readBlocks(from: from, bytesMax: 1, durable: durable).map(\.bytes) == plain.readBlocks(from: from, bytesMax: 1, durable: durable).map(\.bytes))
            }
        }
        store.close()
    }

    /// A log started again forgets what was learned, and what a read that began before learns is
    /// not kept.
    @Test func aLogStartedAgainForgetsItsBlocks() async throws {
        let (store, path) = try await Self.makeLog(seed: 9)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let index = store.journal.blockIndex
        let segments = try store.directory.segments()
        _ = try LogReader(directory: store.directory, index: index).read(from: segments[2].firstLSN - 1, count: 1, durable: store.journal.lastDurableLSN)
        #expect(index.block(atOrBefore: .max, in: segments[1].path) != nil)
        let before = index.generation
        try store.journal.restart(at: store.journal.lastDurableLSN)
        #expect(index.generation != before)
        #expect(index.block(atOrBefore: .max, in: segments[1].path) == nil)
        index.learn(BlockIndex.Entry(firstLSN: 5, offset: 1 << 20), in: segments[1].path, generation: before)
        #expect(index.block(atOrBefore: .max, in: segments[1].path) == nil)
        store.close()
    }

    /// Entries of segments no longer in the directory are dropped once they outnumber it.
    @Test func segmentsRemovedAreDropped() {
        let index = BlockIndex()
        for (n, path) in ["a", "b", "c"].enumerated() {
            index.learn(BlockIndex.Entry(firstLSN: UInt64(n * 100 + 50), offset: BlockIndex.strideBytes), in: path, generation: index.generation)
        }
        index.keep(only: [(1, "a"), (100, "b"), (200, "c")])
        #expect(["a", "b", "c"].allSatisfy { index.block(atOrBefore: .max, in: $0) != nil })
        index.keep(only: [(200, "c"), (300, "d")])
        #expect(index.block(atOrBefore: .max, in: "a") == nil && index.block(atOrBefore: .max, in: "b") == nil)
        #expect(index.block(atOrBefore: 250, in: "c") == BlockIndex.Entry(firstLSN: 250, offset: BlockIndex.strideBytes))
        #expect(index.block(atOrBefore: 249, in: "c") == nil)
    }

    /// A log whose second segment is to be damaged at `block`, a block past its first index stride,
    /// and an index that learned that block. The store is closed.
    static func logToDamage(seed: UInt64) async throws -> (
        path: String, durable: UInt64, segments: [(firstLSN: UInt64, path: String)], learned: BlockIndex, block: BlockIndex.Entry
    ) {
        let (store, path) = try await makeLog(seed: seed)
        let durable = store.journal.lastDurableLSN
        let segments = try store.directory.segments()
        let learned = BlockIndex()
        _ = try LogReader(directory: store.directory, index: learned).read(from: segments[2].firstLSN - 1, count: 1, durable: durable)
        let block = try #require(learned.block(atOrBefore: segments[1].firstLSN + 1_000, in: segments[1].path))
        #expect(block.firstLSN > segments[1].firstLSN + 10)
        store.close()
        return (path, durable, segments, learned, block)
    }

    /// With no index, an empty one and `learned`: each read of `refused` throws, and the records
    /// before `block` in the second segment and the first of the third are read as they are.
    static func expectReadsOfTheDamageRefused(
        _ log: (path: String, durable: UInt64, segments: [(firstLSN: UInt64, path: String)], learned: BlockIndex, block: BlockIndex.Entry),
        refused: [(from: UInt64, count: Int)], _ comment: Comment
    ) throws {
        let (second, third) = (log.segments[1], log.segments[2])
        for index in [nil, BlockIndex(), log.learned] {
            let reader = LogReader(directory: DataDirectory(log.path), index: index)
            for (from, count) in refused {
                #expect(throws: LogReader.ReadError.self, "from \(from) count \(count), \(comment)") {
                    let got = try reader.read(from: from, count: count, durable: log.durable)
                    Issue.record("from \(from): positions \(got.map(\.position).prefix(8))... of \(got.count)")
                }
            }
            let before = try reader.read(from: second.firstLSN, count: Int(log.block.firstLSN - second.firstLSN), durable: log.durable)
            #expect(before.map(\.position) == Array(second.firstLSN..<log.block.firstLSN))
            #expect(try reader.read(from: third.firstLSN, count: 3, durable: log.durable).map(\.position) == Array(third.firstLSN..<third.firstLSN + 3))
        }
    }

    /// A block header damaged in the middle of a segment is an error for every read that reaches it,
    /// with or without the index: it was taken for the segment's end, and the next segment's records
    /// were answered in place of this one's (review of #8: `EVENTS 281337 COUNT 1` answered position
    /// 564,520).
    @Test func aDamagedBlockHeaderIsAnErrorNotTheSegmentsEnd() async throws {
        let log = try await Self.logToDamage(seed: 11)
        defer { try? FileManager.default.removeItem(atPath: log.path) }
        // One bit of the header's first position: its checksum fails.
        let file = try #require(FileHandle(forUpdatingAtPath: log.segments[1].path))
        try file.seek(toOffset: UInt64(log.block.offset + 16))
        let byte = try #require(try file.read(upToCount: 1)).first! ^ 1
        try file.seek(toOffset: UInt64(log.block.offset + 16))
        try file.write(contentsOf: [byte])
        try file.close()
        // Before the damaged block and into it; inside it; at the block after it.
        let at = log.block.firstLSN
        try Self.expectReadsOfTheDamageRefused(log, refused: [(at - 3, 50), (at, 1), (at + 1, 1)], "a header damaged")
    }

    /// A segment cut short on disk (a lost tail, a partial copy) where the log must go on is an error
    /// too, not the segment's end: at a block's start, inside its header, inside the block (review
    /// of #8: `EVENTS 281330 COUNT 20` answered 281,330...281,335 and then 564,520... in one page).
    @Test(arguments: [0, 20, BlockHeader.size + 4])
    func aSegmentCutShortIsAnError(into: Int) async throws {
        let log = try await Self.logToDamage(seed: 13)
        defer { try? FileManager.default.removeItem(atPath: log.path) }
        try #require(truncate(log.segments[1].path, off_t(log.block.offset + into)) == 0)
        let at = log.block.firstLSN
        try Self.expectReadsOfTheDamageRefused(
            log, refused: [(at - 3, 20), (at, 1), (log.segments[2].firstLSN - 1, 1)], "cut at +\(into)")
    }

    /// A segment missing between two others (removed, or emptied) is an error for the reads that
    /// cross it or start in it, not a jump to the next segment (review of #8).
    @Test(arguments: [false, true])
    func aMissingSegmentIsAnError(emptied: Bool) async throws {
        let (store, path) = try await Self.makeLog(seed: 17)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let durable = store.journal.lastDurableLSN
        let segments = try store.directory.segments()
        store.close()
        if emptied {
            try #require(truncate(segments[1].path, 0) == 0)
        } else {
            try FileManager.default.removeItem(atPath: segments[1].path)
        }
        let reader = LogReader(directory: DataDirectory(path), index: BlockIndex())
        for (from, count) in [(segments[1].firstLSN - 2, 5), (segments[1].firstLSN, 1), (segments[2].firstLSN - 1, 1)] {
            #expect(throws: LogReader.ReadError.self, "from \(from) count \(count)") {
                let got = try reader.read(from: from, count: count, durable: durable)
                Issue.record("from \(from): positions \(got.map(\.position).prefix(8))... of \(got.count)")
            }
        }
        #expect(try reader.read(from: segments[1].firstLSN - 2, count: 2, durable: durable).map(\.position) == [segments[1].firstLSN - 2, segments[1].firstLSN - 1])
        #expect(try reader.read(from: segments[2].firstLSN, count: 3, durable: durable).map(\.position) == Array(segments[2].firstLSN..<segments[2].firstLSN + 3))
    }
}
