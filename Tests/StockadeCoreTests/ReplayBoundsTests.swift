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

    /// Order records no RESERVE or BUY makes (found by review on a replica, from a primary's records
    /// with valid checksums): a user past a SKU's limit (its image then does not load), an empty
    /// user id, deadlines of -2^63 and 2^63-1, an order owned by another shard than its first SKU's.
    @Test(arguments: ["past the limit", "empty user", "deadline Int64.min", "deadline Int64.max", "deadline -1", "owner not the first SKU's shard"])
    func replayRefusesOrderRecordsNoCommandMakes(damage: String) throws {
        var state = EngineState(shardCount: 2)
        let a = Self.name(on: 0), b = Self.name(on: 1)
        try state.apply(.skuAdded(shard: 0, skuIndex: 0, sku: a, total: 100, limit: 3))
        try state.apply(.skuAdded(shard: 1, skuIndex: 0, sku: b, total: 100, limit: 0))
        func order(_ sequence: UInt32, owner: Int = 0, user: Name = "u2", deadline: Int64 = 600_000, _ items: [Record.Item]) -> Record {
            .orderCreated(Record.OrderCreated(id: OrderID(shard: owner, sequence: sequence), deadlineMillis: deadline, user: user, requestId: Name(""), items: items))
        }
        let three = Record.Item(shard: 0, skuIndex: 0, quantity: 3)
        let one = Record.Item(shard: 0, skuIndex: 0, quantity: 1)
        let other = Record.Item(shard: 1, skuIndex: 0, quantity: 1)
        try state.apply(order(1, [three]))  // u2 at the limit of a
        let before = state.stateHash()
        let record: Record
        switch damage {
        case "past the limit": record = order(2, [one, other])  // one more of a, in a basket
        case "empty user": record = order(2, user: Name(""), [one])
        case "deadline Int64.min": record = order(2, user: "u3", deadline: .min, [one])
        case "deadline Int64.max": record = order(2, user: "u3", deadline: .max, [one])
        case "deadline -1": record = order(2, user: "u3", deadline: -1, [one])
        default: record = order(1, owner: 1, user: "u3", [one, other])  // owned by b's shard, a first
        }
        #expect(throws: EngineState.ReplayError.self) { try state.apply(record) }
        #expect(state.stateHash() == before)
        // The same user on a SKU without a limit, and another user up to a's limit, still replay.
        try state.apply(order(1, owner: 1, [other]))
        try state.apply(order(2, user: "u3", deadline: Limits.deadlineMillisMax, [three]))
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
