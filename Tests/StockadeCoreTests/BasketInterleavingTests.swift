import Testing
@testable import StockadeCore

/// Baskets across shards are placed in steps (prepare on each shard, then commit on the owner or
/// release everywhere) and the engine runs the steps of many baskets interleaved. These tests drive the
/// shards' states through such interleavings directly, deterministically, and check what each shard
/// knows of every user against a model of the orders placed.
@Suite struct BasketInterleavingTests {
    /// A basket being placed: its lines by shard, the shards prepared so far, and how it ends.
    private struct Basket {
        var user: Name
        var lines: [OrderLine]
        var shards: [Int]
        var prepared: [Int: (items: [Record.Item], interned: Bool)] = [:]
        var next = 0
        /// Gives up after preparing this many shards (a refusal or a failed record further on).
        var abortAfter: Int?
    }

    /// The case review found: a basket that interned a new user on a shard fails after another basket
    /// of the same user held a limited SKU there. The first release forgot the user while the second's
    /// holds still named its index; the next new user took that index (and those holds), and the first
    /// user could buy the SKU again past its limit.
    @Test func aFailedBasketDoesNotForgetAUserAnotherBasketHoldsFor() {
        var state = ShardState(shard: 0)
        var log = RecordBuffer()
        _ = state.addSku("c", total: 10, limit: 2, log: &log)
        _ = state.addSku("d", total: 10, limit: 0, log: &log)
        var internedA = false, internedB = false
        guard case .success(let a) = state.prepareHold(user: "x", lines: [OrderLine(sku: "d", quantity: 1)], internedUser: &internedA),
              case .success(let b) = state.prepareHold(user: "x", lines: [OrderLine(sku: "c", quantity: 2)], internedUser: &internedB)
        else { Issue.record("prepares refused"); return }
        #expect(internedA && !internedB)
        // B's order is recorded by the shard that owns it; here its holds simply stay.
        _ = b
        state.releasePrepared(user: "x", items: a, internedUser: internedA)
        var internedY = false
        _ = state.prepareHold(user: "y", lines: [OrderLine(sku: "d", quantity: 1)], internedUser: &internedY)
        let again = state.reserve(
            user: "x", lines: [OrderLine(sku: "c", quantity: 1)], requestId: nil, ttlMillis: 1_000, now: 0, log: &log)
        #expect(again == .rejected(.limitReached(bought: 2, limit: 2)))
    }

    /// Random interleavings of baskets (some failing part way), single-SKU reservations and new users:
    /// when every basket has ended, each shard's per-user counts equal the orders placed, no user is
    /// past a limit, and the stock adds up.
    @Test(arguments: 0..<400) func interleavedBasketsKeepEveryUsersCounts(seed: Int) {
        var rng = SplitMix64(seed: UInt64(seed) &* 0x9E37_79B9_7F4A_7C15 &+ 1)
        let shardCount = 3
        var states = (0..<shardCount).map { ShardState(shard: $0) }
        var log = RecordBuffer()
        let skus: [Name] = (0..<6).map { Name("s\($0)") }
        var limit: [Name: Int64] = [:]
        for (n, sku) in skus.enumerated() {
            let l: Int64 = n % 3 == 2 ? 0 : 2
            limit[sku] = l
            _ = states[Engine.shardIndex(of: sku, shardCount: shardCount)].addSku(sku, total: 40, limit: l, log: &log)
        }
        let users: [Name] = (0..<6).map { Name("u\($0)") }
        var bought: [String: Int64] = [:]  // "user|sku" -> units in placed orders
        var open: [Basket] = []
        var started = 0
        while started < 150 || !open.isEmpty {
            let choice = Int.random(in: 0..<10, using: &rng)
            if started < 150, choice < 4 || open.isEmpty {
                // A new basket, or a single-SKU reservation placed at once.
                started += 1
                // New users keep coming, each for a few baskets, so that a user with baskets in flight
                // is often the newest one on a shard.
                let user = Bool.random(using: &rng)
                    ? users.randomElement(using: &rng)! : Name("n\(started / 3 + Int.random(in: 0...1, using: &rng))")
                let lines = skus.shuffled(using: &rng).prefix(Int.random(in: 1...3, using: &rng))
                    .map { OrderLine(sku: $0, quantity: Int64.random(in: 1...2, using: &rng)) }
                if lines.count == 1 {
                    let s = Engine.shardIndex(of: lines[0].sku, shardCount: shardCount)
                    if case .reserved = states[s].reserve(
                        user: user, lines: lines, requestId: nil, ttlMillis: 60_000, now: 0, log: &log)
                    {
                        bought["\(user)|\(lines[0].sku)", default: 0] += lines[0].quantity
                    }
                    continue
                }
                let shards = Set(lines.map { Engine.shardIndex(of: $0.sku, shardCount: shardCount) }).sorted()
                let abort = Int.random(in: 0..<3, using: &rng) == 0 ? Int.random(in: 0...shards.count, using: &rng) : nil
                open.append(Basket(user: user, lines: Array(lines), shards: shards, abortAfter: abort))
                continue
            }
            // One step of an open basket.
            let i = Int.random(in: 0..<open.count, using: &rng)
            var basket = open[i]
            let giveUp = basket.abortAfter == basket.next
            if !giveUp, basket.next < basket.shards.count {
                let s = basket.shards[basket.next]
                var interned = false
                switch states[s].prepareHold(
                    user: basket.user, lines: basket.lines.filter { Engine.shardIndex(of: $0.sku, shardCount: shardCount) == s },
                    internedUser: &interned)
                {
                case .success(let items):
                    basket.prepared[s] = (items, interned)
                    basket.next += 1
                    open[i] = basket
                case .failure:
                    for (h, p) in basket.prepared { states[h].releasePrepared(user: basket.user, items: p.items, internedUser: p.interned) }
                    open.remove(at: i)
                }
                continue
            }
            if giveUp {
                for (h, p) in basket.prepared { states[h].releasePrepared(user: basket.user, items: p.items, internedUser: p.interned) }
            } else {
                var next: [Int: Int] = [:]
                var items: [Record.Item] = []
                for line in basket.lines {
                    let s = Engine.shardIndex(of: line.sku, shardCount: shardCount)
                    items.append(basket.prepared[s]!.items[next[s, default: 0]])
                    next[s, default: 0] += 1
                }
                let owner = Engine.shardIndex(of: basket.lines[0].sku, shardCount: shardCount)
                _ = states[owner].commitOrder(
                    user: basket.user, requestId: nil, items: items, skus: basket.lines.map(\.sku), deadlineMillis: 60_000,
                    log: &log)
                for line in basket.lines { bought["\(basket.user)|\(line.sku)", default: 0] += line.quantity }
            }
            open.remove(at: i)
        }
        for sku in skus {
            let s = Engine.shardIndex(of: sku, shardCount: shardCount)
            let state = states[s]
            let index = state.skuIndexByName[sku]!
            let info = state.stock(sku)!
            let placed = bought.filter { $0.key.hasSuffix("|\(sku)") }.values.reduce(0, +)
            #expect(info.reserved == placed, "seed \(seed): \(sku) reserved \(info.reserved), orders hold \(placed)")
            #expect(info.available + info.reserved == 40)
            guard limit[sku]! > 0 else { continue }
            var counted: Int64 = 0
            for (key, units) in state.heldByUserSku.pairs where key & 0xFFFF_FFFF == UInt64(index) {
                let user = state.users[Int(key >> 32)]
                #expect(Int64(units) == bought["\(user)|\(sku)"], "seed \(seed): \(user) holds \(units) of \(sku)")
                counted += Int64(units)
            }
            #expect(counted == placed, "seed \(seed): per-user counts of \(sku) add up to \(counted), orders hold \(placed)")
        }
        #expect(bought.allSatisfy { limit[Name(String($0.key.split(separator: "|")[1]))]! == 0 || $0.value <= 2 })
    }
}
