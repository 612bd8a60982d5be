import Testing
@testable import StockadeCore

/// Replay (recovery, and a replica applying its primary's records) takes only SKU records that SKU.ADD
/// and SKU.RESTOCK could have written. Review fed a replica records with valid checksums that no client
/// could cause: a restock of 2^63-1 overflowed and stopped the process at every start, and a total of
/// -10 was applied, after which the replica wrote snapshots no start-up would load.
@Suite struct ReplayBoundsTests {
    /// A name that the two-shard engine places on `shard`.
    private static func name(on shard: Int) -> Name {
        for i in 0..<256 {
            let name = Name("sku-\(i)")
            if Engine.shardIndex(of: name, shardCount: 2) == shard { return name }
        }
        preconditionFailure("no name on shard \(shard)")
    }

    @Test(arguments: [
        "restock Int64.max", "restock Int64.min", "restock past the bound", "restock 2^62",
        "total -10", "total 2^62", "limit -1", "limit past the bound", "empty name", "name on the other shard",
    ])
    func replayRefusesSkuRecordsNoCommandMakes(damage: String) throws {
        var state = EngineState(shardCount: 2)
        let a = Self.name(on: 0)
        try state.apply(.skuAdded(shard: 0, skuIndex: 0, sku: a, total: 10, limit: 0))
        let before = state.stateHash()
        let records: [Record]
        switch damage {
        case "restock Int64.max": records = [.restocked(shard: 0, skuIndex: 0, delta: .max)]
        case "restock Int64.min": records = [.restocked(shard: 0, skuIndex: 0, delta: .min)]
        case "restock past the bound": records = [.restocked(shard: 0, skuIndex: 0, delta: Limits.stockMax)]
        case "restock 2^62": records = [.restocked(shard: 0, skuIndex: 0, delta: 1 << 62)]
        case "total -10": records = [.skuAdded(shard: 1, skuIndex: 0, sku: Self.name(on: 1), total: -10, limit: 0)]
        case "total 2^62": records = [.skuAdded(shard: 1, skuIndex: 0, sku: Self.name(on: 1), total: 1 << 62, limit: 0)]
        case "limit -1": records = [.skuAdded(shard: 1, skuIndex: 0, sku: Self.name(on: 1), total: 5, limit: -1)]
        case "limit past the bound":
            records = [.skuAdded(shard: 1, skuIndex: 0, sku: Self.name(on: 1), total: 5, limit: Limits.quantityMax + 1)]
        case "empty name": records = [.skuAdded(shard: 0, skuIndex: 1, sku: Name(""), total: 5, limit: 0)]
        default: records = [.skuAdded(shard: 1, skuIndex: 0, sku: a, total: 5, limit: 0)]  // a is shard 0's
        }
        for record in records {
            #expect(throws: EngineState.ReplayError.self) { try state.apply(record) }
        }
        #expect(state.stateHash() == before)
    }

    /// What the commands allow still replays: a total at the bound, a restock back down to what is
    /// committed, a limit at its bound.
    @Test func replayTakesSkuRecordsAtTheBounds() throws {
        var state = EngineState(shardCount: 2)
        try state.apply(.skuAdded(shard: 0, skuIndex: 0, sku: Self.name(on: 0), total: Limits.stockMax, limit: Limits.quantityMax))
        try state.apply(.restocked(shard: 0, skuIndex: 0, delta: -Limits.stockMax))
        try state.apply(.restocked(shard: 0, skuIndex: 0, delta: Limits.stockMax))
        try state.apply(.skuAdded(shard: 1, skuIndex: 0, sku: Self.name(on: 1), total: 0, limit: 0))
        #expect(state.shards[0].skus[0].total == Limits.stockMax)
    }
}
