import Benchmark
import CJemalloc
import Foundation
import NIOCore
import StockadeServer
import StockadeWire
import StockadeCore
import StockadeJournal

/// Hot paths of the engine and the journal. Run: `swift package benchmark` (or `make bench`).
/// Throughput is per scaled iteration: one iteration of a `.mega` benchmark is 1M operations.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .peakMemoryResident], warmupIterations: 1, maxDuration: .seconds(10),
        maxIterations: 5)

    let recordsPerSync = BenchmarkMetric.custom("records per fdatasync", polarity: .prefersLarger, useScalingFactor: false)
    let recordsPerSecond = BenchmarkMetric.custom("records per second", polarity: .prefersLarger, useScalingFactor: false)
    let users = (0..<100_000).map { Name("user-\($0)") }
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

    Benchmark(
        "Journal: group commit, fdatasync always, 32 writers x 16 records",
        configuration: .init(metrics: [.wallClock, recordsPerSecond, recordsPerSync], scalingFactor: .one, maxIterations: 5)
    ) { benchmark in
        let dir = NSTemporaryDirectory() + "stockade-bench-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let journal = try! Journal(directory: DataDirectory(dir), shardCount: 1, lsn: 0)
        var records = RecordBuffer()
        for i in 0..<16 {
            records.orderCreated(id: OrderID(shard: 0, sequence: UInt32(i + 1)), deadlineMillis: 0, user: users[i], requestId: nil, shard: 0, skuIndex: 0, quantity: 1)
        }
        let batch = records
        let batchesPerWriter = 20_000 / 32  // 320,000 records per run
        let started = monotonicNanos()
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
        let elapsed = monotonicNanos() - started
        let stats = journal.statistics
        benchmark.measurement(recordsPerSync, stats.records / max(1, stats.syncs))
        benchmark.measurement(recordsPerSecond, Int(Double(stats.records) / (Double(elapsed) / 1e9)))
        journal.close()
    }

    Benchmark("Recovery: replay 1M order records from the log", configuration: .init(scalingFactor: .mega, maxIterations: 3)) { benchmark in
        let dir = NSTemporaryDirectory() + "stockade-bench-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The log a shard would write for 1M reservations, written straight through the journal.
        var options = Journal.Options()
        options.fsync = .none
        let journal = try! Journal(directory: DataDirectory(dir), shardCount: 1, lsn: 0, options: options)
        var state = ShardState(shard: 0)
        var log = RecordBuffer(capacity: 1 << 20)
        _ = state.addSku("hot", total: Limits.stockMax, limit: 0, log: &log)
        for i in benchmark.scaledIterations {
            _ = state.reserve(user: users[i % users.count], lines: lines, requestId: nil, ttlMillis: 60_000, now: 0, log: &log)
            if log.count >= 4096 {
                _ = try! journal.append(log)
                log.removeAll()
            }
        }
        if !log.isEmpty { _ = try! journal.append(log) }
        journal.close()
        benchmark.startMeasurement()
        let (recovered, report) = try! Recovery.recover(DataDirectory(dir), options: .init(shardCount: 1, repair: false))
        benchmark.stopMeasurement()
        precondition(report.recordsReplayed == benchmark.scaledIterations.count + 1 && recovered.shards[0].orderCount == benchmark.scaledIterations.count)
    }

    // The front's per-read work: one read of 64 pipelined RESERVE commands, parsed; 64 replies encoded.
    let pipelined: ByteBuffer = {
        var buffer = ByteBufferAllocator().buffer(capacity: 8192)
        for i in 0..<64 {
            let words = ["RESERVE", "user:\(100_000 + i)", "sku-42", "1"]
            buffer.writeRESPArrayHeader(words.count)
            for word in words { buffer.writeRESPBulk(word) }
        }
        return buffer
    }()

    Benchmark("RESP: parse a read of 64 pipelined RESERVE commands (per command)", configuration: .init(scalingFactor: .mega)) { benchmark in
        var parser = RESPParser()
        for _ in 0..<(benchmark.scaledIterations.count / 64) {
            var buffer = pipelined
            while case .command(let args)? = try? parser.next(&buffer) { blackHole(args) }
        }
    }

    // The server's way: a read of 16 pipelined commands (one redis-benchmark client at -P 16), each
    // read whole in one pass and handed over as raw bytes (`RESPParser.next(_:_:)`).
    func pipeline(_ words: [String]) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: 1024)
        for _ in 0..<16 {
            buffer.writeRESPArrayHeader(words.count)
            for word in words { buffer.writeRESPBulk(word) }
        }
        return buffer
    }
    for (name, words) in [("PING", ["PING"]), ("DEDUCT", ["DEDUCT", "so", "1"]), ("RESERVE", ["RESERVE", "user:000000000017", "rb", "1", "TTL", "600000"])] {
        let read = pipeline(words)
        Benchmark("RESP: read 16 pipelined \(name) in one pass each (per command)", configuration: .init(scalingFactor: .mega)) { benchmark in
            var parser = RESPParser()
            var arguments = 0
            for _ in 0..<(benchmark.scaledIterations.count / 16) {
                var buffer = read
                while (try? parser.next(&buffer, { arguments &+= $0.count })) == true {}
            }
            blackHole(arguments)
        }
    }

    Benchmark("RESP: encode 64 RESERVE replies into one buffer (per reply)", configuration: .init(scalingFactor: .mega)) { benchmark in
        let replies = (0..<64).map { Reply.reserved(OrderID(shard: 1, sequence: UInt32($0 + 1)), deadlineMillis: 0, replayed: false) }
        var out = ByteBufferAllocator().buffer(capacity: 64 * 32)
        for _ in 0..<(benchmark.scaledIterations.count / 64) {
            out.clear()
            for reply in replies { ReplyEncoding.write(reply, into: &out) }
            blackHole(out.readableBytes)
        }
    }
}
