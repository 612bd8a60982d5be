import Synchronization
import ArgumentParser
import CJemalloc
import Foundation
import StockadeCore
import StockadeJournal
import StockadeServer

/// Measurements that are not throughput loops: memory per order and start-up time with a large state.
/// The figures in BENCHMARKS.md come from these commands (release build).
struct Measure: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure memory per live order, or start-up time with a large snapshot + log.",
        subcommands: [Memory.self, Startup.self, EngineThroughput.self])

    struct Memory: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Bytes of heap per live (pending) order, from jemalloc's own count.")

        @Option(help: "Orders to create.")
        var orders = 1_000_000

        @Option(help: "Distinct users placing them (each user also costs memory).")
        var users = 100_000

        @Option(help: "Distinct SKUs.")
        var skus = 100

        @Option(help: "Per-user limit of every SKU (0: none). A limit costs a counter per (user, SKU).")
        var limit: Int64 = 0

        func run() throws {
            let userNames = (0..<users).map { Name("user-\($0)") }
            let skuNames = (0..<skus).map { Name("sku-\($0)") }
            var log = RecordBuffer(capacity: 1 << 20)
            let before = allocatedBytes()
            var state = ShardState(shard: 0)
            for sku in skuNames { _ = state.addSku(sku, total: Limits.stockMax, limit: limit, log: &log) }
            var lines = [OrderLine(sku: skuNames[0], quantity: 1)]
            for i in 0..<orders {
                lines[0].sku = skuNames[i % skus]
                let reply = state.reserve(user: userNames[i % users], lines: lines, requestId: nil, ttlMillis: 600_000, now: 0, log: &log)
                guard case .reserved = reply else { fatalError("reserve failed: \(reply)") }
                if log.bytes.count > 1 << 20 { log.removeAll() }
            }
            log = RecordBuffer(capacity: 0)
            let after = allocatedBytes()
            let perOrder = Double(after - before) / Double(orders)
            print(String(format: "%d pending orders, %d users, %d SKUs, limit %lld: %.1f MiB heap, %.1f bytes per order (users' ids, indexes and limits included)",
                         orders, users, skus, limit, Double(after - before) / 1_048_576, perOrder))
            withExtendedLifetime(state) {}
        }
    }

    struct Startup: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Build a data directory with N orders in a snapshot and a log tail, then time recovery.")

        @Option(help: "Data directory to build (it is removed first).")
        var dataDir = "/tmp/stockade-startup"

        @Option(help: "Orders in the snapshot.")
        var orders = 10_000_000

        @Option(help: "Orders in the log after the snapshot.")
        var tail = 1_000_000

        @Option(help: "Shards.")
        var shards = 2

        func run() async throws {
            try? FileManager.default.removeItem(atPath: dataDir)
            var options = Store.Options(shardCount: shards)
            options.journal.fsync = .none
            let store = try Store(path: dataDir, options: options)
            let skus = (0..<64).map { Name("sku-\($0)") }
            _ = await store.engine.execute(skus.map { .addSku(sku: $0, total: Limits.stockMax, limit: 0) }, now: 0)
            func place(_ count: Int, offset: Int) async {
                for first in stride(from: 0, to: count, by: 4096) {
                    let commands = (first..<min(count, first + 4096)).map { i in
                        Command.reserve(user: Name("user-\((offset + i) % 1_000_000)"), lines: [OrderLine(sku: skus[i % skus.count], quantity: 1)],
                                        requestId: nil, ttlMillis: Limits.ttlMillisMax)
                    }
                    _ = await store.engine.execute(commands, now: 0)
                }
            }
            var started = monotonicNanos()
            await place(orders, offset: 0)
            log(String(format: "placed %d orders in %.1f s", orders, Double(monotonicNanos() - started) / 1e9))
            started = monotonicNanos()
            let snapshot = try await store.snapshot()
            log("\(snapshot)")
            await place(tail, offset: orders)
            store.close()
            started = monotonicNanos()
            let reopened = try Store(path: dataDir, options: options)
            let seconds = Double(monotonicNanos() - started) / 1e9
            reopened.close()
            print(String(format: "start-up with %d orders in the snapshot and %d in the log: %.2f s (%@)", orders, tail, seconds, reopened.recovery.description))
        }
    }
}

/// Reservations per second through the engine (actor shards, batches), with or without the journal.
struct EngineThroughput: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine", abstract: "Reservations per second through the engine: concurrent clients sending batches.")

    @Option(help: "Shards.")
    var shards = 2

    @Option(help: "Concurrent clients (tasks).")
    var clients = 8

    @Option(help: "Commands per batch (a client's pipeline).")
    var batch = 64

    @Option(help: "Reservations in all.")
    var requests = 2_000_000

    @Option(help: "Journal: off, or a data directory (fsync always) that is removed first.")
    var journal = "off"

    @Flag(help: "Take snapshots back to back while the load runs (needs a journal): shows what they cost the shards.")
    var snapshots = false

    func run() async throws {
        let engine: Engine
        var store: Store?
        if journal == "off" {
            engine = Engine(state: EngineState(shardCount: shards), log: MemoryChangeLog())
        } else {
            try? FileManager.default.removeItem(atPath: journal)
            store = try Store(path: journal, options: Store.Options(shardCount: shards))
            engine = store!.engine
        }
        let skus = (0..<16).map { Name("sku-\($0)") }
        _ = await engine.execute(skus.map { .addSku(sku: $0, total: Limits.stockMax, limit: 0) }, now: 0)
        let perClient = requests / clients / batch
        let clients = clients, batch = batch
        // Users are long enough (over 15 bytes) to be heap strings: what real ids look like.
        let started = monotonicNanos()
        let loadDone = ManagedFlag()
        let snapshotter = Task { [store, snapshots] () -> Int in
            guard snapshots, let store else { return 0 }
            var taken = 0
            while !loadDone.isSet {
                _ = try? await store.snapshot()
                taken += 1
            }
            return taken
        }
        let latencies = await withTaskGroup(of: [UInt64].self) { group in
            for client in 0..<clients {
                group.addTask {
                    let commands = (0..<batch).map { k in
                        Command.reserve(user: Name("c\(client)-\(k)"), lines: [OrderLine(sku: skus[(client * batch + k) % skus.count], quantity: 1)],
                                        requestId: nil, ttlMillis: Limits.ttlMillisMax)
                    }
                    var mine: [UInt64] = []
                    mine.reserveCapacity(perClient)
                    for _ in 0..<perClient {
                        let sent = monotonicNanos()
                        _ = await engine.execute(commands, now: 0)
                        mine.append(monotonicNanos() - sent)
                    }
                    return mine
                }
            }
            return await group.reduce(into: []) { $0 += $1 }.sorted()
        }
        loadDone.set()
        let snapshotsTaken = await snapshotter.value
        let seconds = Double(monotonicNanos() - started) / 1e9
        let done = perClient * clients * batch
        print(String(format: "%d reservations, %d clients x batches of %d, %d shards, journal %@%@: %.2f s, %.0f reservations/s",
                     done, clients, batch, shards, journal == "off" ? "off" : "fsync always",
                     snapshots ? ", \(snapshotsTaken) snapshots during the run" : "", seconds, Double(done) / seconds))
        func ms(_ q: Double) -> Double { Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * q))]) / 1e6 }
        print(String(format: "batch latency: p50 %.2f ms, p99 %.2f ms, max %.2f ms", ms(0.5), ms(0.99), Double(latencies.last ?? 0) / 1e6))
        if let store {
            let stats = store.journal.statistics
            print(String(format: "journal: %d records in %d batches (%.0f records per fdatasync), fdatasync mean %.2f ms, max %.2f ms",
                         stats.records, stats.batches, Double(stats.records) / Double(max(1, stats.syncs)),
                         Double(stats.syncNanosTotal) / Double(max(1, stats.syncs)) / 1e6, Double(stats.syncNanosMax) / 1e6))
            store.close()
            try? FileManager.default.removeItem(atPath: journal)
        }
    }
}

/// A flag one task sets and others poll.
final class ManagedFlag: Sendable {
    private let flag = Mutex(false)
    var isSet: Bool { flag.withLock { $0 } }
    func set() { flag.withLock { $0 = true } }
}
