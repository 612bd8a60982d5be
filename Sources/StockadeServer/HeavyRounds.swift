import NIOCore
import StockadeJournal

/// The share of one event loop that rounds with large replies may take, across all its clients.
///
/// A round is heavy when its replies can take tens of kilobytes or more: one command that answers
/// with a page (ORDERS, AUDIT of every SKU), or many with medium replies (a pipeline of ORDER), or an
/// EVENTS of more than one record or of a basket (``ConnectionHandler/heavyReplyBytes``). Building
/// such replies takes milliseconds, and a client's own pacing bounds only that client: a few hundred
/// connections that each send one ORDERS of a megabyte would otherwise have their rounds run back to
/// back, and every other client (a PING, a RESERVE) would wait seconds for its turn.
///
/// So the heavy rounds of a loop's connections take turns here:
/// - At most ``inFlightMax`` hold a turn at once (until their replies are written). Their engine
///   work may run on other loops (the shards they read), so this bounds what they can queue there
///   too. A round takes its turn where its heavy work starts: a round of ORDERS before it runs; an
///   EVENTS once its step is about to read the log (after a BLOCK's wait, and after the durable and
///   replica waits of the changes before it), so a turn is never held while a round waits on a
///   client, a disk or a replica. A heavy round holds no change, and no step that can wait
///   (SNAPSHOT, INFO, REPLICAOF), for the same reason (``ConnectionHandler`` ends a round before one
///   that would join it).
/// - They draw on one bucket of this loop's time: each is charged the time it kept the loop busy
///   (parsing, running in place, encoding), the bucket refills at half the rate of the clock up to
///   ``burstNanos``, and while it is empty no turn starts. So heavy rounds take at most about half
///   of their loop, in stretches of at most ``burstNanos`` plus ``inFlightMax`` rounds.
///
/// A round that may not take its turn now waits, built, in a queue (first come, first served)
/// while the loop serves its other clients; other rounds are never held by it.
///
/// Confined to its event loop: only that loop's connections use it, on the loop.
final class HeavyRounds: @unchecked Sendable {
    /// Heavy rounds holding a turn at once on one loop's connections.
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
    /// Rounds waiting for their turn, oldest first: each entry starts its round.
    private var queue = CircularBuffer<() -> Void>()
    /// A pass over ``queue`` is scheduled.
    private var wakeScheduled = false

    private let metrics: ServerMetrics?

    init(loop: EventLoop, now: UInt64, metrics: ServerMetrics? = nil) {
        self.loop = loop
        refilledAt = now
        self.metrics = metrics
    }

    /// Whether a heavy round may take its turn now; if so it holds it (one of ``inFlightMax``) until
    /// ``finished()``. Not while others wait: they come first.
    func start(now: UInt64) -> Bool {
        guard queue.isEmpty, mayStart(now: now) else { return false }
        inFlight += 1
        metrics?.heavyRoundsAtOnce.increment()
        return true
    }

    /// Queues a round that may not take its turn now: `start` runs it once it may, holding its turn.
    func enqueue(_ start: @escaping () -> Void) {
        queue.append(start)
        scheduleWake(now: monotonicNanos())
    }

    /// A heavy round that held a turn wrote its replies.
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

    private func mayStart(now: UInt64) -> Bool {
        refill(now: now)
        return tokens > 0 && inFlight < Self.inFlightMax
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
            while !queue.isEmpty, mayStart(now: monotonicNanos()) {
                let next = queue.removeFirst()
                inFlight += 1
                metrics?.heavyRoundsWaited.increment()
                next()
            }
            // Waiting for time (not for a round to finish, which wakes the queue itself).
            if !queue.isEmpty, inFlight < Self.inFlightMax { scheduleWake(now: monotonicNanos()) }
        }
    }

    private func refill(now: UInt64) {
        guard now > refilledAt else { return }
        tokens = min(Self.burstNanos, tokens + Int64((now - refilledAt) / 2))
        refilledAt = now
    }
}

/// An EVENTS step's turn in its loop's ``HeavyRounds``, taken once it is about to read from the log
/// more than one record (not while it waits for events, a sync or replicas), or about to encode one
/// event larger than a STOCK: a consumer at the end of the log, woken by one small event, takes none.
/// Its round gives the turn back when its replies are written, if ``taken``.
final class HeavyTurn: @unchecked Sendable {
    private let rounds: HeavyRounds
    /// Read and written on the rounds' loop only.
    private(set) var taken = false

    init(_ rounds: HeavyRounds) { self.rounds = rounds }

    /// Waits (on the loop, in the queue) for the turn; at most once.
    func take() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            rounds.loop.execute { [self] in
                precondition(!taken, "one turn per step")
                if rounds.start(now: monotonicNanos()) {
                    taken = true
                    continuation.resume()
                } else {
                    rounds.enqueue { [self] in
                        taken = true
                        continuation.resume()
                    }
                }
            }
        }
    }
}
