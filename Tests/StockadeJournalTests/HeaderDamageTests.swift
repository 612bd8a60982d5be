import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// Start offsets of the blocks of a segment file.
func blockOffsets(_ bytes: [UInt8]) -> [Int] {
    var offsets: [Int] = []
    var offset = SegmentHeader.size
    bytes.withUnsafeBytes { all in
        while offset + BlockHeader.size <= all.count, let h = BlockHeader.parse(UnsafeRawBufferPointer(rebasing: all[offset...])) {
            offsets.append(offset)
            offset += h.totalLength
        }
    }
    return offsets
}

/// Copies every file of `from` into a fresh `to`.
func copyDirectory(_ from: String, to: String) throws {
    try? FileManager.default.removeItem(atPath: to)
    try FileManager.default.createDirectory(atPath: to, withIntermediateDirectories: true)
    for file in try FileManager.default.contentsOfDirectory(atPath: from) where file != "LOCK" {
        try FileManager.default.copyItem(atPath: from + "/" + file, toPath: to + "/" + file)
    }
}

/// Issue #7 A1: a flipped bit in a block header used to read as "block cut short" and be cut as a
/// torn tail, silently dropping the acknowledged blocks after it.
@Suite struct HeaderDamageTests {
    /// Flips every bit of every header byte of the block at `blockOffset` of `segment` (a copy of
    /// `directory` each time) and checks that recovery, allowed to repair, either refuses with a
    /// corruption error naming the file and that offset (changing nothing), or rebuilds exactly
    /// `expected`: never a silent loss.
    static func flipEveryHeaderBit(
        directory: String, segment: String, blockOffset: Int, shardCount: Int, expected: (lsn: UInt64, hash: UInt64)
    ) throws -> (refused: Int, recovered: Int) {
        let name = (segment as NSString).lastPathComponent
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment)))
        let scratch = directory + "-flip"
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        var refused = 0, recovered = 0
        for byte in blockOffset..<blockOffset + BlockHeader.size {
            for bit in 0..<8 {
                try copyDirectory(directory, to: scratch)
                var damaged = original
                damaged[byte] ^= UInt8(1) << bit
                try Data(damaged).write(to: URL(fileURLWithPath: scratch + "/" + name))
                let what = "\(name) byte \(byte) (header byte \(byte - blockOffset)) bit \(bit)"
                do {
                    let (state, report) = try Recovery.recover(DataDirectory(scratch), options: .init(shardCount: shardCount, repair: true))
                    #expect(state.lsn == expected.lsn && state.stateHash() == expected.hash, "SILENT LOSS, \(what): \(report)")
                    recovered += 1
                } catch {
                    #expect(error.code == .corrupt, "\(what): \(error)")
                    #expect(error.message.contains(scratch + "/" + name) && error.message.contains("offset \(blockOffset)"), "\(what): \(error)")
                    #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: scratch + "/" + name))) == damaged, "\(what): a refusal changed the file")
                    refused += 1
                }
            }
        }
        return (refused, recovered)
    }

    /// Blocks in the middle of the active segment and of an older segment, every header bit.
    @Test func everyHeaderBitOfMiddleBlocksRefusesOrRecoversAll() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 1_200  // a few segments of about ten blocks
        let store = try Store(path: path, options: options)
        _ = await store.engine.execute([.addSku(sku: "tv", total: 10_000, limit: 0), .addSku(sku: "radio", total: 10_000, limit: 0)], now: 0)
        // Until there are older segments and the active one holds several blocks.
        for round in 0..<200 {
            let segments = try DataDirectory(path).segments()
            if segments.count >= 3, blockOffsets(try [UInt8](Data(contentsOf: URL(fileURLWithPath: segments.last!.path)))).count >= 6 { break }
            // One acknowledged batch, one block.
            let replies = await store.engine.execute((0..<2).map { Command.reserve(user: Name("u\(round)-\($0)"), lines: [OrderLine(sku: Name($0 == 0 ? "tv" : "radio"), quantity: 1)], requestId: nil, ttlMillis: 600_000) }, now: 0)
            for reply in replies { guard case .reserved = reply else { Issue.record("\(reply)"); return } }
        }
        let live = await liveState(store)
        store.close()
        let segments = try DataDirectory(path).segments()
        try #require(segments.count >= 3, "want an older and an active segment")
        let active = segments.last!.path
        let activeBlocks = blockOffsets(try [UInt8](Data(contentsOf: URL(fileURLWithPath: active))))
        try #require(activeBlocks.count >= 4)
        let older = segments[segments.count - 2].path
        let olderBlocks = blockOffsets(try [UInt8](Data(contentsOf: URL(fileURLWithPath: older))))
        try #require(olderBlocks.count >= 3)
        let cases = [
            (active, activeBlocks[activeBlocks.count / 2]),  // the middle of the active segment
            (active, activeBlocks[activeBlocks.count - 2]),  // just before the last block
            (older, olderBlocks[olderBlocks.count / 2]),  // the middle of an older segment
            (older, olderBlocks.last!),  // the last block of an older segment
        ]
        for (segment, offset) in cases {
            let outcome = try Self.flipEveryHeaderBit(
                directory: path, segment: segment, blockOffset: offset, shardCount: 2, expected: (live.lsn, live.stateHash()))
            #expect(outcome.refused + outcome.recovered == BlockHeader.size * 8)
            #expect(outcome.refused > 0, "every flip was accepted?")
        }
    }

    /// The same over the golden fixture's version 1 blocks (no header checksum): a bad length is
    /// recognised as damage followed by valid blocks by scanning on.
    @Test func versionOneHeadersAreScannedPast() throws {
        let work = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: work) }
        try copyDirectory(GoldenFixtureTests.fixtures, to: work)
        try FileManager.default.removeItem(atPath: work + "/MANIFEST.txt")
        let (expected, _) = try Recovery.recover(DataDirectory(work), options: .init(shardCount: 1, repair: false))
        let segment = try DataDirectory(work).segments().last!.path
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment)))
        let blocks = blockOffsets(bytes)
        try #require(blocks.count >= 3)
        #expect(bytes.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[blocks[1]...]))!.version } == 1)
        let outcome = try Self.flipEveryHeaderBit(
            directory: work, segment: segment, blockOffset: blocks[blocks.count / 2], shardCount: 1,
            expected: (expected.lsn, expected.stateHash()))
        #expect(outcome.refused > 0)
    }

    /// A version 1 directory (the golden fixtures) opened by this build: it gains a segment of this
    /// build's block version, and the mixed directory recovers the live state.
    @Test func versionOneDirectoryUpgradesInPlace() async throws {
        let work = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: work) }
        try copyDirectory(GoldenFixtureTests.fixtures, to: work)
        try FileManager.default.removeItem(atPath: work + "/MANIFEST.txt")
        let store = try Store(path: work, options: Store.Options(shardCount: 1))
        _ = await store.engine.execute(.addSku(sku: "new-after-upgrade", total: 5, limit: 0), now: 1_700_000_000_000)
        _ = try await store.snapshot()
        _ = await store.engine.execute(.restock(sku: "new-after-upgrade", delta: 3), now: 1_700_000_000_000)
        let live = await liveState(store)
        store.close()
        let segments = try DataDirectory(work).segments()
        let versions = try segments.map { segment in
            let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment.path)))
            return blockOffsets(bytes).first.map { offset in bytes.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[offset...]))!.version } }
        }
        #expect(versions.first == 1 && versions.last == BlockHeader.version)
        let (state, _) = try recover(work)
        #expect(state.lsn == live.lsn && state.stateHash() == live.stateHash())
    }

    /// The issue's repro: ten acknowledged reserves, a clean shutdown, bit 0 of byte 10 (payload
    /// length) of the 4th block flipped. Old code cut a "torn tail" and lost 8 holds.
    @Test func flippedLengthBitIsCorruptionNotATornTail() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 1))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 100, limit: 0), now: 0)
        for i in 0..<10 {
            _ = await store.engine.execute(.reserve(user: Name("u\(i)"), lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
        }
        store.close()
        let segment = try DataDirectory(path).segments().last!.path
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment)))
        let fourth = blockOffsets(bytes)[3]
        bytes[fourth + 10] ^= 1
        try Data(bytes).write(to: URL(fileURLWithPath: segment))
        #expect {
            try Store(path: path, options: Store.Options(shardCount: 1))
        } throws: { error in
            guard let error = error as? JournalError else { return false }
            return error.code == .corrupt && error.message.contains(segment) && error.message.contains("offset \(fourth)")
                && error.message.contains("--truncate-corrupt")
        }
        // Refused, not cut: the file is as it was.
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment))) == bytes)
    }

    /// The last block cut short by the end of the file (a torn write) is a torn tail, cut and reported;
    /// the same block complete but with one bit flipped (header or payload) was damaged after it was
    /// written and may hold acknowledged records: start-up refuses. (Found by the simulator: a flip in
    /// the last block was cut as a torn tail and acknowledged records were lost.)
    @Test func lastBlockCutShortIsTornButDamagedInFullIsRefused() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store(path: path, options: Store.Options(shardCount: 1))
        _ = await store.engine.execute(.addSku(sku: "tv", total: 100, limit: 0), now: 0)
        let beforeLast = store.journal.lastDurableLSN
        _ = await store.engine.execute(.reserve(user: "u", lines: [OrderLine(sku: "tv", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
        store.close()
        let segment = try DataDirectory(path).segments().last!.path
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment)))
        let last = blockOffsets(original).last!
        for damage in [last + 10, last + 30, original.count - 1] {
            var bytes = original
            bytes[damage] ^= 1
            try Data(bytes).write(to: URL(fileURLWithPath: segment))
            #expect {
                _ = try recover(path, repair: true)
            } throws: { error in
                guard let error = error as? JournalError else { return false }
                return error.code == .corrupt && error.message.contains(segment) && error.message.contains("offset \(last)")
            }
            #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: segment))) == bytes, "a refused segment was changed")
        }
        for cut in [last + 1, last + 20, original.count - 1] {
            try Data(original[..<cut]).write(to: URL(fileURLWithPath: segment))
            let (state, report) = try recover(path, repair: true)
            #expect(state.lsn == beforeLast)
            #expect(report.tornTail?.contains("offset \(last)") == true)
        }
    }
}
