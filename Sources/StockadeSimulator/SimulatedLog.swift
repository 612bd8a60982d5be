import StockadeCore
import Synchronization

/// A ``ChangeLog`` whose disk is the simulator's: records are kept in memory in append order, and they
/// become durable only when the simulator syncs. A reply that waits for a position past the durable one
/// suspends until then, so several clients' batches can be in flight at once, deterministically.
///
/// Faults the simulator injects: an append that fails (a full disk), a sync that fails (EIO: the log
/// refuses everything after), and a crash (the process dies; what was not synced is lost, or a prefix
/// of it survives, as a torn write leaves it).
package final class SimulatedLog: ChangeLog {
    /// One record as appended.
    package struct Entry: Sendable {
        package var bytes: [UInt8]
    }

    private struct Waiter {
        var lsn: UInt64
        var continuation: CheckedContinuation<Result<Void, Rejection>, Never>
    }

    private struct State {
        var entries: [Entry] = []
        var durable: UInt64 = 0
        var failure: String?
        var failNextAppend: String?
        var waiters: [Waiter] = []
        /// Called (outside the lock) each time a reply starts waiting past the durable position.
        var onSuspend: (@Sendable () -> Void)?
    }

    private let state = Mutex(State())

    package init() {}

    package init(records: [[UInt8]]) {
        state.withLock { s in
            s.entries = records.map { Entry(bytes: $0) }
            s.durable = UInt64(records.count)
        }
    }

    // MARK: ChangeLog

    package func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 {
        let result: Result<UInt64, Rejection> = state.withLock { s in
            if let failure = s.failure { return .failure(.unavailable(failure)) }
            if let reason = s.failNextAppend {
                s.failNextAppend = nil
                s.failure = "log write failed, changes are refused until restart: \(reason)"
                failWaiters(&s)
                return .failure(.unavailable(s.failure!))
            }
            // Split the buffer into its records: a crash keeps a prefix of them.
            records.bytes.withUnsafeBytes { raw in
                var offset = 0
                while offset < raw.count {
                    let length = 3 + Int(raw[offset + 1]) | Int(raw[offset + 2]) << 8
                    s.entries.append(Entry(bytes: Array(raw[offset..<offset + length])))
                    offset += length
                }
            }
            return .success(UInt64(s.entries.count))
        }
        return try result.get()
    }

    package func waitDurable(_ lsn: UInt64) async throws(Rejection) {
        let result: Result<Void, Rejection> = await withCheckedContinuation { continuation in
            let suspended: (@Sendable () -> Void)? = state.withLock { s in
                if lsn <= s.durable {
                    continuation.resume(returning: .success(()))
                    return nil
                }
                if let failure = s.failure {
                    continuation.resume(returning: .failure(.unavailable(failure)))
                    return nil
                }
                precondition(lsn <= UInt64(s.entries.count), "waiting for position \(lsn) past the end \(s.entries.count)")
                s.waiters.append(Waiter(lsn: lsn, continuation: continuation))
                return s.onSuspend
            }
            suspended?()
        }
        try result.get()
    }

    package var admitsChanges: Bool { state.withLock { $0.failure == nil } }
    package var failureReason: String? { state.withLock { $0.failure } }

    // MARK: What the simulator does

    /// Called each time a reply starts waiting for a sync.
    package func onSuspend(_ body: @escaping @Sendable () -> Void) { state.withLock { $0.onSuspend = body } }

    package var appendedPosition: UInt64 { state.withLock { UInt64($0.entries.count) } }
    package var durablePosition: UInt64 { state.withLock { $0.durable } }
    package var waiterCount: Int { state.withLock { $0.waiters.count } }

    /// The records from `from` up to `to` (positions, exclusive of `from`).
    package func records(from: UInt64, to: UInt64) -> [[UInt8]] {
        state.withLock { s in s.entries[Int(from)..<Int(to)].map(\.bytes) }
    }

    /// A successful sync of everything appended: every reply waiting for it is released. Returns how many.
    @discardableResult
    package func sync() -> Int {
        let ready: [Waiter] = state.withLock { s in
            guard s.failure == nil else { return [] }
            s.durable = UInt64(s.entries.count)
            let ready = s.waiters
            s.waiters.removeAll()
            return ready
        }
        for waiter in ready { waiter.continuation.resume(returning: .success(())) }
        return ready.count
    }

    /// The next append fails (ENOSPC on write).
    package func failNextAppend(_ reason: String) { state.withLock { $0.failNextAppend = reason } }

    /// A sync fails (EIO on fsync): nothing more becomes durable, every waiter is told no. Returns how many.
    @discardableResult
    package func failSync(_ reason: String) -> Int {
        let failed: [Waiter] = state.withLock { s in
            if s.failure == nil { s.failure = "log write failed, changes are refused until restart: \(reason)" }
            let failed = s.waiters
            s.waiters.removeAll()
            return failed
        }
        for waiter in failed { waiter.continuation.resume(returning: .failure(.unavailable(failureReason!))) }
        return failed.count
    }

    private func failWaiters(_ s: inout State) {
        let failed = s.waiters
        s.waiters.removeAll()
        let reason = s.failure!
        for waiter in failed { waiter.continuation.resume(returning: .failure(.unavailable(reason))) }
    }

    /// What is on disk after a crash: every durable record and the first `keptBeyondDurable` of the rest.
    package func survivingRecords(keptBeyondDurable: Int) -> [[UInt8]] {
        state.withLock { s in
            let end = min(s.entries.count, Int(s.durable) + keptBeyondDurable)
            return s.entries[0..<end].map(\.bytes)
        }
    }
}
