import NIOCore
import StockadeJournal

/// The share of one event loop that rounds with large replies may take, across all its clients.
///
/// A round is heavy when one of its commands can answer with a page of tens of kilobytes or more
/// (ORDERS, AUDIT of every SKU, EVENTS: ``ConnectionHandler/heavyReplyBytes``). Building such a reply
/// takes milliseconds, and a client's own pacing bounds only that client: a few hundred connections
/// that each send one ORDERS of a megabyte would otherwise have their rounds run back to back, and
/// every other client (a PING, a RESERVE) would wait seconds for its turn.
///
/// So the heavy rounds of a loop's connections take turns here:
/// - At most ``inFlightMax`` run at once (from their start to their replies' write). Their engine
///   work may run on other loops (the shards they read), so this bounds what they can queue there
///   too. A blocking EVENTS, which mostly waits, is not counted (``start(counted:)``).
/// - They draw on one bucket of this loop's time: each is charged the time it kept the loop busy
///   (parsing, running in place, encoding), the bucket refills at half the rate of the clock up to
///   ``burstNanos``, and while it is empty heavy rounds wait. So heavy rounds take at most about half
///   of their loop, in stretches of at most ``burstNanos`` plus one round.
///
/// A heavy round that may not start waits, built, in a queue (first come, first served) while the
/// loop serves its other clients; other rounds are never held by it.
///
/// Confined to its event loop: only that loop's connections use it, on the loop.
final class HeavyRounds: @unchecked Sendable {
    /// Heavy rounds running at once on one loop's connections.
    static let inFlightMax = 2
    /// The loop time heavy rounds may take at once, after a pause.
    static let burstNanos: Int64 = 10_000_000
    /// Owed time is bounded (a minute), so no charge can overflow it.
    private static let owedNanosMax: UInt64 = 60_000_000_000

    let loop: EventLoop
    /// Loop time heavy rounds may take now (negative: owed).
    private var tokens = HeavyRounds.burstNanos
    private var refilledAt: UInt64
    private var inFlight = 0
    /// Rounds waiting to start, oldest first: each entry starts its round.
    private var queue = CircularBuffer<(counted: Bool, start: () -> Void)>()
    /// A pass over ``queue`` is scheduled.
    private var wakeScheduled = false

    init(loop: EventLoop, now: UInt64) {
        self.loop = loop
        refilledAt = now
    }

    /// Whether a heavy round may start now; if so it is counted as started (`counted`: in
    /// ``inFlightMax``, until ``finished()``). Not while others wait: they come first.
    func start(counted: Bool, now: UInt64) -> Bool {
        guard queue.isEmpty, mayStart(counted: counted, now: now) else { return false }
        if counted { inFlight += 1 }
        return true
    }

    /// Queues a round that may not start now: `start` runs it once it may (counted as started).
    func enqueue(counted: Bool, _ start: @escaping () -> Void) {
        queue.append((counted, start))
        scheduleWake(now: monotonicNanos())
    }

    /// A counted heavy round wrote its replies.
    func finished() {
        precondition(inFlight > 0, "a heavy round finished that did not start")
        inFlight -= 1
        if !queue.isEmpty { scheduleWake(now: monotonicNanos()) }
    }

    /// A heavy round kept the loop busy for `nanos`.
    func charge(_ nanos: UInt64, now: UInt64) {
        refill(now: now)
        tokens = max(tokens - Int64(min(nanos, Self.owedNanosMax)), -Int64(Self.owedNanosMax))
    }

    private func mayStart(counted: Bool, now: UInt64) -> Bool {
        refill(now: now)
        return tokens > 0 && (!counted || inFlight < Self.inFlightMax)
    }

    /// Starts waiting rounds on a later turn of the loop (after it polled its sockets): when the
    /// bucket has refilled what is owed, or at once when a round finished.
    private func scheduleWake(now: UInt64) {
        guard !wakeScheduled else { return }
        refill(now: now)
        let delay = tokens > 0 ? 50_000 : UInt64(-tokens) * 2 + 50_000
        wakeScheduled = true
        loop.scheduleTask(in: .nanoseconds(Int64(delay))) { [self] in
            wakeScheduled = false
            while let next = queue.first, mayStart(counted: next.counted, now: monotonicNanos()) {
                queue.removeFirst()
                if next.counted { inFlight += 1 }
                next.start()
            }
            // Waiting for time (not for a round to finish, which wakes the queue itself).
            if let next = queue.first, next.counted ? inFlight < Self.inFlightMax : true { scheduleWake(now: monotonicNanos()) }
        }
    }

    private func refill(now: UInt64) {
        guard now > refilledAt else { return }
        tokens = min(Self.burstNanos, tokens + Int64((now - refilledAt) / 2))
        refilledAt = now
    }
}
