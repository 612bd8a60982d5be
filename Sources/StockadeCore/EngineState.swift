/// The state of every shard at one log position: what recovery rebuilds and snapshots store.
///
/// ``apply(_:)`` replays one logged fact. It checks that the fact fits the state (the SKU and order
/// it names exist, the order is pending) and refuses one that does not, so a log that passed its
/// checksums but does not belong to this state stops recovery instead of corrupting it.
public struct EngineState: Sendable {
    public var shards: [ShardState]
    /// The log position (sequence number of the last record) this state includes.
    public var lsn: UInt64
    /// The primary terms of the log up to ``lsn``.
    public var epochs = EpochHistory()

    public init(shardCount: Int) {
        precondition(shardCount >= 1 && shardCount <= Limits.shardCountMax)
        shards = (0..<shardCount).map { ShardState(shard: $0) }
        lsn = 0
    }

    public init(shards: [ShardState], lsn: UInt64, epochs: EpochHistory = EpochHistory()) {
        precondition(shards.enumerated().allSatisfy { $0.offset == $0.element.shard })
        self.shards = shards
        self.lsn = lsn
        self.epochs = epochs
    }

    /// A replayed fact that does not fit the state it is applied to.
    public struct ReplayError: Error, CustomStringConvertible, Sendable {
        public var reason: String
        public var description: String { reason }
    }

    /// Applies one record and advances ``lsn``.
    public mutating func apply(_ record: Record) throws(ReplayError) {
        switch record {
        case let .skuAdded(shard, skuIndex, sku, total, limit):
            try checkShard(shard)
            guard Int(skuIndex) == shards[shard].skus.count, shards[shard].skuIndexByName[sku] == nil else {
                throw ReplayError(reason: "SKU \(sku) added at index \(skuIndex) out of order")
            }
            // What SKU.ADD's validation allows and no more (found by review: a replica applied a total
            // of -10 from its link, and then wrote snapshots that no start-up would load).
            guard isValidName(sku), Engine.shardIndex(of: sku, shardCount: shards.count) == shard else {
                throw ReplayError(reason: "SKU \(sku) added on shard \(shard): not a name SKU.ADD places there")
            }
            guard total >= 0, total <= Limits.stockMax, limit >= 0, limit <= Limits.quantityMax else {
                throw ReplayError(reason: "SKU \(sku) added with total \(total) and limit \(limit), outside 0 to \(Limits.stockMax) and 0 to \(Limits.quantityMax)")
            }
            shards[shard].applySkuAdded(index: skuIndex, sku: sku, total: total, limit: limit)
        case let .restocked(shard, skuIndex, delta):
            let s = try sku(shard, skuIndex)
            // Bounded first: a delta near Int64's bounds overflowed the sum below and stopped the process
            // (found by review, from a primary's record on a replica, again at every restart).
            guard delta >= -Limits.stockMax, delta <= Limits.stockMax, s.total + delta <= Limits.stockMax else {
                throw ReplayError(reason: "restock of \(delta) on \(s.name) takes its total outside 0 to \(Limits.stockMax)")
            }
            guard s.total + delta >= s.reserved + s.sold else { throw ReplayError(reason: "restock below committed on \(s.name)") }
            shards[shard].applyRestocked(index: skuIndex, delta: delta)
        case let .pausedChanged(shard, skuIndex, paused):
            _ = try sku(shard, skuIndex)
            shards[shard].applyPaused(index: skuIndex, paused: paused)
        case let .deducted(shard, skuIndex, quantity):
            let s = try sku(shard, skuIndex)
            guard quantity > 0, s.available >= quantity else { throw ReplayError(reason: "deduct past available on \(s.name)") }
            shards[shard].applyDeducted(index: skuIndex, quantity: quantity)
        case let .orderCreated(created):
            guard let owner = created.id.shard, owner < shards.count,
                Int(created.id.sequence) == shards[owner].orders.count + 1
            else { throw ReplayError(reason: "order \(created.id) created out of sequence") }
            // Orders of a term carry its tag; logs of builds before tags carry 0 until the term's
            // first tagged order. So a term adds at most two tag runs to a shard.
            let tag = created.id.tag, current = shards[owner].idTag
            guard tag == current || (tag == 0 && shards[owner].tagRuns.last?.tag != current) else {
                throw ReplayError(reason: "order \(created.id) carries tag \(tag) in a term whose orders carry \(current)")
            }
            // What a reservation's validation allows and no more: 1 to 64 items, each SKU once, each
            // quantity 1 to 10^9 (the order slot's and the basket store's bounds).
            guard !created.items.isEmpty, created.items.count <= Limits.itemsPerOrderMax else {
                throw ReplayError(reason: "order \(created.id) has \(created.items.count) items, not 1 to \(Limits.itemsPerOrderMax)")
            }
            // A user id RESERVE accepts, the shard of the first SKU as owner (where the engine places
            // an order), and a deadline a clock and a TTL make (found by review: a replica applied an
            // empty user id, and deadlines of -2^63 and 2^63-1).
            guard isValidName(created.user) else { throw ReplayError(reason: "order \(created.id) has user id \(created.user): not 1 to \(Limits.nameBytesMax) bytes") }
            guard created.items[0].shard == owner else {
                throw ReplayError(reason: "order \(created.id) is owned by shard \(owner), not by its first SKU's shard \(created.items[0].shard)")
            }
            guard created.deadlineMillis >= 0, created.deadlineMillis <= Limits.deadlineMillisMax else {
                throw ReplayError(reason: "order \(created.id) has deadline \(created.deadlineMillis), outside 0 to \(Limits.deadlineMillisMax)")
            }
            var names: [Name] = []
            names.reserveCapacity(created.items.count)
            for (position, item) in created.items.enumerated() {
                let s = try sku(item.shard, item.skuIndex)
                guard item.quantity > 0, Int64(item.quantity) <= Limits.quantityMax else {
                    throw ReplayError(reason: "order \(created.id) holds \(item.quantity) units of \(s.name), outside 1 to \(Limits.quantityMax)")
                }
                guard s.available >= Int64(item.quantity) else {
                    throw ReplayError(reason: "order \(created.id) holds more than available on \(s.name)")
                }
                guard !created.items[..<position].contains(where: { $0.shard == item.shard && $0.skuIndex == item.skuIndex }) else {
                    throw ReplayError(reason: "order \(created.id) names SKU \(s.name) twice")
                }
                // Within the SKU's per-user limit, as RESERVE checks it (``ShardState/check(index:quantity:knownUser:)``):
                // the image of a user past it does not load.
                if s.limit > 0 {
                    let held = shards[item.shard].userIndexByName[created.user].map {
                        Int64(shards[item.shard].heldByUserSku[ShardState.key($0, item.skuIndex)])
                    } ?? 0
                    guard held + Int64(item.quantity) <= s.limit else {
                        throw ReplayError(reason: "order \(created.id) takes user \(created.user) past the limit \(s.limit) of \(s.name) (holds \(held))")
                    }
                }
                names.append(s.name)
            }
            for item in created.items {
                shards[item.shard].applyHold(user: created.user, index: item.skuIndex, quantity: Int64(item.quantity))
            }
            shards[owner].storeOrder(created, skus: names)
        case let .orderPaid(id): try transition(id, to: .paid)
        case let .orderCancelled(id): try transition(id, to: .cancelled)
        case let .orderExpired(id): try transition(id, to: .expired)
        case let .epochStarted(epoch):
            guard epoch > epochs.lastEpoch, epoch <= EpochHistory.epochMax else {
                throw ReplayError(reason: "epoch \(epoch) started after epoch \(epochs.lastEpoch): epochs only grow, up to \(EpochHistory.epochMax)")
            }
            epochs.append(EpochHistory.Term(epoch: epoch, start: lsn + 1))
            for shard in shards.indices { shards[shard].idTag = OrderID.tag(ofEpoch: epoch) }
        }
        lsn += 1
    }

    private func checkShard(_ shard: Int) throws(ReplayError) {
        guard shard >= 0, shard < shards.count else { throw ReplayError(reason: "record names shard \(shard) of \(shards.count)") }
    }

    private func sku(_ shard: Int, _ index: UInt32) throws(ReplayError) -> ShardState.Sku {
        try checkShard(shard)
        guard Int(index) < shards[shard].skus.count else { throw ReplayError(reason: "record names unknown SKU \(shard)/\(index)") }
        return shards[shard].skus[Int(index)]
    }

    private mutating func transition(_ id: OrderID, to state: OrderState) throws(ReplayError) {
        guard let owner = id.shard, owner < shards.count, let seq = shards[owner].localSequence(id) else {
            throw ReplayError(reason: "record names unknown order \(id)")
        }
        guard shards[owner].orders[Int(seq) - 1].state == .pending else {
            throw ReplayError(reason: "order \(id) is not pending")
        }
        for effect in shards[owner].applyTransition(seq: seq, to: state) {
            try checkShard(effect.shard)
            shards[effect.shard].apply(effect)
        }
    }
}
