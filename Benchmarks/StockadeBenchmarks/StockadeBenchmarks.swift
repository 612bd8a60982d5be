import Benchmark
import CJemalloc
import Foundation
import StockadeCore
import StockadeJournal

/// Hot paths of the engine and the journal. Run: `swift package benchmark` (or `make bench`).
/// Throughput is per scaled iteration: one iteration of a `.mega` benchmark is 1M operations.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .peakMemoryResident], warmupIterations: 1, maxDuration: .seconds(10),
        maxIterations: 5)

    let users = (0..<100_000).map { "user-\($0)" }
    let lines = [OrderLine(sku: "hot", quantity: 1)]

    func freshShard() -> ShardState {
        var state = ShardState(shard: 0)
        var scratch = RecordBuffer()
        _ = state.addSku("hot", total: Limits.stockMax, limit: 0, log: &scratch)
        return state
    }

    Benchmark("Reserve: one shard, journal off", configuration: .init(scalingFactor: .mega)) { benchmark in
        var state = freshShard()
        var log = RecordBuffer(capacity: 1 << 20)
        benchmark.startMeasurement()
        for i in benchmark.scaledIterations {
            let reply = state.reserve(user: users[i % users.count], lines: lines, requestId: nil, ttlMillis: 60_000, now: 0, log: &log)
            if i & 4095 == 4095 { log.removeAll() }
            blackHole(reply)
        }
    }

    Benchmark("Reserve: one shard, records encoded + LZ4 blocks", configuration: .init(scalingFactor: .mega)) { benchmark in
        var state = freshShard()
        var log = RecordBuffer(capacity: 1 << 20)
        var framed: [UInt8] = []
        framed.reserveCapacity(1 << 20)
        benchmark.startMeasurement()
        for i in benchmark.scaledIterations {
            let reply = state.reserve(user: users[i % users.count], lines: lines, requestId: nil, ttlMillis: 60_000, now: 0, log: &log)
            if i & 4095 == 4095 {
                log.bytes.withUnsafeBytes { BlockCodec.appendBlock(raw: $0, firstLSN: UInt64(i), recordCount: log.count, to: &framed) }
                framed.removeAll(keepingCapacity: true)
                log.removeAll()
            }
            blackHole(reply)
        }
    }

    Benchmark("Reserve: engine, 2 shards, batches of 64, no journal", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: "a", total: Limits.stockMax, limit: 0), .addSku(sku: "b", total: Limits.stockMax, limit: 0)], now: 0)
        let batch = (0..<64).map { Command.reserve(user: users[$0], lines: [OrderLine(sku: $0 % 2 == 0 ? "a" : "b", quantity: 1)], requestId: nil, ttlMillis: 60_000) }
        benchmark.startMeasurement()
        for _ in 0..<(benchmark.scaledIterations.count / 64) {
            blackHole(await engine.execute(batch, now: 0))
        }
    }

    Benchmark(
        "Journal: group commit, fdatasync always, 32 writers x 16 records",
        configuration: .init(metrics: [.throughput, .wallClock, .custom("records per fdatasync", polarity: .prefersLarger, useScalingFactor: false)],
                             scalingFactor: .kilo, maxIterations: 3)
    ) { benchmark in
        let dir = NSTemporaryDirectory() + "stockade-bench-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let journal = try! Journal(directory: DataDirectory(dir), shardCount: 1, lsn: 0)
        var records = RecordBuffer()
        for i in 0..<16 {
            records.orderCreated(id: OrderID(shard: 0, sequence: UInt32(i + 1)), deadlineMillis: 0, user: users[i], requestId: nil, shard: 0, skuIndex: 0, quantity: 1)
        }
        let batch = records
        let batchesPerWriter = benchmark.scaledIterations.count * 10 / (32 * 16)
        benchmark.startMeasurement()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<32 {
                group.addTask {
                    for _ in 0..<batchesPerWriter {
                        let lsn = try! journal.append(batch)
                        try! await journal.waitDurable(lsn)
                    }
                }
            }
        }
        benchmark.stopMeasurement()
        let stats = journal.statistics
        benchmark.measurement(.custom("records per fdatasync", polarity: .prefersLarger, useScalingFactor: false), stats.records / max(1, stats.syncs))
        journal.close()
    }

    Benchmark("Recovery: replay 1M order records from the log", configuration: .init(scalingFactor: .mega, maxIterations: 3)) { benchmark in
        let dir = NSTemporaryDirectory() + "stockade-bench-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = Store.Options(shardCount: 1)
        options.journal.fsync = .none
        let store = try! Store(path: dir, options: options)
        _ = await store.engine.execute(.addSku(sku: "hot", total: Limits.stockMax, limit: 0), now: 0)
        for first in stride(from: 0, to: benchmark.scaledIterations.count, by: 1024) {
            _ = await store.engine.execute((first..<first + 1024).map { Command.reserve(user: users[$0 % users.count], lines: lines, requestId: nil, ttlMillis: 60_000) }, now: 0)
        }
        store.close()
        benchmark.startMeasurement()
        let (state, report) = try! Recovery.recover(DataDirectory(dir), options: .init(shardCount: 1, repair: false))
        benchmark.stopMeasurement()
        precondition(report.recordsReplayed == benchmark.scaledIterations.count + 1 && state.shards[0].orderCount == benchmark.scaledIterations.count)
    }
}
