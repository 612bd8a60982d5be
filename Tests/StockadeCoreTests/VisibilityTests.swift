import Synchronization
import Testing
@testable import StockadeCore

/// A log whose failures the test decides, and which remembers every position a reply waited for.
final class ControlledLog: ChangeLog {
    private struct State {
        var position: UInt64 = 0
        var failNextAppend = false
        var failure: String?
        var waits: [UInt64] = []
    }
    private let state = Mutex(State())

    func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 {
        let result: Result<UInt64, Rejection> = state.withLock { s in
            if let failure = s.failure { return .failure(.unavailable(failure)) }
            if s.failNextAppend {
                s.failure = "log write failed: injected"
                return .failure(.unavailable(s.failure!))
            }
            s.position += UInt64(records.count)
            return .success(s.position)
        }
        return try result.get()
    }

    func waitDurable(_ lsn: UInt64) async throws(Rejection) {
        let failure: String? = state.withLock { s in
            s.waits.append(lsn)
            return lsn > s.position ? (s.failure ?? "not appended") : nil
        }
        if let failure { throw .unavailable(failure) }
    }

    var admitsChanges: Bool { state.withLock { $0.failure == nil } }
    var failureReason: String? { state.withLock { $0.failure } }
    var position: UInt64 { state.withLock { $0.position } }
    var lastWait: UInt64? { state.withLock { $0.waits.last } }
    func failNextAppend() { state.withLock { $0.failNextAppend = true } }
}

/// No reply shows state that a crash at that instant could take back, across shards too; after a log
/// failure nothing is shown or changed that the log does not have (#7 A3, A4).
@Suite struct VisibilityTests {
    let a = OrderingTests.sku(on: 0, of: 2, prefix: "a")
    let b = OrderingTests.sku(on: 1, of: 2, prefix: "b")

    /// An engine with a and b (one unit each) and a basket owned by shard 1 that holds both.
    private func setUp() async -> (Engine, ControlledLog, OrderID) {
        let log = ControlledLog()
        let engine = Engine(state: EngineState(shardCount: 2), log: log)
        _ = await engine.execute([.addSku(sku: a, total: 1, limit: 0), .addSku(sku: b, total: 1, limit: 0)], now: 0)
        let reply = await engine.execute(
            .reserve(user: "carol", lines: [OrderLine(sku: b, quantity: 1), OrderLine(sku: a, quantity: 1)], requestId: nil,
                     ttlMillis: 1_000), now: 0)
        guard case .reserved(let id, _, _) = reply, id.shard == 1 else { preconditionFailure("\(reply)") }
        return (engine, log, id)
    }

    /// Failed before: STOCK on shard 0 waited only for shard 0's own last record, not for the cancel
    /// record (on shard 1's behalf) whose release it showed.
    @Test func aReadOfAForeignEffectWaitsForTheRecordThatCausedIt() async {
        let (engine, log, order) = await setUp()
        #expect(await engine.execute(.cancel(order), now: 1) == .orderState(order, .cancelled))
        let cancelPosition = log.position
        let stock = await engine.execute(.stock(sku: a), now: 2)
        #expect(stock == .stock(SkuInfo(sku: a, total: 1, available: 1, reserved: 0, sold: 0, limit: 0, paused: false)))
        #expect((log.lastWait ?? 0) >= cancelPosition)
    }

    /// Failed before: the release was applied to shard 0 although the cancel's record never reached the
    /// log, and STOCK kept showing it.
    @Test func aChangeTheLogRefusedLeavesNoEffectOnOtherShards() async {
        let (engine, log, order) = await setUp()
        log.failNextAppend()
        guard case .rejected(.unavailable) = await engine.execute(.cancel(order), now: 1) else {
            Issue.record("cancel was not refused"); return
        }
        guard case .rejected(.unavailable) = await engine.execute(.stock(sku: a), now: 2) else {
            Issue.record("a read after the log failed was answered"); return
        }
        let state = await engine.captureState(lsn: 0)
        #expect(state.shards[0].stock(a)?.reserved == 1)
        #expect(engine.available(a) == 0)
    }

    /// Failed before: shard 0, which had not appended itself, answered BUSY ("retry later") for good, and
    /// expiry went on changing memory it could no longer log.
    @Test func afterALogFailureEveryShardRefusesEverythingAndNothingExpires() async {
        let (engine, log, _) = await setUp()
        _ = await engine.execute(.addSku(sku: "other-on-1", total: 3, limit: 0), now: 0)
        log.failNextAppend()
        _ = await engine.execute(.restock(sku: b, delta: 1), now: 1)
        for command in [Command.restock(sku: a, delta: 1), .stock(sku: a), .deduct(sku: a, quantity: 1),
                        .reserve(user: "u", lines: [OrderLine(sku: a, quantity: 1)], requestId: nil, ttlMillis: nil),
                        .orders(user: "carol", after: nil, count: 100), .audit(sku: nil)] {
            let reply = await engine.execute(command, now: 2)
            guard case .rejected(.unavailable(let reason)) = reply else { Issue.record("\(command): \(reply)"); continue }
            #expect(reason.contains("injected"))
        }
        await engine.expire(now: 10_000)
        let state = await engine.captureState(lsn: 0)
        #expect(state.shards[0].stock(a)?.reserved == 1, "expiry changed memory after the log failed")
    }

    /// While a basket's holds are placed but its record is not written, commands on the shards it holds
    /// on wait: a reply must not show a hold that a crash would take back.
    @Test func aHoldNotYetRecordedIsNotShown() async {
        let log = ControlledLog()
        let engine = Engine(state: EngineState(shardCount: 2), log: log)
        _ = await engine.execute(.addSku(sku: a, total: 1, limit: 0), now: 0)
        let prepared = await engine.shards[0].prepareHold(user: "carol", lines: [OrderLine(sku: a, quantity: 1)])
        guard case .success(let held) = prepared else { Issue.record("\(prepared)"); return }
        let answered = Flag()
        let reader = Task {
            let reply = await engine.execute(.stock(sku: a), now: 1)
            answered.set()
            return reply
        }
        for _ in 0..<50 { await Task.yield() }
        try? await Task.sleep(for: .milliseconds(50))
        let early = answered.isSet
        #expect(!early, "STOCK showed a hold that is not logged")
        await engine.shards[0].settle(user: "carol", items: held.items, internedUser: held.internedUser, committedAt: nil)
        #expect(await reader.value == .stock(SkuInfo(sku: a, total: 1, available: 1, reserved: 0, sold: 0, limit: 0, paused: false)))
    }

    /// A basket begun while the node took changes and resumed after it stopped (its lease lapsed
    /// while the process was frozen: a newer primary may exist) logs nothing: the step that comes
    /// next, a hold or the commit, is refused, the holds go back and the request id is free again.
    @Test func aBasketResumedAfterTheNodeStoppedTakingChangesLogsNothing() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 5, limit: 0), .addSku(sku: b, total: 5, limit: 0)], now: 0)
        let lines = [OrderLine(sku: a, quantity: 1), OrderLine(sku: b, quantity: 1)]
        #expect(await engine.shards[0].beginRequest(user: "dan", requestId: "k", lines: lines) == nil)
        let prepared = await engine.shards[0].prepareHold(user: "dan", lines: [lines[0]])
        guard case .success(let held) = prepared else { Issue.record("\(prepared)"); return }
        engine.role.setReadOnly(true)
        guard case .failure(.readOnly) = await engine.shards[1].prepareHold(user: "dan", lines: [lines[1]]) else {
            Issue.record("a hold was placed on a node that takes no changes")
            return
        }
        guard case .failure(.readOnly) = await engine.shards[0].commitOrder(
            user: "dan", requestId: "k", items: held.items, skus: [a], deadlineMillis: 1_000)
        else {
            Issue.record("a basket was recorded on a node that takes no changes")
            return
        }
        await engine.shards[0].settle(user: "dan", items: held.items, internedUser: held.internedUser, committedAt: nil)
        let state = await engine.captureState(lsn: 0)
        #expect(state.shards.allSatisfy { $0.orderCount == 0 })
        #expect(state.shards[0].stock(a)?.available == 5 && state.shards[1].stock(b)?.available == 5)
        engine.role.setReadOnly(false)
        guard case .reserved(_, _, false) = await engine.execute(.reserve(user: "dan", lines: lines, requestId: "k", ttlMillis: nil), now: 1)
        else {
            Issue.record("the request id stayed taken")
            return
        }
    }

    /// A request id stands for one request: reusing it with other arguments is refused (#7 B13).
    @Test func aReusedRequestIdWithOtherArgumentsIsAConflict() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 5, limit: 0), .addSku(sku: b, total: 5, limit: 0)], now: 0)
        guard case .reserved(let first, _, false) = await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: a, quantity: 1)], requestId: "k1", ttlMillis: nil), now: 0)
        else { Issue.record("no order"); return }
        #expect(await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: a, quantity: 2)], requestId: "k1", ttlMillis: nil), now: 1)
            == .rejected(.requestConflict(first)))
        guard case .reserved(let basket, _, false) = await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: a, quantity: 1), OrderLine(sku: b, quantity: 1)], requestId: "k2",
                     ttlMillis: nil), now: 0)
        else { Issue.record("no basket"); return }
        #expect(await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: a, quantity: 1), OrderLine(sku: b, quantity: 2)], requestId: "k2",
                     ttlMillis: nil), now: 1)
            == .rejected(.requestConflict(basket)))
        guard case .reserved(basket, _, true) = await engine.execute(
            .reserve(user: "bob", lines: [OrderLine(sku: a, quantity: 1), OrderLine(sku: b, quantity: 1)], requestId: "k2",
                     ttlMillis: 5), now: 1)
        else { Issue.record("the same basket retried was not found"); return }
        #expect(engine.available(a) == 3 && engine.available(b) == 4)
    }

    /// A refused request grows nothing (#7 C19): before, a basket with a request id interned its user on
    /// the owner shard before any SKU was checked.
    @Test func refusedBasketsGrowNothing() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        _ = await engine.execute([.addSku(sku: a, total: 1, limit: 0), .addSku(sku: b, total: 0, limit: 0)], now: 0)
        for i in 0..<500 {
            let user = Name("u\(i)")
            _ = await engine.execute(.reserve(user: user, lines: [OrderLine(sku: Name("nosku-\(i)"), quantity: 1), OrderLine(sku: a, quantity: 1)],
                                              requestId: "r", ttlMillis: nil), now: 0)
            // a holds on shard 0, then b (sold out) refuses on shard 1: the hold and the user go again.
            _ = await engine.execute(.reserve(user: user, lines: [OrderLine(sku: a, quantity: 1), OrderLine(sku: b, quantity: 1)],
                                              requestId: "r", ttlMillis: nil), now: 0)
        }
        let state = await engine.captureState(lsn: 0)
        #expect(state.shards.map(\.users.count) == [0, 0])
        #expect(state.shards.allSatisfy { $0.requestsInFlight.isEmpty && $0.requests.isEmpty })
        #expect(engine.available(a) == 1)
    }
}

/// A flag set on one thread and read on another (a test's "has it happened yet").
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { value.load(ordering: .sequentiallyConsistent) }
}
