import Testing

@testable import StockadeCore

/// Order ids carry the tag of the term they were placed in, so that a promoted replica that never got
/// the old primary's last orders does not hand their ids to new orders.
@Suite struct OrderTermTagTests {
    let sku: Name = "tv"
    let shardCount = 2
    var shard: Int { Engine.shardIndex(of: sku, shardCount: shardCount) }

    /// The records a replica got from a primary in term 6: a SKU and one order (sequence 1).
    func primaryRecords() -> [Record] {
        [
            .skuAdded(shard: shard, skuIndex: 0, sku: sku, total: 10, limit: 0),
            .epochStarted(epoch: 6),
            .orderCreated(
                .init(
                    id: OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 1), deadlineMillis: 60_000, user: "u-seen",
                    requestId: "", items: [.init(shard: shard, skuIndex: 0, quantity: 1)])),
        ]
    }

    /// The replica promoted in term 900 places an order at sequence 2, the sequence the old primary
    /// gave to an order the replica never got. That lost order's id names nothing on the new primary:
    /// CONFIRM and CANCEL of it do not touch the new order, which its own id reaches.
    @Test func anIdOfALostTermNamesNoOrderAfterAFailover() async throws {
        let log = MemoryChangeLog()
        let engine = Engine(state: EngineState(shardCount: shardCount), log: log, executors: [QueueExecutor(label: "replica")], readOnly: true)
        // The replica logs what it applies (its own log holds the primary's records).
        var copied = RecordBuffer()
        for record in primaryRecords() { copied.append(record) }
        _ = try log.append(copied)
        let (reached, failure) = await engine.applyReplicated(primaryRecords(), at: 0)
        #expect(reached == 3 && failure == nil)
        let lost = OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 2)

        _ = try await engine.startEpoch(900)
        engine.role.setReadOnly(false)
        let reply = await engine.execute(.reserve(user: "u-new", lines: [OrderLine(sku: sku, quantity: 1)], requestId: nil, ttlMillis: nil), now: 1_000)
        guard case let .reserved(placed, _, _) = reply else {
            Issue.record("reserve on the new primary: \(reply)")
            return
        }
        #expect(placed.shard == shard && placed.sequence == 2 && placed.tag == OrderID.tag(ofEpoch: 900))
        #expect(placed != lost)

        #expect(await engine.execute(.order(lost), now: 1_000) == .rejected(.noSuchOrder))
        #expect(await engine.execute(.confirm(lost), now: 1_000) == .rejected(.noSuchOrder))
        #expect(await engine.execute(.cancel(lost), now: 1_000) == .rejected(.noSuchOrder))
        guard case let .order(info) = await engine.execute(.order(placed), now: 1_000) else {
            Issue.record("the new order is not found by its id")
            return
        }
        #expect(info.user == "u-new" && info.state == .pending)
        // The order the replica did get keeps its id from the old term.
        let seen = OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 1)
        guard case let .order(old) = await engine.execute(.order(seen), now: 1_000) else {
            Issue.record("the replicated order is not found by its id")
            return
        }
        #expect(old.user == "u-seen" && old.id == seen)
        // The same sequence under tag 0 (no term) is no order either.
        #expect(await engine.execute(.order(OrderID(shard: shard, sequence: 1)), now: 1_000) == .rejected(.noSuchOrder))
        #expect(await engine.execute(.confirm(placed), now: 1_000) == .orderState(placed, .paid))

        // ORDERS pages past a tagged id by its sequence.
        #expect(await engine.execute(.orders(user: "u-new", after: nil, count: 10), now: 1_000) != .orders([]))
        #expect(await engine.execute(.orders(user: "u-new", after: placed, count: 10), now: 1_000) == .orders([]))
    }

    /// Replay (recovery, a replica) gives every order the id it was logged with, and a snapshot keeps
    /// the tags: the state read back answers by the same ids, and new orders carry the newest term's tag.
    @Test func replayAndSnapshotsKeepTheTags() throws {
        var state = EngineState(shardCount: shardCount)
        for record in primaryRecords() { try state.apply(record) }
        try state.apply(.epochStarted(epoch: 900))
        let tagged = OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 900), sequence: 2)
        try state.apply(
            .orderCreated(
                .init(id: tagged, deadlineMillis: 60_000, user: "u-new", requestId: "r", items: [.init(shard: shard, skuIndex: 0, quantity: 1)])))
        #expect(state.shards[shard].order(tagged)?.user == "u-new")
        #expect(state.shards[shard].order(OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 2)) == nil)

        let image = state.encodeImage()
        var back = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(back.stateHash() == state.stateHash())
        #expect(back.shards[shard].order(tagged)?.user == "u-new")
        #expect(back.shards[shard].order(OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 1))?.user == "u-seen")
        #expect(back.shards[shard].requestIds.map(\.order) == [tagged])
        var log = RecordBuffer()
        let next = back.shards[shard].reserve(user: "u3", lines: [OrderLine(sku: sku, quantity: 1)], requestId: nil, ttlMillis: 1_000, now: 0, log: &log)
        #expect(next == .reserved(OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 900), sequence: 3), deadlineMillis: 1_000, replayed: false))
        // The expiries it logs name each order by its id, whatever its term.
        _ = back.shards[shard].expireDue(now: 100_000, log: &log)
        var logged: [Record] = []
        try log.bytes.withUnsafeBytes { bytes in try Record.decodeAll(bytes) { logged.append($0) } }
        #expect(
            Set(logged.compactMap { if case let .orderExpired(id) = $0 { id } else { nil } })
                == [OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 1), tagged, OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 900), sequence: 3)])
    }

    /// Replay refuses an order whose tag is not its term's, and tag 0 (a build before tags) once the
    /// term's orders carry its tag: a term adds at most two tag runs to a shard.
    @Test func replayRefusesAnOrderWithAnotherTermsTag() throws {
        func created(_ tag: UInt32, _ seq: UInt32) -> Record {
            .orderCreated(
                .init(
                    id: OrderID(shard: shard, tag: tag, sequence: seq), deadlineMillis: 60_000, user: "u", requestId: "",
                    items: [.init(shard: shard, skuIndex: 0, quantity: 1)]))
        }
        var state = EngineState(shardCount: shardCount)
        try state.apply(.skuAdded(shard: shard, skuIndex: 0, sku: sku, total: 10, limit: 0))
        #expect(throws: EngineState.ReplayError.self) { try state.apply(created(5, 1)) }
        try state.apply(.epochStarted(epoch: 6))
        let six = OrderID.tag(ofEpoch: 6)
        #expect(throws: EngineState.ReplayError.self) { try state.apply(created(six + 1, 1)) }
        try state.apply(created(0, 1))
        try state.apply(created(six, 2))
        #expect(throws: EngineState.ReplayError.self) { try state.apply(created(0, 3)) }
        try state.apply(created(six, 3))
        #expect(state.shards[shard].tagRuns == [.init(firstSequence: 2, tag: six)])
        #expect(state.shards[shard].orderCount == 3)
    }

    /// Images of versions 1 and 2 (no tag runs) read as orders of tag 0 with the newest term's tag for
    /// new ones; malformed runs in a version 3 image are refused.
    @Test func imagesWithoutRunsReadAndMalformedRunsAreRefused() throws {
        var state = EngineState(shardCount: shardCount)
        try state.apply(.skuAdded(shard: shard, skuIndex: 0, sku: sku, total: 10, limit: 0))
        try state.apply(.epochStarted(epoch: 6))
        var v2 = state.encodeImage()
        v2.removeLast(4 * shardCount)  // each shard's zero run count
        v2.replaceSubrange(0..<4, with: [2, 0, 0, 0])
        let read = try v2.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(read.stateHash() == state.stateHash() && read.shards.allSatisfy { $0.idTag == OrderID.tag(ofEpoch: 6) })

        try state.apply(
            .orderCreated(
                .init(
                    id: OrderID(shard: shard, tag: OrderID.tag(ofEpoch: 6), sequence: 1), deadlineMillis: 1, user: "u", requestId: "",
                    items: [.init(shard: shard, skuIndex: 0, quantity: 1)])))
        let v3 = state.encodeImage()
        #expect(try v3.withUnsafeBytes { try EngineState.decodeImage($0) }.stateHash() == state.stateHash())
        // The run's first sequence (the shard's 8 bytes of run, then the other shards' counts) past the orders.
        let runOffset = v3.count - 4 * (shardCount - 1 - shard) - 8
        var pastOrders = v3
        pastOrders[runOffset] = 2
        #expect(throws: EngineState.ImageError.self) { try pastOrders.withUnsafeBytes { try EngineState.decodeImage($0) } }
        var tagZero = v3
        tagZero.replaceSubrange((runOffset + 4)..<(runOffset + 8), with: [0, 0, 0, 0])
        #expect(throws: EngineState.ImageError.self) { try tagZero.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }

    @Test func tagsOfEpochsAreInRangeAndZeroOnlyWithoutATerm() {
        #expect(OrderID.tag(ofEpoch: 0) == 0)
        for epoch: UInt64 in [1, 6, UInt64(OrderID.tagMax) - 1, UInt64(OrderID.tagMax), UInt64(OrderID.tagMax) + 1, EpochHistory.epochMax] {
            let tag = OrderID.tag(ofEpoch: epoch)
            #expect(tag >= 1 && tag <= OrderID.tagMax)
            let id = OrderID(shard: 254, tag: tag, sequence: .max)
            #expect(id.shard == 254 && id.tag == tag && id.sequence == .max)
        }
        #expect(OrderID.tag(ofEpoch: 6) != OrderID.tag(ofEpoch: 7))
    }
}
