import StockadeCore
import StockadeJournal
import Synchronization

/// The clients blocked in `EVENTS ... BLOCK`, each waiting for the durable log position to reach its
/// `from`. One task follows the journal (``follow(_:)``) and wakes the waiters a durable batch
/// satisfies; a waiter costs nothing while nothing happens (no polling), and the housekeeping tick
/// ends those whose time is up. ``close()`` (shutdown) answers every waiter at once.
final class DurablePositionWatch: Sendable {
    private struct Waiter {
        var from: UInt64
        var deadlineNanos: UInt64
        var continuation: CheckedContinuation<Bool, Never>
    }

    private struct State {
        var published: UInt64 = 0
        var closed = false
        var nextID = 0
        var waiters: [Int: Waiter] = [:]
        /// The earliest deadline of any waiter: the tick scans only when one is due.
        var earliestDeadlineNanos = UInt64.max
        /// The follower, parked while nobody waits.
        var follower: CheckedContinuation<Bool, Never>?
    }

    private let state = Mutex(State())

    /// Shut down: every wait returns false at once.
    var isClosed: Bool { state.withLock { $0.closed } }

    /// Waiters now (INFO).
    var count: Int { state.withLock { $0.waiters.count } }

    /// The position published last (what waits from at or below it return at once for).
    var position: UInt64 { state.withLock { $0.published } }

    /// Waits until the durable position is at least `from` (true), or the deadline passes, the
    /// server shuts down or the client of `presence` leaves (false).
    func wait(from: UInt64, deadlineNanos: UInt64, presence: ClientPresence? = nil) async -> Bool {
        let woken: Bool = await withCheckedContinuation { continuation in
            let (immediate, follower, id): (Bool?, CheckedContinuation<Bool, Never>?, Int?) = state.withLock { s in
                if s.closed { return (false, nil, nil) }
                if s.published >= from { return (true, nil, nil) }
                let id = s.nextID
                s.waiters[id] = Waiter(from: from, deadlineNanos: deadlineNanos, continuation: continuation)
                s.nextID += 1
                s.earliestDeadlineNanos = min(s.earliestDeadlineNanos, deadlineNanos)
                defer { s.follower = nil }
                return (nil, s.follower, id)
            }
            if let immediate { continuation.resume(returning: immediate) }
            follower?.resume(returning: true)
            // A client that closes its side ends its wait now, as in Redis (and as WAIT's): it stops
            // counting in INFO's blocked_clients and holds nothing until its deadline.
            if let id, let presence { presence.whenGone { [self] in end(id) } }
        }
        presence?.whenGone(nil)
        return woken
    }

    /// Ends one wait now (its client left), if it is still waiting.
    private func end(_ id: Int) {
        let continuation = state.withLock { $0.waiters.removeValue(forKey: id)?.continuation }
        continuation?.resume(returning: false)
    }

    /// Raises the position to `durable` (it never goes back here: see ``restarted(at:)``) and wakes
    /// every waiter whose `from` is at or below it. Returns whether the position rose.
    @discardableResult
    func publish(_ durable: UInt64) -> Bool {
        let (ready, raised): ([CheckedContinuation<Bool, Never>], Bool) = state.withLock { s in
            guard durable > s.published else { return ([], false) }
            s.published = durable
            var ready: [CheckedContinuation<Bool, Never>] = []
            for (id, waiter) in s.waiters where waiter.from <= durable {
                ready.append(waiter.continuation)
                s.waiters[id] = nil
            }
            return (ready, true)
        }
        for continuation in ready { continuation.resume(returning: true) }
        return raised
    }

    /// Lowers the position to `position` when it is above it (it is never raised here): what it
    /// stood for past `position` no longer holds. Nobody is woken.
    func cap(at position: UInt64) {
        state.withLock { $0.published = min($0.published, position) }
    }

    /// The log started again at `durable` (a node rejoining a primary): the position published goes
    /// back with it, so that waits for positions of the new log are woken when it reaches them.
    func restarted(at durable: UInt64) {
        state.withLock { $0.published = durable }
    }

    /// Ends the waits whose deadline passed (called every housekeeping tick; scans only when one is due).
    func expireDue(nowNanos: UInt64) {
        let due: [CheckedContinuation<Bool, Never>] = state.withLock { s in
            guard nowNanos >= s.earliestDeadlineNanos else { return [] }
            var due: [CheckedContinuation<Bool, Never>] = []
            var earliest = UInt64.max
            for (id, waiter) in s.waiters {
                if waiter.deadlineNanos <= nowNanos {
                    due.append(waiter.continuation)
                    s.waiters[id] = nil
                } else {
                    earliest = min(earliest, waiter.deadlineNanos)
                }
            }
            s.earliestDeadlineNanos = earliest
            return due
        }
        for continuation in due { continuation.resume(returning: false) }
    }

    /// Shutdown: every waiter is answered now, and later waits return at once.
    func close() {
        let all: [CheckedContinuation<Bool, Never>] = state.withLock { s in
            s.closed = true
            defer { s.waiters = [:] }
            return s.waiters.values.map(\.continuation)
        }
        for continuation in all { continuation.resume(returning: false) }
        let follower = state.withLock { s in
            defer { s.follower = nil }
            return s.follower
        }
        follower?.resume(returning: false)
    }

    /// Follows the journal's durable position while anyone waits: one journal wait at a time for
    /// all waiters, woken by the journal's group commit. Returns when closed or the log fails (the
    /// waiters then end at their deadlines; a failed log has no new events). At shutdown the journal
    /// may never reach the next position; this task then stays parked in it until the process exits.
    func follow(_ journal: Journal) async {
        publish(journal.lastDurableLSN)
        while true {
            let proceed: Bool = await withCheckedContinuation { continuation in
                let now: Bool? = state.withLock { s in
                    if s.closed { return false }
                    if !s.waiters.isEmpty { return true }
                    s.follower = continuation
                    return nil
                }
                if let now { continuation.resume(returning: now) }
            }
            guard proceed, !Task.isCancelled else { return }
            let next = state.withLock { $0.published } + 1
            do { try await journal.waitDurable(next) } catch {
                // A log that started again (``Journal/restart(at:)``) goes on from a lower position.
                if journal.terminalReason != nil { return }
                restarted(at: journal.lastDurableLSN)
            }
            publish(journal.lastDurableLSN)
        }
    }
}
