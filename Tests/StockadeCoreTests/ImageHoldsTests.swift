import Testing
@testable import StockadeCore

/// An image's counts of held stock must be those its orders make: each SKU's reserved units the
/// pending orders' (baskets' items on it included, whichever shard owns the basket), each held-units
/// pair of a limited SKU its user's pending and paid units. Random workloads (limits, baskets across
/// shards, confirms, cancels, expiries, restocks) must always load back; an image whose counts were
/// shifted, with every other check still passing, is refused (before, it loaded, and the next CANCEL
/// or expiry drove a count below zero or let a limit admit more than it allows).
@Suite struct ImageHoldsTests {
    private func randomState(seed: UInt64) async -> EngineState {
        let shards = Int(seed % 3) + 1
        let engine = Engine(state: EngineState(shardCount: shards), log: MemoryChangeLog())
        var workload = RandomWorkload(seed: seed &* 104_729)
        var now: Int64 = 1_000
        for _ in 0..<3_000 {
            now += Int64.random(in: 0...20, using: &workload.rng)
            await engine.expire(now: now)
            workload.observe(await engine.execute(workload.next(), now: now))
        }
        return await engine.captureState(lsn: 0)
    }

    private func decodes(_ state: EngineState) -> Bool {
        (try? state.encodeImage().withUnsafeBytes { try EngineState.decodeImage($0) }) != nil
    }

    @Test(arguments: [1 as UInt64, 2, 3, 4, 5, 6, 7, 8, 9])
    func randomStatesLoadBack(seed: UInt64) async throws {
        let state = await randomState(seed: seed)
        let loaded = try state.encodeImage().withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(loaded.stateHash() == state.stateHash())
    }

    @Test(arguments: [1 as UInt64, 2, 3, 4, 5, 6])
    func shiftedCountsAreRefused(seed: UInt64) async throws {
        let state = await randomState(seed: seed)
        #expect(decodes(state))
        var damages = 0
        // A unit moved from reserved to available: the SKU still adds up.
        if let (shard, sku) = state.shards.indices.lazy.flatMap({ s in state.shards[s].skus.indices.map { (s, $0) } })
            .first(where: { state.shards[$0.0].skus[$0.1].reserved > 0 }) {
            var damaged = state
            damaged.shards[shard].skus[sku].reserved -= 1
            damaged.shards[shard].skus[sku].available += 1
            #expect(!decodes(damaged), "reserved of SKU \(sku) on shard \(shard), seed \(seed)")
            damages += 1
        }
        // A held-units pair one unit off, within its limit (so the range check alone passes).
        for shard in state.shards.indices {
            guard let (pair, units) = state.shards[shard].heldByUserSku.pairs.first else { continue }
            let limit = state.shards[shard].skus[Int(pair & 0xFFFF_FFFF)].limit
            var damaged = state
            damaged.shards[shard].heldByUserSku.set(Int64(units) < limit ? units + 1 : units - 1, for: pair)
            #expect(!decodes(damaged), "held units \(units) of pair \(pair) on shard \(shard), seed \(seed)")
            damages += 1
        }
        #expect(damages > 0, "seed \(seed) left nothing held to damage")
    }
}
