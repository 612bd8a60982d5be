import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// The replication path below the network: blocks read from a primary's log (``LogReader/readBlocks(from:bytesMax:durable:)``),
/// checked and decoded on the replica (``LogReader/decodeBlock(_:)``) and applied to a read-only engine
/// (``Engine/applyReplicated(_:at:)``).
@Suite struct ReplicationTests {
    /// A replica fed a random workload's log in chunks of random size, each chunk's first block
    /// starting before the replica's position as often as not, ends in the primary's exact state;
    /// and its published counters (what STOCK and the sold-out path read) agree at every step.
    @Test(arguments: (21 as UInt64)...32)
    func replicaFedTheLogInChunksEqualsThePrimary(seed: UInt64) async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 3)
        options.journal.segmentBytesMax = 4096  // many segments: chunks cross them
        let store = try Store(path: path, options: options)
        var now: Int64 = 1_000
        _ = await store.engine.execute(["apple", "pear", "plum", "fig", "kiwi", "lime", "date"].map { .addSku(sku: $0, total: 40, limit: 3) }, now: now)
        _ = await runWorkload(store, seed: seed, count: 2_000, now: &now)
        let live = await liveState(store)
        #expect(live.lsn > 200)

        let loop = QueueExecutor(label: "replica")
        let replica = Engine(state: EngineState(shardCount: 3), log: MemoryChangeLog(), executors: [loop], readOnly: true)
        var rng = SplitMix64(seed: seed)
        let reader = LogReader(directory: store.directory)
        var position: UInt64 = 0
        var chunks = 0
        while position < live.lsn {
            // Ask again from inside the last block sometimes: the reader starts at the block holding it.
            let from = position + 1
            let blocks = try reader.readBlocks(from: from, bytesMax: Int.random(in: 1...3000, using: &rng), durable: store.journal.lastDurableLSN)
            #expect(!blocks.isEmpty)
            var records: [Record] = []
            for block in blocks {
                let decoded = try LogReader.decodeBlock(block.bytes).get()
                #expect(decoded.firstLSN == block.firstLSN && decoded.records.count == block.recordCount)
                let skip = Int(max(from + UInt64(records.count), decoded.firstLSN) - decoded.firstLSN)
                records += decoded.records[skip...]
            }
            let (reached, failure) = await replica.applyReplicated(records, at: position)
            #expect(failure == nil)
            #expect(reached == position + UInt64(records.count))
            position = reached
            chunks += 1
            for sku in ["apple", "pear", "fig"] as [Name] {
                let shard = replica.shardIndex(of: sku)
                let counted = await replica.shards[shard].snapshotState().stock(sku)?.available
                #expect(replica.available(sku) == counted)
            }
        }
        #expect(chunks > 3)
        let followed = await replica.captureState(lsn: position)
        #expect(followed.lsn == live.lsn)
        #expect(followed.stateHash() == live.stateHash())
        // Read-only: changes are refused and nothing expires here, however late it is.
        #expect(await replica.execute([.restock(sku: "apple", delta: 1)], now: now) == [.rejected(.readOnly)])
        await replica.expire(now: now + 10_000_000)
        #expect(await replica.captureState(lsn: position).stateHash() == live.stateHash())
        store.close()
    }

    /// A record that does not fit the replica's state (a log from elsewhere) stops the apply there:
    /// the records before it are applied, it and those after are not.
    @Test func aRecordThatDoesNotFitStopsTheApply() async throws {
        let replica = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog(), executors: [QueueExecutor(label: "replica")], readOnly: true)
        let shard = Engine.shardIndex(of: "tv", shardCount: 2)
        let records: [Record] = [
            .skuAdded(shard: shard, skuIndex: 0, sku: "tv", total: 5, limit: 0),
            .deducted(shard: shard, skuIndex: 0, quantity: 9),  // more than there is
            .deducted(shard: shard, skuIndex: 0, quantity: 1),
        ]
        let (reached, failure) = await replica.applyReplicated(records, at: 0)
        #expect(reached == 1)
        #expect(failure != nil)
        #expect(replica.available("tv") == 5)
    }

    /// Every single flipped bit of a shipped block is refused by the replica's check.
    @Test func everyFlippedBitOfABlockIsRefused() throws {
        var raw = RecordBuffer()
        raw.skuAdded(shard: 0, skuIndex: 0, sku: "tv", total: 5, limit: 0)
        raw.deducted(shard: 0, skuIndex: 0, quantity: 2)
        var block: [UInt8] = []
        raw.bytes.withUnsafeBytes { BlockCodec.appendBlock(raw: $0, firstLSN: 7, recordCount: 2, to: &block) }
        #expect(try LogReader.decodeBlock(block).get().firstLSN == 7)
        for bit in 0..<(block.count * 8) {
            var damaged = block
            damaged[bit / 8] ^= UInt8(1 << (bit % 8))
            if case .success = LogReader.decodeBlock(damaged) { Issue.record("bit \(bit) flipped was accepted") }
        }
        #expect(throws: LogReader.ReadError.self) { try LogReader.decodeBlock(Array(block.dropLast())).get() }
    }

    /// The stream's reader: positions the log no longer keeps are refused as trimmed, and nothing
    /// past the durable position is shipped.
    @Test func readBlocksHonoursTrimAndDurability() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 2)
        options.journal.segmentBytesMax = 600
        options.coveredSegmentsKept = 0
        var store = try Store(path: path, options: options)
        _ = await store.engine.execute(.addSku(sku: "tv", total: 10_000, limit: 0), now: 0)
        await makeChanges(store, tag: "a")
        let reader = LogReader(directory: store.directory)
        let durable = store.journal.lastDurableLSN
        let all = try reader.readBlocks(from: 1, bytesMax: 1 << 20, durable: durable)
        #expect(all.last?.lastLSN == durable)
        #expect(try reader.readBlocks(from: 1, bytesMax: 1 << 20, durable: durable - 1).allSatisfy { $0.lastLSN <= durable - 1 })
        #expect(try reader.readBlocks(from: durable + 1, bytesMax: 1 << 20, durable: durable).isEmpty)
        for round in 0..<3 {
            _ = try await store.snapshot()
            store.close()
            store = try Store(path: path, options: options)
            await makeChanges(store, tag: "b\(round)")
        }
        #expect(throws: LogReader.ReadError.self) {
            try LogReader(directory: store.directory).readBlocks(from: 1, bytesMax: 1 << 20, durable: store.journal.lastDurableLSN)
        }
        store.close()
    }
}
