import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// The fixtures in `snapshots/v1` and `snapshots/v2`: a snapshot and a log tail written by format
/// versions 1 and 2 (blocks of that version), with a manifest of the state they hold. Every later
/// build must keep reading them (or ship a converter).
@Suite struct GoldenFixtureTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("snapshots").path
    /// The version 1 fixtures (the directory-upgrade tests start from them).
    static let fixtures = root + "/v1"

    /// The manifest: the position, the state hash, and one line per SKU.
    static func manifest(_ state: EngineState) -> String {
        var lines = ["position \(state.lsn)", "state-hash \(String(state.stateHash(), radix: 16))",
                     "orders \(state.shards.reduce(0) { $0 + $1.orderCount })"]
        for shard in state.shards {
            for index in 0..<shard.skuCount {
                let s = shard.info(index)
                lines.append("sku \(s.sku) total \(s.total) available \(s.available) reserved \(s.reserved) sold \(s.sold) limit \(s.limit) paused \(s.paused)")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Each version's fixtures recover to the state their manifest states. (Version 2's were written
    /// by the server of that version: `SKU.ADD`s with limits, reservations, confirms, cancels, baskets,
    /// restocks, deducts, pauses, a `SNAPSHOT`, more of the same, a `SHUTDOWN`; its manifest's SKU
    /// lines agree with what that server's `STOCK` answered.)
    @Test(arguments: ["v1", "v2"])
    func goldenFixturesStillRecover(version: String) throws {
        if ProcessInfo.processInfo.environment["STOCKADE_WRITE_FIXTURES"] == "1" { try Self.writeFixtures() }
        let fixtures = Self.root + "/" + version
        let copy = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: copy) }
        for file in try FileManager.default.contentsOfDirectory(atPath: fixtures) {
            try FileManager.default.copyItem(atPath: fixtures + "/" + file, toPath: copy + "/" + file)
        }
        let (state, report) = try Recovery.recover(DataDirectory(copy), options: .init(shardCount: 1, repair: false))
        #expect(report.snapshotPath != nil && report.recordsReplayed > 0 && report.tornTail == nil)
        let expected = try String(contentsOfFile: fixtures + "/MANIFEST.txt", encoding: .utf8)
        #expect(Self.manifest(state) == expected)
        // Every block of the fixture's log is of its version.
        let segment = try [UInt8](Data(contentsOf: URL(fileURLWithPath: try DataDirectory(copy).segments().first!.path)))
        let first = segment.withUnsafeBytes { BlockHeader.parse(UnsafeRawBufferPointer(rebasing: $0[SegmentHeader.size...])) }
        #expect(first.map { "v\($0.version)" } == version)
    }

    /// Regenerates the fixtures of the version this build writes, in `snapshots/v<version>` (only with
    /// STOCKADE_WRITE_FIXTURES=1, after a deliberate format change).
    static func writeFixtures() throws {
        let fixtures = root + "/v\(BlockHeader.version)"
        try? FileManager.default.removeItem(atPath: fixtures)
        try FileManager.default.createDirectory(atPath: fixtures, withIntermediateDirectories: true)
        let work = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: work) }
        let done = DispatchSemaphore(value: 0)
        Task {
            let store = try! Store(path: work, options: Store.Options(shardCount: 3))
            var now: Int64 = 1_700_000_000_000
            _ = await store.engine.execute(["apple", "pear", "plum", "fig", "kiwi", "lime", "date"].map { .addSku(sku: $0, total: 30, limit: 2) }, now: now)
            await runWorkload(store, seed: 42, count: 400, now: &now)
            _ = try! await store.snapshot()
            await runWorkload(store, seed: 43, count: 400, now: &now)
            store.close()
            done.signal()
        }
        done.wait()
        for file in try FileManager.default.contentsOfDirectory(atPath: work) {
            try FileManager.default.copyItem(atPath: work + "/" + file, toPath: fixtures + "/" + file)
        }
        let (state, _) = try Recovery.recover(DataDirectory(fixtures), options: .init(shardCount: 3, repair: false))
        try manifest(state).write(toFile: fixtures + "/MANIFEST.txt", atomically: true, encoding: .utf8)
    }
}
