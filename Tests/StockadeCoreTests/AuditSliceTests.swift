import Synchronization
import Testing
@testable import StockadeCore

/// Work whose size has no bound takes a shard's executor a slice at a time, pausing between slices
/// (``Engine/LaterTurn``): an AUDIT of every SKU, a backlog of due holds, the walk over a user's
/// orders of an ORDERS. In the server a pause waits
/// for a later turn of the shard's event loop, so its other clients are served in between (found: an
/// AUDIT of 200,000 SKUs kept a PING on the shard's loop waiting 40 ms, of a million 378 ms; an
/// ORDERS of a user with a million orders 4-6 ms).

/// Pauses an engine takes between slices (``Engine/LaterTurn``), and work the first pause runs while
/// the slices wait.
final class Pauses: Sendable {
    let calls = Mutex<[Int]>([])
    let duringPause = Mutex<(@Sendable () async -> Void)?>(nil)

    func laterTurn(_ executor: Int, _ busyNanos: UInt64) async {
        calls.withLock { $0.append(executor) }
        if let work = duringPause.withLock({ $0.take() }) { await work() }
    }
}

@Suite struct AuditSliceTests {
    @Test func anAuditOfEverySkuPausesBetweenSlicesAndReportsEachSkuOnce() async {
        let pauses = Pauses()
        let engine = Engine(state: EngineState(shardCount: 3), log: MemoryChangeLog(), laterTurn: pauses.laterTurn)
        let count = 20_000
        var perShard = [0, 0, 0]
        for n in 0..<count {
            let sku = Name("sku-\(n)")
            #expect(await engine.execute(.addSku(sku: sku, total: 10, limit: 0), now: 0) == .done)
            perShard[engine.shardIndex(of: sku)] += 1
        }
        // While the audit waits between slices, other commands run: they change SKUs already audited
        // and not yet, and add SKUs.
        let lateRan = Mutex(false)
        pauses.duringPause.withLock {
            $0 = {
                for n in stride(from: 0, to: count, by: 97) {
                    let reply = await engine.execute(
                        .reserve(user: Name("u\(n)"), lines: [OrderLine(sku: Name("sku-\(n)"), quantity: 3)], requestId: nil, ttlMillis: nil),
                        now: 0)
                    guard case .reserved = reply else { Issue.record("\(reply)"); return }
                }
                for n in 0..<50 { _ = await engine.execute(.addSku(sku: Name("late-\(n)"), total: 1, limit: 0), now: 0) }
                lateRan.withLock { $0 = true }
            }
        }
        let reply = await engine.execute(.audit(sku: nil), now: 0)
        guard case .audit(let findings) = reply else { Issue.record("audit reply \(reply)"); return }
        #expect(lateRan.withLock { $0 })
        // Each shard's slices pause between them, none after a shard's last.
        let expected = perShard.reduce(0) { $0 + ($1 - 1) / Engine.auditChunk }
        #expect(pauses.calls.withLock { $0.count } >= expected && expected >= 3)
        #expect(findings.slices.allSatisfy { !$0.isEmpty && $0.count <= Engine.auditChunk })
        // Every SKU of before the audit once, SKUs added during it at most once, every one adding up.
        var seen: [Name: Int] = [:]
        for finding in findings { seen[finding.sku, default: 0] += 1 }
        #expect((0..<count).allSatisfy { seen[Name("sku-\($0)")] == 1 })
        #expect(seen.values.allSatisfy { $0 == 1 } && findings.count == seen.count)
        #expect(findings.allSatisfy { $0.ok })
    }

    /// A replica's state can be replaced whole (a full copy of its primary) while an AUDIT waits
    /// between slices; SKU indices then mean other SKUs. The audit of that shard starts over: before,
    /// it went on from the same index in the new state, reporting the old state's first slice and the
    /// new state's rest (SKUs of both, some of the new missing).
    @Test func anAuditStartsAShardOverWhenItsStateIsReplacedBetweenSlices() async throws {
        func state(_ prefix: String, count: Int) throws -> EngineState {
            var state = EngineState(shardCount: 3)
            for n in 0..<count {
                let sku = Name("\(prefix)-\(n)")
                let shard = Engine.shardIndex(of: sku, shardCount: 3)
                try state.apply(.skuAdded(shard: shard, skuIndex: UInt32(state.shards[shard].skuCount), sku: sku, total: 5, limit: 0))
            }
            return state
        }
        let before = try state("old", count: 15_000)
        let copy = try state("new", count: 15_000)
        let pauses = Pauses()
        // A replica: read-only, every shard on one executor.
        let engine = Engine(
            state: before, log: MemoryChangeLog(), executors: [QueueExecutor(label: "replica")], laterTurn: pauses.laterTurn,
            readOnly: true)
        pauses.duringPause.withLock { $0 = { await engine.installReplicated(copy) } }
        let reply = await engine.execute(.audit(sku: nil), now: 0)
        guard case .audit(let findings) = reply else { Issue.record("audit reply \(reply)"); return }
        let names = findings.map { String(decoding: $0.sku.bytes, as: UTF8.self) }
        #expect(Set(names) == Set((0..<15_000).map { "new-\($0)" }) && names.count == 15_000)
        #expect(findings.allSatisfy { $0.ok })
    }

    @Test func aBacklogOfDueHoldsExpiresAChunkAtATimeWithPausesBetween() async {
        let pauses = Pauses()
        let engine = Engine(state: EngineState(shardCount: 1), log: MemoryChangeLog(), laterTurn: pauses.laterTurn)
        let holds = 2 * Engine.expiryChunk + 100
        #expect(await engine.execute(.addSku(sku: "s", total: Int64(holds), limit: 0), now: 0) == .done)
        for n in 0..<holds {
            let reply = await engine.execute(
                .reserve(user: Name("u\(n)"), lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 1), now: 0)
            guard case .reserved = reply else { Issue.record("\(reply)"); return }
        }
        // The audit (of one SKU: one slice) expires everything due first, three chunks.
        let reply = await engine.execute(.audit(sku: nil), now: 1_000)
        #expect(reply == .audit(AuditFindings([AuditFinding(sku: "s", ok: true, problem: "")])))
        #expect(pauses.calls.withLock { $0 } == [0, 0])
        #expect(await engine.execute(.stock(sku: "s"), now: 1_000)
            == .stock(SkuInfo(sku: "s", total: Int64(holds), available: Int64(holds), reserved: 0, sold: 0, limit: 0, paused: false)))
    }
}

@Suite struct OrdersWalkTests {
    /// A user with more orders than a slice visits: the page is the oldest after the cursor, the
    /// same as a walk in one go, with pauses between slices in which the user's new orders are placed.
    @Test(arguments: [0, 3, 20_000, 33_760])
    func ordersOfAUserWithManyOrdersWalkASliceAtATime(afterIndex: Int) async {
        let pauses = Pauses()
        // No time for more than one chunk of the walk per call: the calls are counted.
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog(), laterTurn: pauses.laterTurn, slicing: Engine.Slicing(nanos: 0))
        let orders = 8 * Engine.ordersWalkChunk + 1_000
        #expect(await engine.execute(.addSku(sku: "s", total: 1_000_000, limit: 0), now: 0) == .done)
        var ids: [OrderID] = []
        for _ in 0..<orders {
            let reply = await engine.execute(
                .reserve(user: "bot", lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
            guard case .reserved(let id, _, _) = reply else { Issue.record("\(reply)"); return }
            ids.append(id)
        }
        // The user's newer orders, placed while the walk waits between slices, come after the page.
        pauses.duringPause.withLock {
            $0 = {
                for _ in 0..<100 {
                    _ = await engine.execute(
                        .reserve(user: "bot", lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
                }
            }
        }
        let after = afterIndex == 0 ? nil : ids[afterIndex - 1]
        let reply = await engine.execute(.orders(user: "bot", after: after, count: 10), now: 0)
        guard case .orders(let page) = reply else { Issue.record("\(reply)"); return }
        #expect(page.map(\.id) == Array(ids[afterIndex..<min(ids.count, afterIndex + 10)]))
        let walked = orders - afterIndex
        let expected = (walked - 1) / Engine.ordersWalkChunk  // pauses between slices on the owner shard
        #expect(pauses.calls.withLock { $0.count } == expected)
    }

    /// A replica's state replaced whole while the walk waits between slices: the walk starts over on
    /// the new state (its sequences mean other orders).
    @Test func aWalkStartsOverWhenTheStateIsReplaced() async throws {
        func state(_ user: Name, orders: Int) async -> EngineState {
            let engine = Engine(state: EngineState(shardCount: 1), log: MemoryChangeLog())
            _ = await engine.execute(.addSku(sku: "s", total: 1_000_000, limit: 0), now: 0)
            for _ in 0..<orders {
                _ = await engine.execute(.reserve(user: user, lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
            }
            return await engine.captureState(lsn: 0)
        }
        let before = await state("bot", orders: 3 * Engine.ordersWalkChunk)
        // The copy: ten orders of the bot, then another user's, so that the sequence the walk had
        // reached is another user's order there.
        let copy = await {
            let engine = Engine(state: EngineState(shardCount: 1), log: MemoryChangeLog())
            _ = await engine.execute(.addSku(sku: "s", total: 1_000_000, limit: 0), now: 0)
            for n in 0..<(3 * Engine.ordersWalkChunk) {
                let user: Name = n < 10 ? "bot" : "other"
                _ = await engine.execute(.reserve(user: user, lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 600_000), now: 0)
            }
            return await engine.captureState(lsn: 0)
        }()
        let pauses = Pauses()
        let engine = Engine(state: before, log: MemoryChangeLog(), laterTurn: pauses.laterTurn, readOnly: true, slicing: Engine.Slicing(nanos: 0))
        pauses.duringPause.withLock { $0 = { await engine.installReplicated(copy) } }
        let reply = await engine.execute(.orders(user: "bot", after: nil, count: 5), now: 0)
        guard case .orders(let page) = reply else { Issue.record("\(reply)"); return }
        // The bot's oldest orders in the copy: sequences 1 to 5.
        #expect(page.map { $0.id.sequence } == [1, 2, 3, 4, 5])
        #expect(page.allSatisfy { $0.user == "bot" })
    }
}
