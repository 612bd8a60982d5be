import Synchronization
import Testing
@testable import StockadeCore

/// Work whose size has no bound takes a shard's executor a slice at a time, pausing between slices
/// (``Engine/LaterTurn``): an AUDIT of every SKU, a backlog of due holds. In the server a pause waits
/// for a later turn of the shard's event loop, so its other clients are served in between (found: an
/// AUDIT of 200,000 SKUs kept a PING on the shard's loop waiting 40 ms, of a million 378 ms).
@Suite struct AuditSliceTests {
    /// Pauses, and work a pause may run while the slices wait.
    final class Pauses: Sendable {
        let calls = Mutex<[Int]>([])
        let duringPause = Mutex<(@Sendable () async -> Void)?>(nil)

        func laterTurn(_ executor: Int, _ busyNanos: UInt64) async {
            calls.withLock { $0.append(executor) }
            if let work = duringPause.withLock({ $0.take() }) { await work() }
        }
    }

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
