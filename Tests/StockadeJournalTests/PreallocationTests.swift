import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// The end of the last whole block of a segment's bytes (the segment header's end when it has none).
func blocksEnd(_ bytes: [UInt8]) -> Int {
    var offset = SegmentHeader.size
    while case .block(let header, _) = bytes.withUnsafeBytes({ BlockCodec.read($0, at: offset) }) { offset += header.totalLength }
    return offset
}

/// A journal over `storage` in `path` whose segments are written into space allocated ahead.
private func preallocatingJournal(
    _ directory: DataDirectory, lsn: UInt64 = 0, step: Int = 4_096, segmentBytesMax: Int = 20_000
) throws -> Journal {
    var options = Journal.Options()
    options.writerThread = false
    options.preallocationBytes = step
    options.segmentBytesMax = segmentBytesMax
    let journal = try Journal(directory: directory, shardCount: 1, lsn: lsn, options: options)
    if lsn == 0 {
        var add = RecordBuffer()
        add.skuAdded(shard: 0, skuIndex: 0, sku: "tv", total: 0, limit: 0)
        _ = try journal.append(add)
        journal.writePending()
    }
    return journal
}

/// Writes `count` batches of one record each, each synced.
private func writeBatches(_ journal: Journal, _ count: Int) throws {
    for _ in 0..<count {
        _ = try journal.append(oneRecord())
        journal.writePending()
    }
}

/// Log segments written in place into allocated space (#8): what the files look like while open and
/// once closed, what a crash leaves, and how recovery reads it.
@Suite struct PreallocationTests {
    /// On the real disk: an open segment is longer than its blocks (zeros allocated ahead); a segment
    /// that another follows, and the last one after a close, end exactly at their last block; and
    /// recovery reads it all with nothing to cut.
    @Test func segmentsAreAllocatedAheadAndCutBackWhenClosed() throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let directory = DataDirectory(path)
        let journal = try preallocatingJournal(directory, segmentBytesMax: 6_000)
        try writeBatches(journal, 3)
        let open = try directory.segments().last!.path
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: open)))
        #expect(bytes.count == 4_096 && blocksEnd(bytes) < bytes.count, "open segment: \(bytes.count) bytes, blocks to \(blocksEnd(bytes))")
        #expect(bytes[blocksEnd(bytes)...].allSatisfy { $0 == 0 })
        // Enough batches for several segments.
        for _ in 0..<400 {
            for _ in 0..<5 { _ = try journal.append(oneRecord()) }
            journal.writePending()
        }
        let written = journal.lastDurableLSN
        journal.close()
        let segments = try directory.segments()
        #expect(segments.count > 2)
        for segment in segments {
            let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment.path)))
            #expect(bytes.count == blocksEnd(bytes), "\(segment.path): \(bytes.count) bytes, blocks to \(blocksEnd(bytes))")
        }
        let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1))
        #expect(state.lsn == written && report.tornTail == nil && report.unwrittenBytesCut == 0, "\(report)")
    }

    /// A power cut leaves the last segment with zeros past its last block: recovery cuts them as
    /// unwritten space (not a torn tail, not damage), so that the segment the next start opens after
    /// it is not preceded by zeros; a second crash after that recovers everything too.
    @Test func zerosLeftByACrashAreCutAsUnwrittenSpace() throws {
        let disk = SimulatedStorage(seed: 7)
        let directory = DataDirectory("/data", storage: disk)
        var journal = try preallocatingJournal(directory)
        try writeBatches(journal, 5)
        let first = journal.lastDurableLSN
        disk.crash()
        let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1))
        #expect(state.lsn == first && report.tornTail == nil && report.unwrittenBytesCut > 0, "\(report)")
        let cutSegment = try directory.segments().last!.path
        #expect(disk.contents(cutSegment)!.count == blocksEnd(disk.contents(cutSegment)!))

        journal = try preallocatingJournal(directory, lsn: state.lsn)
        try writeBatches(journal, 5)
        let second = journal.lastDurableLSN
        disk.crash()
        let (again, secondReport) = try Recovery.recover(directory, options: .init(shardCount: 1))
        #expect(again.lsn == second && secondReport.tornTail == nil && secondReport.unwrittenBytesCut > 0, "\(secondReport)")
        #expect(again.shards[0].info(0).total == Int64(second - 1))
    }

    /// A block written whole into allocated space and damaged since is corruption, never a torn tail:
    /// every bit of its trailer, and a bit of its payload. Cut before its trailer, the same block is a
    /// torn write (its last byte still zero).
    @Test func aWholeBlockIsTellableFromATornOneByItsTrailer() throws {
        let disk = SimulatedStorage(seed: 3)
        let directory = DataDirectory("/data", storage: disk)
        let journal = try preallocatingJournal(directory)
        try writeBatches(journal, 3)
        let segment = try directory.segments().last!.path
        let synced = disk.contents(segment)!
        let end = blocksEnd(synced)
        #expect(synced.count > end && synced[end - 1] == BlockHeader.trailer)
        var lastStart = SegmentHeader.size
        while case .block(let header, _) = synced.withUnsafeBytes({ BlockCodec.read($0, at: lastStart) }), lastStart + header.totalLength < end {
            lastStart += header.totalLength
        }
        for bit in 0..<8 {
            disk.setContents(segment, synced)
            disk.flipBit(segment, at: end - 1, bit: bit)
            #expect(throws: JournalError.self, "trailer bit \(bit)") {
                try Recovery.recover(directory, options: .init(shardCount: 1, repair: false))
            }
        }
        disk.setContents(segment, synced)
        disk.flipBit(segment, at: lastStart + BlockHeader.size + 1, bit: 2)
        #expect(throws: JournalError.self) { try Recovery.recover(directory, options: .init(shardCount: 1, repair: false)) }
        // The write stopped just before the trailer: the records are all there, but the block was
        // never written whole, so never acknowledged.
        var torn = synced
        torn[end - 1] = 0
        disk.setContents(segment, torn)
        let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1, repair: false))
        #expect(report.tornTail?.contains("offset \(lastStart)") == true, "\(report)")
        #expect(state.lsn == journal.lastDurableLSN - 1)
    }

    /// Where the space cannot be had (a full disk, a file size limit), segments grow with each write
    /// as before, and recovery reads them the same. A refusal may have grown the file partway (zeros
    /// written until the disk was full): writes go on at the end of the blocks, over those zeros, and
    /// recovery cuts what is left of them as unwritten space.
    @Test func refusedAllocationGrowsTheFileWithEachWrite() throws {
        var faults = SimulatedStorage.FaultPlan()
        faults.preallocationRefused = 1
        var grewPartway = 0
        for seed in 0..<20 as Range<UInt64> {
            let disk = SimulatedStorage(seed: seed, faults: faults)
            let directory = DataDirectory("/data", storage: disk)
            let journal = try preallocatingJournal(directory)
            var refusedAt: Int?
            for _ in 0..<5 {
                _ = try journal.append(oneRecord())
                journal.writePending()
                let bytes = disk.contents(try directory.segments().last!.path)!
                // The first batch's refusal left the file at some length; no later batch asks again.
                if refusedAt == nil { refusedAt = bytes.count }
                #expect(bytes.count == max(blocksEnd(bytes), refusedAt!), "seed \(seed)")
            }
            let grown = refusedAt! > blocksEnd(disk.contents(try directory.segments().last!.path)!)
            if grown { grewPartway += 1 }
            disk.crash()
            let (state, report) = try Recovery.recover(directory, options: .init(shardCount: 1))
            #expect(state.lsn == journal.lastDurableLSN && report.tornTail == nil, "seed \(seed): \(report)")
            #expect(grown || report.unwrittenBytesCut == 0, "seed \(seed): \(report)")
        }
        #expect(grewPartway > 0)
    }

    /// The simulated disk's power cut over bytes written in place since the last sync keeps the synced
    /// bytes with a prefix of the change, of every length from none to all, and nothing else.
    @Test func aCrashKeepsAPrefixOfWhatWasWrittenInPlace() throws {
        let synced = [UInt8](repeating: 0, count: 64)
        let change = [UInt8](1...20)
        var kept = Set<Int>()
        for seed in 0..<400 as Range<UInt64> {
            let disk = SimulatedStorage(seed: seed)
            disk.setContents("/f", synced)
            let file = try disk.open("/f", .update)
            try file.write(change, at: 30)
            disk.crash()
            let after = disk.contents("/f")!
            #expect(after.count == synced.count)
            let prefix = (0...change.count).last { after[30..<30 + $0].elementsEqual(change[..<$0]) }!
            var expected = synced
            expected.replaceSubrange(30..<30 + prefix, with: change[..<prefix])
            #expect(after == expected, "seed \(seed)")
            kept.insert(prefix)
        }
        #expect(kept == Set(0...change.count))
    }
}
