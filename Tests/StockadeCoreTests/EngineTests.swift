import Testing
@testable import StockadeCore
import StockadeSimulator

private func makeEngine(shards: Int = 3) -> Engine {
    Engine(state: EngineState(shardCount: shards), log: MemoryChangeLog())
}

private func reserve(_ user: Name, _ sku: Name, _ quantity: Int64 = 1, request: Name? = nil, ttl: Int64? = nil) -> Command {
    .reserve(user: user, lines: [OrderLine(sku: sku, quantity: quantity)], requestId: request, ttlMillis: ttl)
}

private func orderID(_ reply: Reply) -> OrderID? {
    if case .reserved(let id, _, _) = reply { return id }
    return nil
}

@Suite struct ModelTests {
    /// Random sequences against the reference model: same reply to every command, same final state.
    @Test(arguments: [1 as UInt64, 2, 3, 4, 5, 6, 7, 8])
    func engineMatchesReferenceModel(seed: UInt64) async {
        let shards = Int(seed % 3) + 1
        let engine = makeEngine(shards: shards)
        var model = ReferenceModel(shardCount: shards)
        var workload = RandomWorkload(seed: seed)
        var now: Int64 = 1_000
        for step in 0..<3_000 {
            now += Int64.random(in: 0...20, using: &workload.rng)
            await engine.expire(now: now)
            model.expire(now: now)
            let command = workload.next()
            let got = await engine.execute(command, now: now)
            let want = model.apply(command, now: now)
            workload.observe(got)
            #expect(got == want, "seed \(seed) step \(step): \(command)")
            if got != want { return }
        }
        for sku in workload.skus {
            let got = await engine.execute(.stock(sku: sku), now: now)
            #expect(got == model.apply(.stock(sku: sku), now: now))
        }
        for id in workload.orders {
            let got = await engine.execute(.order(id), now: now)
            #expect(got == model.apply(.order(id), now: now))
        }
        let audit = await engine.execute(.audit(sku: nil), now: now)
        guard case .audit(let findings) = audit else { Issue.record("audit reply \(audit)"); return }
        #expect(findings.allSatisfy { $0.ok })
    }
}

@Suite struct ConcurrencyTests {
    /// Many tasks race for one SKU: successes equal stock exactly, never negative.
    @Test func racingReservationsNeverOversell() async {
        let engine = makeEngine(shards: 4)
        _ = await engine.execute(.addSku(sku: "phone", total: 500, limit: 0), now: 0)
        let successes = await withTaskGroup(of: Int.self) { group in
            for task in 0..<32 {
                group.addTask {
                    var won = 0
                    for batch in 0..<25 {
                        let commands = (0..<8).map { reserve(Name("t\(task)-\(batch)-\($0)"), "phone") }
                        for reply in await engine.execute(commands, now: 0) where orderID(reply) != nil { won += 1 }
                        #expect((engine.available("phone") ?? -1) >= 0)
                    }
                    return won
                }
            }
            return await group.reduce(0, +)
        }
        #expect(successes == 500)
        #expect(await engine.execute(.stock(sku: "phone"), now: 0)
            == .stock(SkuInfo(sku: "phone", total: 500, available: 0, reserved: 500, sold: 0, limit: 0, paused: false)))
    }

    /// Baskets over several SKUs on different shards race with single reservations: every SKU sells
    /// exactly its stock, baskets are whole or absent, per-user limits hold.
    @Test func racingBasketsAcrossShardsAreAllOrNothing() async {
        let engine = makeEngine(shards: 4)
        let skus: [Name] = ["a", "b", "c", "d", "e", "f"]
        #expect(Set(skus.map(engine.shardIndex(of:))).count > 1)
        for sku in skus { _ = await engine.execute(.addSku(sku: sku, total: 60, limit: 2), now: 0) }
        let placed = await withTaskGroup(of: [(Name, [OrderLine])].self) { group in
            for task in 0..<16 {
                group.addTask {
                    var rng = SplitMix64(seed: UInt64(task))
                    var mine: [(Name, [OrderLine])] = []
                    for n in 0..<40 {
                        let user = Name("user\(Int.random(in: 0..<40, using: &rng))")
                        let lines = skus.shuffled(using: &rng).prefix(Int.random(in: 1...3, using: &rng))
                            .map { OrderLine(sku: $0, quantity: Int64.random(in: 1...2, using: &rng)) }
                        let reply = await engine.execute(
                            .reserve(user: user, lines: lines, requestId: Name("\(task)-\(n)"), ttlMillis: nil), now: 0)
                        if orderID(reply) != nil { mine.append((user, lines)) }
                    }
                    return mine
                }
            }
            return await group.reduce(into: []) { $0 += $1 }
        }
        var sold: [Name: Int64] = [:]
        var perUser: [String: Int64] = [:]
        for (user, lines) in placed {
            for line in lines {
                sold[line.sku, default: 0] += line.quantity
                perUser["\(user)|\(line.sku)", default: 0] += line.quantity
            }
        }
        for sku in skus {
            guard case .stock(let info) = await engine.execute(.stock(sku: sku), now: 0) else { Issue.record("no stock"); continue }
            #expect(info.reserved == sold[sku, default: 0])
            #expect(info.available == 60 - info.reserved && info.available >= 0)
        }
        #expect(perUser.values.allSatisfy { $0 <= 2 })
        let audit = await engine.execute(.audit(sku: nil), now: 0)
        guard case .audit(let findings) = audit else { Issue.record("audit reply \(audit)"); return }
        #expect(findings.count == skus.count && findings.allSatisfy { $0.ok })
    }
}

@Suite struct ExactResultTests {
    @Test func reserveOutcomes() async {
        let engine = makeEngine()
        #expect(await engine.execute(.addSku(sku: "tv", total: 3, limit: 2), now: 0) == .done)
        #expect(await engine.execute(.addSku(sku: "tv", total: 9, limit: 0), now: 0) == .rejected(.skuExists))
        #expect(await engine.execute(reserve("u1", "nope"), now: 0) == .rejected(.noSuchSku))
        #expect(await engine.execute(reserve("u1", "tv", 3), now: 0) == .rejected(.limitReached(bought: 0, limit: 2)))
        #expect(orderID(await engine.execute(reserve("u1", "tv", 2), now: 0)) != nil)
        #expect(await engine.execute(reserve("u1", "tv", 1), now: 0) == .rejected(.limitReached(bought: 2, limit: 2)))
        #expect(await engine.execute(reserve("u2", "tv", 2), now: 0) == .rejected(.insufficient(available: 1)))
        #expect(orderID(await engine.execute(reserve("u2", "tv", 1), now: 0)) != nil)
        #expect(await engine.execute(reserve("u3", "tv", 1), now: 0) == .rejected(.soldOut))
        #expect(await engine.execute(.setPaused(sku: "tv", paused: true), now: 0) == .done)
        #expect(await engine.execute(.restock(sku: "tv", delta: 1), now: 0)
            == .stock(SkuInfo(sku: "tv", total: 4, available: 1, reserved: 3, sold: 0, limit: 2, paused: true)))
        #expect(await engine.execute(reserve("u3", "tv", 1), now: 0) == .rejected(.paused))
    }

    @Test func badArguments() async {
        let engine = makeEngine()
        let long = Name(String(repeating: "x", count: 65))
        #expect(await engine.execute(.addSku(sku: "", total: 1, limit: 0), now: 0) == .rejected(.badArgument("SKU id must be 1 to 64 bytes")))
        #expect(await engine.execute(.addSku(sku: long, total: 1, limit: 0), now: 0) == .rejected(.badArgument("SKU id must be 1 to 64 bytes")))
        #expect(await engine.execute(.addSku(sku: "s", total: -1, limit: 0), now: 0) == .rejected(.badArgument("total must be 0 to 1099511627776")))
        #expect(await engine.execute(.addSku(sku: "s", total: Limits.stockMax + 1, limit: 0), now: 0)
            == .rejected(.badArgument("total must be 0 to 1099511627776")))
        #expect(await engine.execute(.addSku(sku: "s", total: 5, limit: -1), now: 0) == .rejected(.badArgument("limit must be 0 (none) to 1000000000")))
        _ = await engine.execute(.addSku(sku: "s", total: 5, limit: 0), now: 0)
        for quantity in [0, -1, Limits.quantityMax + 1, Int64.max, Int64.min] {
            #expect(await engine.execute(reserve("u", "s", quantity), now: 0) == .rejected(.badQuantity))
            #expect(await engine.execute(.deduct(sku: "s", quantity: quantity), now: 0) == .rejected(.badQuantity))
        }
        #expect(await engine.execute(reserve("", "s"), now: 0) == .rejected(.badArgument("user id must be 1 to 64 bytes")))
        #expect(await engine.execute(reserve(long, "s"), now: 0) == .rejected(.badArgument("user id must be 1 to 64 bytes")))
        #expect(await engine.execute(reserve("u", "s", request: long), now: 0) == .rejected(.badArgument("request id must be 1 to 64 bytes")))
        #expect(await engine.execute(reserve("u", "s", ttl: 0), now: 0) == .rejected(.badArgument("TTL must be 1 to 604800000 ms")))
        #expect(await engine.execute(.reserve(user: "u", lines: [], requestId: nil, ttlMillis: nil), now: 0)
            == .rejected(.badArgument("an order has 1 to 64 SKUs")))
        #expect(await engine.execute(.reserve(user: "u", lines: [OrderLine(sku: "s", quantity: 1), OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: nil), now: 0)
            == .rejected(.badArgument("SKU s listed twice")))
        #expect(await engine.execute(.restock(sku: "s", delta: Int64.max), now: 0) == .rejected(.badQuantity))
        #expect(await engine.execute(.confirm(OrderID(rawValue: 0)), now: 0) == .rejected(.noSuchOrder))
        #expect(await engine.execute(.confirm(OrderID(rawValue: UInt64.max)), now: 0) == .rejected(.noSuchOrder))
        // Nothing above changed the SKU.
        #expect(await engine.execute(.stock(sku: "s"), now: 0)
            == .stock(SkuInfo(sku: "s", total: 5, available: 5, reserved: 0, sold: 0, limit: 0, paused: false)))
    }

    @Test func expiryReturnsStockExactlyOnce() async {
        let engine = makeEngine()
        _ = await engine.execute(.addSku(sku: "cam", total: 2, limit: 0), now: 0)
        let id = orderID(await engine.execute(reserve("u", "cam", 2, ttl: 100), now: 1_000))!
        #expect(engine.available("cam") == 0)
        // At the deadline the order is expired: confirming fails and the stock is back.
        #expect(await engine.execute(.confirm(id), now: 1_100) == .rejected(.expired))
        #expect(engine.available("cam") == 2)
        #expect(await engine.execute(.cancel(id), now: 1_200) == .rejected(.expired))
        await engine.expire(now: 5_000)
        #expect(await engine.execute(.stock(sku: "cam"), now: 5_000)
            == .stock(SkuInfo(sku: "cam", total: 2, available: 2, reserved: 0, sold: 0, limit: 0, paused: false)))
        guard case .order(let info) = await engine.execute(.order(id), now: 5_000) else { Issue.record("no order"); return }
        #expect(info.state == .expired)
        // The expiry timer alone also expires.
        let second = orderID(await engine.execute(reserve("u", "cam", 1, ttl: 50), now: 6_000))!
        await engine.expire(now: 6_050)
        guard case .order(let info2) = await engine.execute(.order(second), now: 6_050) else { Issue.record("no order"); return }
        #expect(info2.state == .expired)
        #expect(engine.available("cam") == 2)
    }

    @Test func confirmAndCancelAreIdempotent() async {
        let engine = makeEngine()
        _ = await engine.execute(.addSku(sku: "cup", total: 5, limit: 0), now: 0)
        let a = orderID(await engine.execute(reserve("u", "cup", 2), now: 0))!
        let b = orderID(await engine.execute(reserve("u", "cup", 1), now: 0))!
        #expect(await engine.execute(.confirm(a), now: 1) == .orderState(a, .paid))
        #expect(await engine.execute(.confirm(a), now: 2) == .orderState(a, .paid))
        #expect(await engine.execute(.cancel(a), now: 2) == .rejected(.wrongState(.paid)))
        #expect(await engine.execute(.cancel(b), now: 3) == .orderState(b, .cancelled))
        #expect(await engine.execute(.cancel(b), now: 4) == .orderState(b, .cancelled))
        #expect(await engine.execute(.confirm(b), now: 4) == .rejected(.wrongState(.cancelled)))
        #expect(await engine.execute(.stock(sku: "cup"), now: 5)
            == .stock(SkuInfo(sku: "cup", total: 5, available: 3, reserved: 0, sold: 2, limit: 0, paused: false)))
    }

    @Test func sameRequestIdReturnsTheOriginalOrder() async {
        let engine = makeEngine()
        _ = await engine.execute(.addSku(sku: "hat", total: 1, limit: 0), now: 0)
        let first = await engine.execute(reserve("u", "hat", request: "r-1"), now: 0)
        guard case .reserved(let id, let deadline, false) = first else { Issue.record("\(first)"); return }
        // Sold out now, yet the retry finds its order rather than a refusal or a second hold.
        #expect(await engine.execute(reserve("u", "hat", request: "r-1"), now: 10) == .reserved(id, deadlineMillis: deadline, replayed: true))
        #expect(await engine.execute(reserve("v", "hat", request: "r-1"), now: 10) == .rejected(.soldOut))
        #expect(await engine.execute(.orders(user: "u", after: nil, count: 100), now: 10) == .orders([
            OrderInfo(id: id, user: "u", lines: [OrderLine(sku: "hat", quantity: 1)], state: .pending, deadlineMillis: deadline)
        ]))
    }

    /// A page of ORDERS stops once its orders reach ``Limits/pageBytesMax`` (review found one ORDERS
    /// of 1,000 baskets answering 5 MB), across shards, and paging on with AFTER still lists every
    /// order once, in the engine's order; the reference model pages the same way.
    @Test func ordersPagesStopAtTheirBytes() async {
        let engine = makeEngine(shards: 3)
        var model = ReferenceModel(shardCount: 3)
        let skus = (0..<64).map { Name(String(format: "%02d", $0) + String(repeating: "s", count: 58)) }
        var all: [OrderID] = []
        func both(_ command: Command, now: Int64 = 0) async -> Reply {
            let reply = await engine.execute(command, now: now)
            // Compared without printing both (pages of megabytes) when they differ.
            let expected = model.apply(command, now: now)
            if expected != reply { Issue.record("the engine and the reference model answer differently") }
            return reply
        }
        for sku in skus { _ = await both(.addSku(sku: sku, total: 10_000, limit: 0)) }
        for _ in 0..<400 {
            let reply = await both(.reserve(user: "u", lines: skus.map { OrderLine(sku: $0, quantity: 1) }, requestId: nil, ttlMillis: 600_000))
            guard let id = orderID(reply) else { Issue.record("\(reply)"); return }
            all.append(id)
        }
        var listed: [OrderID] = []
        var after: OrderID?
        var pages = 0
        while case .orders(let page) = await both(.orders(user: "u", after: after, count: 1000)), let last = page.last {
            let bytes = page.dropLast().reduce(0) { $0 + $1.pageBytes }
            #expect(bytes < Limits.pageBytesMax, "the orders before the last one reach a page's bytes already")
            #expect(page.count == 1000 || listed.count + page.count == all.count || bytes + last.pageBytes >= Limits.pageBytesMax)
            listed += page.map(\.id)
            after = last.id
            pages += 1
        }
        #expect(Set(listed) == Set(all) && listed.count == all.count)
        #expect(pages >= 2)
    }

    @Test func basketRollsBackWhenOneLineFails() async {
        let engine = makeEngine(shards: 4)
        let skus: [Name] = ["a", "b", "c", "d", "e", "f", "g", "h"]
        for sku in skus { _ = await engine.execute(.addSku(sku: sku, total: 3, limit: 0), now: 0) }
        // A basket over several shards whose last line cannot be met.
        let shardsUsed = Set(skus.prefix(4).map(engine.shardIndex(of:)))
        #expect(shardsUsed.count > 1)
        let lines = skus.prefix(3).map { OrderLine(sku: $0, quantity: 2) } + [OrderLine(sku: skus[3], quantity: 4)]
        #expect(await engine.execute(.reserve(user: "u", lines: lines, requestId: "basket", ttlMillis: nil), now: 0)
            == .rejected(.insufficient(available: 3)))
        for sku in skus { #expect(engine.available(sku) == 3) }
        // The request id was released with the failure: the corrected basket goes through.
        let fixed = skus.prefix(4).map { OrderLine(sku: $0, quantity: 2) }
        let reply = await engine.execute(.reserve(user: "u", lines: fixed, requestId: "basket", ttlMillis: 100), now: 0)
        guard let id = orderID(reply) else { Issue.record("\(reply)"); return }
        for sku in skus.prefix(4) { #expect(engine.available(sku) == 1) }
        #expect(await engine.execute(.cancel(id), now: 10) == .orderState(id, .cancelled))
        for sku in skus { #expect(engine.available(sku) == 3) }
    }

    @Test func restockNeverGoesBelowCommitted() async {
        let engine = makeEngine()
        _ = await engine.execute(.addSku(sku: "mug", total: 10, limit: 0), now: 0)
        let id = orderID(await engine.execute(reserve("u", "mug", 4), now: 0))!
        _ = await engine.execute(.confirm(id), now: 0)
        _ = await engine.execute(reserve("v", "mug", 3), now: 0)
        #expect(await engine.execute(.restock(sku: "mug", delta: -4), now: 0) == .rejected(.belowCommitted(committed: 7)))
        #expect(await engine.execute(.restock(sku: "mug", delta: -3), now: 0)
            == .stock(SkuInfo(sku: "mug", total: 7, available: 0, reserved: 3, sold: 4, limit: 0, paused: false)))
        #expect(await engine.execute(.restock(sku: "nope", delta: 1), now: 0) == .rejected(.noSuchSku))
    }

    @Test func deductSpeaksTheLuaScriptsLanguage() async {
        let engine = makeEngine()
        _ = await engine.execute(.addSku(sku: "pen", total: 2, limit: 0), now: 0)
        #expect(await engine.execute(.deduct(sku: "pen", quantity: 1), now: 0) == .deducted(1))
        #expect(await engine.execute(.deduct(sku: "pen", quantity: 2), now: 0) == .deducted(0))
        #expect(await engine.execute(.deduct(sku: "pen", quantity: 1), now: 0) == .deducted(1))
        #expect(await engine.execute(.deduct(sku: "pen", quantity: 1), now: 0) == .deducted(0))
        #expect(await engine.execute(.deduct(sku: "ink", quantity: 1), now: 0) == .deducted(-1))
    }
}

@Suite struct RecordTests {
    @Test func recordsRoundTrip() throws {
        let records: [Record] = [
            .skuAdded(shard: 1, skuIndex: 7, sku: "sku-é", total: 100, limit: 2),
            .restocked(shard: 0, skuIndex: 3, delta: -5),
            .pausedChanged(shard: 2, skuIndex: 1, paused: true),
            .deducted(shard: 0, skuIndex: 0, quantity: 9),
            .orderCreated(.init(id: OrderID(shard: 1, sequence: 42), deadlineMillis: 123_456, user: "u", requestId: "",
                                items: [.init(shard: 1, skuIndex: 2, quantity: 3), .init(shard: 0, skuIndex: 5, quantity: 1)])),
            .orderPaid(OrderID(shard: 0, sequence: 1)),
            .orderCancelled(OrderID(shard: 0, sequence: 2)),
            .orderExpired(OrderID(shard: 3, sequence: 3)),
        ]
        var buffer = RecordBuffer()
        for record in records { buffer.append(record) }
        #expect(buffer.count == records.count)
        var decoded: [Record] = []
        try buffer.bytes.withUnsafeBytes { try Record.decodeAll($0) { decoded.append($0) } }
        #expect(decoded == records)
        // A truncated stream is refused, never misread.
        let cut = Array(buffer.bytes.dropLast(3))
        #expect(throws: RecordDecodingError.self) { try cut.withUnsafeBytes { try Record.decodeAll($0) { _ in } } }
    }
}

@Suite struct ImageTests {
    /// An image made mostly of orders (as a large flash sale's is) decodes to the same state.
    @Test func imageWithManyOrdersRoundTrips() throws {
        var state = ShardState(shard: 0)
        var log = RecordBuffer()
        _ = state.addSku("hot", total: 100_000, limit: 0, log: &log)
        for i in 0..<20_000 {
            _ = state.reserve(user: "u", lines: [OrderLine(sku: "hot", quantity: 1)], requestId: i == 3 ? "r3" : nil,
                              ttlMillis: 1_000, now: Int64(i), log: &log)
        }
        var paidLog = RecordBuffer()
        _ = state.confirm(OrderID(shard: 0, sequence: 7), now: 0, log: &paidLog)
        let engine = EngineState(shards: [state], lsn: 42)
        let image = engine.encodeImage()
        let decoded = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(decoded.lsn == 42)
        #expect(decoded.stateHash() == engine.stateHash())
        #expect(decoded.shards[0].orderCount == 20_000)
        // Any truncation is refused.
        for cut in [1, 26, image.count / 2, image.count - 1] {
            #expect(throws: EngineState.ImageError.self) { try Array(image.prefix(cut)).withUnsafeBytes { try EngineState.decodeImage($0) } }
        }
    }
}

/// A log that is full: it admits no changes (as the journal does past its pending bound).
private final class FullChangeLog: ChangeLog {
    func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 { throw .busy }
    func waitDurable(_ lsn: UInt64) async throws(Rejection) {}
    var admitsChanges: Bool { false }
    var failureReason: String? { nil }
}

@Suite struct OverloadTests {
    @Test func changesAreRefusedWithBusyWhileTheLogIsFull() async {
        var state = EngineState(shardCount: 2)
        var log = RecordBuffer()
        _ = state.shards[Engine.shardIndex(of: "tv", shardCount: 2)].addSku("tv", total: 5, limit: 0, log: &log)
        let engine = Engine(state: state, log: FullChangeLog())
        #expect(await engine.execute(reserve("u", "tv"), now: 0) == .rejected(.busy))
        #expect(await engine.execute(.reserve(user: "u", lines: [OrderLine(sku: "tv", quantity: 1), OrderLine(sku: "zz", quantity: 1)], requestId: nil, ttlMillis: nil), now: 0) == .rejected(.busy))
        #expect(await engine.execute(.deduct(sku: "tv", quantity: 1), now: 0) == .rejected(.busy))
        // Reads still answer, and nothing changed.
        #expect(await engine.execute(.stock(sku: "tv"), now: 0)
            == .stock(SkuInfo(sku: "tv", total: 5, available: 5, reserved: 0, sold: 0, limit: 0, paused: false)))
    }
}

/// A basket's request id is kept by the shard of its first SKU; a retry may list the SKUs in another
/// order (another first SKU), and is looked up on the shards of all of them.
@Suite struct BasketRetryTests {
    /// SKUs on each of the engine's four shards.
    private func skusOnEveryShard(_ engine: Engine) -> [Name] {
        (0..<4).map { shard in (0..<1_000).lazy.map { Name("sku-\($0)") }.first { engine.shardIndex(of: $0) == shard }! }
    }

    /// Retries in every order, one after another: the first order back each time, and REQCONFLICT
    /// for other quantities in any order.
    @Test func aRetryInAnyOrderFindsTheOrder() async {
        let engine = makeEngine(shards: 4)
        let skus = skusOnEveryShard(engine)
        for sku in skus { _ = await engine.execute(.addSku(sku: sku, total: 100, limit: 0), now: 0) }
        let lines = skus.enumerated().map { OrderLine(sku: $1, quantity: Int64($0 + 1)) }
        guard let placed = orderID(await engine.execute(.reserve(user: "u", lines: lines, requestId: "k", ttlMillis: 60_000), now: 0)) else {
            Issue.record("not placed")
            return
        }
        var rng = SplitMix64(seed: 7)
        for _ in 0..<20 {
            let retry = await engine.execute(.reserve(user: "u", lines: lines.shuffled(using: &rng), requestId: "k", ttlMillis: 60_000), now: 0)
            #expect(orderID(retry) == placed)
        }
        var other = lines
        other[2].quantity += 1
        #expect(await engine.execute(.reserve(user: "u", lines: other.reversed(), requestId: "k", ttlMillis: 60_000), now: 0)
            == .rejected(.requestConflict(placed)))
        for (i, sku) in skus.enumerated() {
            #expect(await engine.execute(.stock(sku: sku), now: 0).stockAvailable == 100 - Int64(i + 1))
        }
    }

    /// The same id may name two orders (a second basket whose SKUs all lie on other shards than the
    /// first's first SKU places its own). A retry of the first, in another order, gets the first back
    /// wherever the two are kept: it got REQCONFLICT naming the second when that one's shard came first.
    @Test func aRetryFindsItsOwnOrderAmongTwoUnderOneId() async {
        let engine = makeEngine(shards: 4)
        let skus = skusOnEveryShard(engine)
        for sku in skus { _ = await engine.execute(.addSku(sku: sku, total: 100, limit: 0), now: 0) }
        // X: a b c (kept on a's shard); Y: b c (kept on b's: a's is not looked at); then X's lines from c.
        for (a, b, c) in [(0, 1, 2), (3, 0, 1), (1, 3, 2), (2, 0, 3)] {
            let user = Name("u\(a)\(b)\(c)")
            func buy(_ order: [Int], _ quantities: [Int64]) async -> Reply {
                await engine.execute(
                    .reserve(user: user, lines: zip(order, quantities).map { OrderLine(sku: skus[$0], quantity: $1) }, requestId: "k", ttlMillis: 60_000),
                    now: 0)
            }
            guard let x = orderID(await buy([a, b, c], [1, 2, 3])), let y = orderID(await buy([b, c], [2, 3])) else {
                Issue.record("not placed")
                continue
            }
            #expect(x != y)
            #expect(orderID(await buy([c, a, b], [3, 1, 2])) == x)
            #expect(orderID(await buy([b, a, c], [2, 1, 3])) == x)
            #expect(orderID(await buy([c, b], [3, 2])) == y)
            // Lines of neither: REQCONFLICT, naming one of them.
            let other = await buy([c, a, b], [3, 1, 1])
            #expect(other == .rejected(.requestConflict(x)) || other == .rejected(.requestConflict(y)), "\(other)")
        }
    }

    /// Retries in different orders at once (each names another owner): one order at most per request
    /// id, the others get it back or INFLIGHT; never a second hold.
    @Test func retriesInDifferentOrdersAtOncePlaceOneOrder() async {
        let engine = makeEngine(shards: 4)
        let skus = skusOnEveryShard(engine)
        for sku in skus { _ = await engine.execute(.addSku(sku: sku, total: 10_000, limit: 0), now: 0) }
        for round in 0..<50 {
            let request = Name("r\(round)")
            let replies = await withTaskGroup(of: Reply.self) { group in
                for k in 0..<4 {
                    let order = (0..<4).map { skus[($0 + k) % 4] }
                    group.addTask {
                        await engine.execute(
                            .reserve(user: "u", lines: order.map { OrderLine(sku: $0, quantity: 1) }, requestId: request, ttlMillis: 60_000),
                            now: 0)
                    }
                }
                return await group.reduce(into: [Reply]()) { $0.append($1) }
            }
            // One marks every shard first (in shard order) and places it; the others meet its marks, or
            // its order. Marked in each basket's own order, all four could meet another's mark and step back.
            var placed = Set(replies.compactMap(orderID))
            #expect(placed.count == 1, "round \(round): \(replies)")
            #expect(replies.allSatisfy { orderID($0) != nil || $0 == .rejected(.requestInFlight) }, "round \(round): \(replies)")
            let retry = await engine.execute(
                .reserve(user: "u", lines: skus.reversed().map { OrderLine(sku: $0, quantity: 1) }, requestId: request, ttlMillis: 60_000), now: 0)
            placed.formUnion([orderID(retry)].compactMap { $0 })
            #expect(placed.count == 1, "round \(round): \(replies), then \(retry)")
        }
        for sku in skus { #expect(await engine.execute(.stock(sku: sku), now: 0).stockAvailable == 10_000 - 50) }
    }
}

private extension Reply {
    var stockAvailable: Int64? {
        if case .stock(let info) = self { return info.available }
        return nil
    }
}
