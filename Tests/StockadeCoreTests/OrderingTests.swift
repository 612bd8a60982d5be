import Testing
@testable import StockadeCore
import StockadeSimulator

/// A client's commands take effect in the order sent, also when one read carries commands for several
/// shards whose effects interact (#7 B6, B7). Each scenario below failed on the engine that grouped a
/// whole read by shard and decided the sold-out fast path before running anything.
@Suite struct OrderingTests {
    /// The first of `candidates` that lives on `shard` of `count`.
    static func sku(on shard: Int, of count: Int, prefix: String) -> Name {
        (0..<1000).lazy.map { Name("\(prefix)\($0)") }.first { Engine.shardIndex(of: $0, shardCount: count) == shard }!
    }

    let a = sku(on: 0, of: 2, prefix: "a")
    let b = sku(on: 1, of: 2, prefix: "b")

    private func basket(_ engine: Engine, user: Name, _ skus: [Name]) async -> OrderID {
        let reply = await engine.execute(
            .reserve(user: user, lines: skus.map { OrderLine(sku: $0, quantity: 1) }, requestId: nil, ttlMillis: nil), now: 0)
        guard case .reserved(let id, _, _) = reply else { preconditionFailure("basket refused: \(reply)") }
        return id
    }

    @Test func cancelOfAForeignBasketIsSeenByLaterCommandsOfTheSameRead() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 1, limit: 0), .addSku(sku: b, total: 1, limit: 0)], now: 0)
        // Owned by b's shard (1), holding the only unit of a on shard 0.
        let order = await basket(engine, user: "carol", [b, a])
        #expect(order.shard == 1)
        let replies = await engine.execute([
            .cancel(order), .stock(sku: a),
            .reserve(user: "carol", lines: [OrderLine(sku: a, quantity: 1)], requestId: "k1", ttlMillis: nil),
        ], now: 1)
        #expect(replies[0] == .orderState(order, .cancelled))
        #expect(replies[1] == .stock(SkuInfo(sku: a, total: 1, available: 1, reserved: 0, sold: 0, limit: 0, paused: false)))
        guard case .reserved = replies[2] else { Issue.record("reserve after the cancel: \(replies[2])"); return }
    }

    @Test func reserveSentBeforeACancelDoesNotTakeWhatTheCancelReleases() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 1, limit: 0), .addSku(sku: b, total: 1, limit: 0)], now: 0)
        // Owned by a's shard (0), holding the only unit of b on shard 1.
        let order = await basket(engine, user: "carol", [a, b])
        #expect(order.shard == 0)
        let replies = await engine.execute([
            .reserve(user: "dave", lines: [OrderLine(sku: b, quantity: 1)], requestId: "k2", ttlMillis: nil),
            .cancel(order),
        ], now: 1)
        #expect(replies[0] == .rejected(.soldOut))
        #expect(replies[1] == .orderState(order, .cancelled))
        #expect(engine.available(b) == 1)
    }

    @Test func soldOutFastPathAnswersOnlyWhatTheCommandGetsInOrder() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute(.addSku(sku: "p", total: 0, limit: 0), now: 0)
        let replies = await engine.execute([
            .restock(sku: "p", delta: 5),
            .reserve(user: "alice", lines: [OrderLine(sku: "p", quantity: 1)], requestId: nil, ttlMillis: nil),
        ], now: 1)
        #expect(replies[0] == .stock(SkuInfo(sku: "p", total: 5, available: 5, reserved: 0, sold: 0, limit: 0, paused: false)))
        guard case .reserved = replies[1] else { Issue.record("reserve after restock: \(replies[1])"); return }

        // The same with a cancel of a single-SKU order on the SKU's own shard, and with a basket's cancel.
        _ = await engine.execute(.addSku(sku: "q", total: 1, limit: 0), now: 0)
        guard case .reserved(let held, _, _) = await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: "q", quantity: 1)], requestId: nil, ttlMillis: nil), now: 0)
        else { Issue.record("no hold"); return }
        let after = await engine.execute([
            .cancel(held), .reserve(user: "alice", lines: [OrderLine(sku: "q", quantity: 1)], requestId: nil, ttlMillis: nil),
        ], now: 2)
        guard case .reserved = after[1] else { Issue.record("reserve after cancel: \(after[1])"); return }
    }

    @Test func aBasketDueAtNowIsExpiredBeforeAnyCommandSeesItsStock() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 1, limit: 0), .addSku(sku: b, total: 1, limit: 0)], now: 0)
        // Owned by shard 1, holding a on shard 0, due at 100.
        _ = await engine.execute(
            .reserve(user: "carol", lines: [OrderLine(sku: b, quantity: 1), OrderLine(sku: a, quantity: 1)], requestId: nil,
                     ttlMillis: 100), now: 0)
        #expect(engine.available(a) == 0)
        // Nothing ran on shard 1 since; a reservation of a at the deadline gets the returned unit.
        let reply = await engine.execute(.reserve(user: "dave", lines: [OrderLine(sku: a, quantity: 1)], requestId: nil, ttlMillis: nil), now: 100)
        guard case .reserved = reply else { Issue.record("reserve at the basket's deadline: \(reply)"); return }
    }

    /// Random pipelined batches against the sequential reference model: the batch must give the replies
    /// that running its commands one by one gives, and orders due at `now` count as expired.
    @Test(arguments: Array((1 as UInt64)...12))
    func pipelinedBatchesMatchTheSequentialModel(seed: UInt64) async {
        let shards = Int(seed % 3) + 2
        let engine = Engine(state: EngineState(shardCount: shards), log: MemoryChangeLog())
        var model = ReferenceModel(shardCount: shards)
        var workload = RandomWorkload(seed: seed &* 7919)
        var now: Int64 = 1_000
        var step = 0
        while step < 3_000 {
            now += Int64.random(in: 0...30, using: &workload.rng)
            let size = Int.random(in: 1...16, using: &workload.rng)
            let batch = (0..<size).map { _ in workload.next() }
            let got = await engine.execute(batch, now: now)
            model.expire(now: now)
            for (i, command) in batch.enumerated() {
                let want = model.apply(command, now: now)
                workload.observe(got[i])
                if got[i] != want {
                    Issue.record("seed \(seed) step \(step + i) (batch of \(size), #\(i)): \(command): got \(got[i]), want \(want)")
                    return
                }
            }
            step += size
        }
    }
}
