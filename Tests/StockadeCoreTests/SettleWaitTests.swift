import Dispatch
import Synchronization
import Testing
@testable import StockadeCore

/// ``Shard/settled()`` must return once the basket holds on its shard settle, however the wait
/// interleaves with the settle.
///
/// A server's round task prefers its connection's event loop (a task executor), and a shard runs on
/// a loop of its own (a custom serial executor). In that arrangement the Swift 6.3 runtime suspends an
/// `await withCheckedContinuation` inside the shard before the continuation's body runs (the body is
/// queued again on the shard's executor, behind jobs already there), so a check made before it may
/// be stale when the body runs. The language allows this: an `await` is a suspension point. A
/// `settled()` that checked the count of holds first and joined the waiters in the body joined after
/// the last hold had settled, and waited for good (a connection left without replies).
@Suite struct SettleWaitTests {
    @Test func aWaitThatInterleavesWithTheLastSettleStillReturns() async throws {
        let gate = GateExecutor()
        let engine = Engine(state: EngineState(shardCount: 1), log: MemoryChangeLog(), executors: [gate])
        let shard = engine.shards[0]
        _ = await engine.execute(.addSku(sku: "s", total: 5, limit: 0), now: 0)
        let prepared = await shard.prepareHold(user: "u", lines: [OrderLine(sku: "s", quantity: 1)])
        guard case .success(let held) = prepared else { Issue.record("\(prepared)"); return }

        // Hold the shard's jobs: first the waiter's entry into settled(), then the last settle.
        gate.hold()
        let returned = Flag()
        let loop = DispatchTaskExecutor(label: "stockade-test-loop")
        let waiter = Task(executorPreference: loop) {
            await shard.settled()
            returned.set()
        }
        try await until { gate.heldCount == 1 }
        let settler = Task {
            await shard.settle(user: "u", items: held.items, internedUser: held.internedUser, committedAt: nil)
        }
        try await until { gate.heldCount == 2 }
        // The waiter's entry runs first and sees a hold being placed; the settle runs next, then
        // whatever the waiter queued meanwhile.
        gate.runNext()
        gate.open()
        await settler.value
        try await until(seconds: 5) { returned.isSet }
        #expect(returned.isSet, "settled() did not return after the last hold settled")
        if returned.isSet { await waiter.value }
    }

    /// Polls `condition` every millisecond for up to `seconds`.
    private func until(seconds: Double = 5, _ condition: () -> Bool) async throws {
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(seconds * 1e9)
        while !condition() && DispatchTime.now().uptimeNanoseconds < deadline {
            try await Task.sleep(for: .milliseconds(1))
        }
    }
}

/// A serial executor whose jobs the test can hold back and release one at a time, in order.
private final class GateExecutor: SerialExecutor, @unchecked Sendable {
    private struct State {
        var holding = false
        var held: [UnownedJob] = []
    }
    private let state = Mutex(State())
    private let queue = DispatchQueue(label: "stockade-test-gate")

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let run = state.withLock { s in
            if s.holding { s.held.append(job) }
            return !s.holding
        }
        if run { dispatch(job) }
    }

    private func dispatch(_ job: UnownedJob) {
        let executor = asUnownedSerialExecutor()
        queue.async { job.runSynchronously(on: executor) }
    }

    var heldCount: Int { state.withLock { $0.held.count } }

    func hold() { state.withLock { $0.holding = true } }

    /// Runs the oldest held job and waits for it to return.
    func runNext() {
        let job = state.withLock { s in s.held.isEmpty ? nil : s.held.removeFirst() }
        guard let job else { return }
        let executor = asUnownedSerialExecutor()
        queue.sync { job.runSynchronously(on: executor) }
    }

    /// Runs the held jobs in order, and every job after them at once.
    func open() {
        state.withLock { s in
            s.holding = false
            for job in s.held { dispatch(job) }
            s.held.removeAll()
        }
    }
}

/// A task executor on a queue of its own, as a connection's event loop is for its round tasks.
private final class DispatchTaskExecutor: TaskExecutor, @unchecked Sendable {
    private let queue: DispatchQueue

    init(label: String) { queue = DispatchQueue(label: label) }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedTaskExecutor()
        queue.async { job.runSynchronously(on: executor) }
    }
}
