import StockadeCore

/// A deliberately simple model of the engine's rules: dictionaries, no shards, no indexes, commands
/// applied one by one. The engine must give the same reply to every command, whatever batches and
/// shards it runs them in.
///
/// Ids are keyed and compared here by their bytes (`[UInt8]`), not by `Name`'s own equality and
/// hashing: a defect there (two ids taken for one) must show as a difference from the engine, not be
/// repeated by the model.
package struct ReferenceModel: Sendable {
    package struct Sku: Sendable {
        var total: Int64, available: Int64, reserved: Int64, sold: Int64, limit: Int64, paused: Bool
        /// When it was added, among every SKU: on its shard, the order AUDIT reports SKUs in.
        var added = 0
    }
    package struct Order: Sendable {
        var user: Name, lines: [OrderLine], state: OrderState, deadline: Int64
    }

    package let shardCount: Int
    package var skus: [[UInt8]: Sku] = [:]
    /// SKUs added so far (``Sku/added``).
    var skusAdded = 0
    package var orders: [OrderID: Order] = [:]
    var nextSequence: [UInt32]
    /// The tag new orders' ids carry: that of the newest term (``OrderID/tag(ofEpoch:)``).
    var idTag: UInt32 = 0
    var held: [HeldKey: Int64] = [:]
    var requests: [RequestKey: OrderID] = [:]
    struct HeldKey: Hashable {
        var user: [UInt8], sku: [UInt8]
        init(user: Name, sku: Name) { (self.user, self.sku) = (user.bytes, sku.bytes) }
    }
    struct RequestKey: Hashable {
        var user: [UInt8], requestId: [UInt8], shard: Int
        init(user: Name, requestId: Name, shard: Int) { (self.user, self.requestId, self.shard) = (user.bytes, requestId.bytes, shard) }
    }

    /// Whether two orders' lines are the same, SKUs compared by their bytes.
    /// The same SKUs (as bytes) with the same quantities, listed in any order.
    static func sameLines(_ a: [OrderLine], _ b: [OrderLine]) -> Bool {
        func items(_ lines: [OrderLine]) -> [([UInt8], Int64)] {
            lines.map { ($0.sku.bytes, $0.quantity) }.sorted { $0.0.lexicographicallyPrecedes($1.0) }
        }
        return a.count == b.count && zip(items(a), items(b)).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    }

    package init(shardCount: Int) {
        self.shardCount = shardCount
        nextSequence = Array(repeating: 1, count: shardCount)
    }

    /// The model of a state the engine recovered: what a restarted process goes on from.
    package init(from state: EngineState) {
        self.init(shardCount: state.shards.count)
        idTag = OrderID.tag(ofEpoch: state.epochs.lastEpoch)
        for shard in state.shards {
            for info in shard.allSkus {
                skus[info.sku.bytes] = Sku(
                    total: info.total, available: info.available, reserved: info.reserved, sold: info.sold, limit: info.limit,
                    paused: info.paused, added: skusAdded)
                skusAdded += 1
            }
        }
        for shard in state.shards {
            let all = shard.allOrders
            nextSequence[shard.shard] = UInt32(all.count + 1)
            for info in all {
                orders[info.id] = Order(user: info.user, lines: info.lines, state: info.state, deadline: info.deadlineMillis)
                guard info.state == .pending || info.state == .paid else { continue }
                for line in info.lines where skus[line.sku.bytes]!.limit > 0 {
                    held[HeldKey(user: info.user, sku: line.sku), default: 0] += line.quantity
                }
            }
            for (user, requestId, order) in shard.requestIds {
                requests[RequestKey(user: user, requestId: requestId, shard: shard.shard)] = order
            }
        }
    }

    /// A term started (a promotion): orders placed from now on carry its tag.
    package mutating func startTerm(epoch: UInt64) { idTag = OrderID.tag(ofEpoch: epoch) }

    package func shard(_ sku: Name) -> Int { Engine.shardIndex(of: sku, shardCount: shardCount) }

    package func info(_ name: Name) -> SkuInfo {
        let s = skus[name.bytes]!
        return SkuInfo(sku: name, total: s.total, available: s.available, reserved: s.reserved, sold: s.sold, limit: s.limit, paused: s.paused)
    }

    /// Expires every pending order due at `now`, as the engine does before any command at `now`.
    package mutating func expire(now: Int64) {
        for (id, order) in orders where order.state == .pending && order.deadline <= now { finish(id, .expired) }
    }

    mutating func finish(_ id: OrderID, _ state: OrderState) {
        let order = orders[id]!
        orders[id]!.state = state
        for line in order.lines {
            if state == .paid {
                skus[line.sku.bytes]!.reserved -= line.quantity
                skus[line.sku.bytes]!.sold += line.quantity
            } else {
                skus[line.sku.bytes]!.reserved -= line.quantity
                skus[line.sku.bytes]!.available += line.quantity
                if skus[line.sku.bytes]!.limit > 0 { held[HeldKey(user: order.user, sku: line.sku), default: 0] -= line.quantity }
            }
        }
    }

    /// The reply the engine must give to `command` at `now`, and its change to the model.
    package mutating func apply(_ command: Command, now: Int64) -> Reply {
        switch command {
        case let .addSku(sku, total, limit):
            if skus[sku.bytes] != nil { return .rejected(.skuExists) }
            skus[sku.bytes] = Sku(total: total, available: total, reserved: 0, sold: 0, limit: limit, paused: false, added: skusAdded)
            skusAdded += 1
            return .done
        case let .restock(sku, delta):
            guard var s = skus[sku.bytes] else { return .rejected(.noSuchSku) }
            if s.total + delta < s.reserved + s.sold { return .rejected(.belowCommitted(committed: s.reserved + s.sold)) }
            s.total += delta
            s.available += delta
            skus[sku.bytes] = s
            return .stock(info(sku))
        case let .setPaused(sku, paused):
            guard skus[sku.bytes] != nil else { return .rejected(.noSuchSku) }
            skus[sku.bytes]!.paused = paused
            return .done
        case let .stock(sku):
            return skus[sku.bytes] == nil ? .rejected(.noSuchSku) : .stock(info(sku))
        case let .deduct(sku, quantity):
            if quantity < 1 { return .rejected(.badQuantity) }
            guard let s = skus[sku.bytes] else { return .deducted(-1) }
            if s.paused || s.available < quantity { return .deducted(0) }
            skus[sku.bytes]!.available -= quantity
            skus[sku.bytes]!.sold += quantity
            return .deducted(1)
        case let .reserve(user, lines, requestId, ttl):
            if let rejection = ShardState.validateReserve(user: user, lines: lines, requestId: requestId, ttlMillis: ttl ?? Limits.ttlMillisDefault) {
                return .rejected(rejection)
            }
            if lines.count == 1, requestId == nil, let s = skus[lines[0].sku.bytes], s.available == 0 { return .rejected(.soldOut) }
            // Request ids are kept by the shard that owns the order (its first SKU's); a basket's retry
            // is looked up on the shards of its other SKUs too (after the first's, in shard order), so
            // its SKUs may come in any order.
            let owner = shard(lines[0].sku)
            let others = Set(lines.map { shard($0.sku) }).subtracting([owner]).sorted()
            // An order of these lines under the id, wherever it is kept, before one of other lines.
            let found = requestId.map { id in
                ([owner] + others).compactMap { requests[RequestKey(user: user, requestId: id, shard: $0)] }
            } ?? []
            if let id = found.first(where: { Self.sameLines(orders[$0]!.lines, lines) }) ?? found.first {
                // A request id stands for one request: a retry with other lines is refused.
                if !Self.sameLines(orders[id]!.lines, lines) { return .rejected(.requestConflict(id)) }
                return .reserved(id, deadlineMillis: orders[id]!.deadline, replayed: true)
            }
            let ordered = lines.enumerated().sorted { (shard($0.element.sku), $0.offset) < (shard($1.element.sku), $1.offset) }
            for (_, line) in ordered {
                guard let s = skus[line.sku.bytes] else { return .rejected(.noSuchSku) }
                if s.available == 0 { return .rejected(.soldOut) }
                if s.paused { return .rejected(.paused) }
                if s.available < line.quantity { return .rejected(.insufficient(available: s.available)) }
                if s.limit > 0 {
                    let bought = held[HeldKey(user: user, sku: line.sku)] ?? 0
                    if bought + line.quantity > s.limit { return .rejected(.limitReached(bought: bought, limit: s.limit)) }
                }
            }
            for line in lines {
                skus[line.sku.bytes]!.available -= line.quantity
                skus[line.sku.bytes]!.reserved += line.quantity
                if skus[line.sku.bytes]!.limit > 0 { held[HeldKey(user: user, sku: line.sku), default: 0] += line.quantity }
            }
            let id = OrderID(shard: owner, tag: idTag, sequence: nextSequence[owner])
            nextSequence[owner] += 1
            let deadline = now + (ttl ?? Limits.ttlMillisDefault)
            orders[id] = Order(user: user, lines: lines, state: .pending, deadline: deadline)
            if let requestId { requests[RequestKey(user: user, requestId: requestId, shard: owner)] = id }
            return .reserved(id, deadlineMillis: deadline, replayed: false)
        case let .confirm(id), let .cancel(id):
            guard let order = orders[id] else { return .rejected(.noSuchOrder) }
            let target: OrderState
            if case .confirm = command { target = .paid } else { target = .cancelled }
            switch order.state {
            case .pending:
                if now >= order.deadline {
                    finish(id, .expired)
                    return .rejected(.expired)
                }
                finish(id, target)
                return .orderState(id, target)
            case .expired: return .rejected(.expired)
            case let state: return state == target ? .orderState(id, state) : .rejected(.wrongState(state))
            }
        case let .order(id):
            guard let o = orders[id] else { return .rejected(.noSuchOrder) }
            return .order(OrderInfo(id: id, user: o.user, lines: o.lines, state: o.state, deadlineMillis: o.deadline))
        case let .orders(user, after, count):
            // Pages go by shard, then sequence (an id's tag does not order it).
            func place(_ id: OrderID) -> (Int, UInt32) { (id.shard ?? -1, id.sequence) }
            let start = after.map(place) ?? (-1, 0)
            let all = orders.filter { $0.value.user.bytes == user.bytes && place($0.key) > start }.sorted { place($0.key) < place($1.key) }.prefix(count).map {
                OrderInfo(id: $0.key, user: user, lines: $0.value.lines, state: $0.value.state, deadlineMillis: $0.value.deadline)
            }
            // An order joins the page while the orders before it count less than a page's bytes.
            var page: [OrderInfo] = []
            var bytes = 0
            for info in all where bytes < Limits.pageBytesMax {
                page.append(info)
                bytes += info.pageBytes
            }
            return .orders(page)
        case let .audit(sku):
            // Every SKU adds up here: the engine's must too. Its shards in order, each one's SKUs in
            // the order they were added.
            if let sku {
                guard skus[sku.bytes] != nil else { return .rejected(.noSuchSku) }
                return .audit(AuditFindings([AuditFinding(sku: sku, ok: true, problem: "")]))
            }
            let all = skus.map { (bytes: $0.key, shard: shard(Name(bytes: $0.key)), added: $0.value.added) }
                .sorted { ($0.shard, $0.added) < ($1.shard, $1.added) }
                .map { AuditFinding(sku: Name(bytes: $0.bytes), ok: true, problem: "") }
            return .audit(AuditFindings(all))
        }
    }
}
