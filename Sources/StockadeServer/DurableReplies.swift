import NIOCore
import StockadeJournal
import Synchronization

/// What waits on ``DurableReplies``: a connection with a round in flight (one at a time), so a round
/// costs no closure of its own.
protocol DurableWaiter: AnyObject {
    /// On the loop: the position waited for is durable (nil), or never will be (the reason).
    func durableReached(_ failure: String?)
}

/// The rounds of one event loop's connections whose replies wait for a log position to become durable.
///
/// The loop writes the records its rounds wait for itself: the first round that waits in a turn of
/// the loop queues one write (``Journal/writeAsCaller()``), which runs after the turn's reads, syncs
/// once for all of them and answers them in one pass (the way Redis syncs and answers its clients in
/// `beforeSleep`): no hand-off to another thread and back. When another loop (or the journal's
/// thread) is writing already, the write returns at once, and that writer writes these records too or
/// hands them to the journal's thread; after a slow sync, the journal's thread writes them
/// (``Journal/Options/callerWriteNanosMax``).
/// Whoever writes calls ``durable(_:)`` once per sync; when anything here waits for a position now
/// durable, it wakes this loop once, and the loop answers every such round in one pass. So a sync
/// costs at most one cross-thread hand-off per other loop, however many connections it answers.
final class DurableReplies: @unchecked Sendable {
    let loop: EventLoop
    private let journal: Journal
    /// Which shards run on this loop: ``Engine/executeLocally(_:now:localShards:)`` enters them in place.
    let localShards: [Bool]

    // Confined to `loop`.
    private var waiting: [(lsn: UInt64, waiter: any DurableWaiter)] = []
    /// The entries one drain pass answers, kept emptied between passes (no allocation per sync).
    private var spareReady: [(lsn: UInt64, waiter: any DurableWaiter)] = []
    /// Entries of spare capacity kept: a drain of more rounds than this (a loop with thousands of
    /// connections waiting) allocates its list, which is then freed.
    private static let spareReadyMax = 1024

    /// The lowest position waited for (UInt64.max: none). Written on the loop, read by the writer.
    /// Sequentially consistent with the journal's durable position: a round that stores its position
    /// here and then reads the durable position either sees it durable or is seen by ``durable(_:)``.
    private let lowestWaiting = Atomic<UInt64>(.max)
    /// A drain is queued on the loop: the writer queues at most one at a time.
    private let drainQueued = Atomic<Bool>(false)
    /// A write is queued on the loop for this turn's rounds (confined to `loop`).
    private var writeQueued = false
    /// This loop is writing (``writeAndAnswer()``), which answers what became durable right after:
    /// ``durable(_:)``, called by that write on this thread, queues no drain of its own.
    private var writingHere = false

    init(loop: EventLoop, journal: Journal, localShards: [Bool]) {
        self.loop = loop
        self.journal = journal
        self.localShards = localShards
    }

    /// On the loop: calls `answer` with nil once `lsn` is durable (at once if it is already), or with
    /// the reason it never will be (the log failed or closed).
    func wait(for lsn: UInt64, write: Bool = true, _ answer: @escaping (String?) -> Void) {
        wait(for: lsn, ClosureWaiter(answer), write: write)
    }

    /// As ``wait(for:_:)``, calling `waiter`'s ``DurableWaiter/durableReached(_:)``. With `write` false
    /// the loop queues no write of its own: the records were appended on another loop, which writes
    /// them (``writeSoon(through:)``), and this loop is woken by that write as by any other.
    func wait(for lsn: UInt64, _ waiter: any DurableWaiter, write: Bool = true) {
        loop.assertInEventLoop()
        if journal.lastDurableLSN >= lsn {
            waiter.durableReached(nil)
            return
        }
        waiting.append((lsn, waiter))
        if lsn < lowestWaiting.load(ordering: .relaxed) { lowestWaiting.store(lsn, ordering: .sequentiallyConsistent) }
        if journal.lastDurableLSN >= lsn || journal.terminalReason != nil {
            drain()
            return
        }
        if write { queueWrite() }
    }

    /// On the loop: queues this turn's write for records appended here for a round of another loop (a
    /// pipelined batch that a connection there sent to this loop's shard), when they are not durable
    /// yet. This loop writes them with its own rounds' records, in one sync, and the connection's loop
    /// only waits (``wait(for:_:write:)``): were both to write, each would find the other's write
    /// under way and leave the rest to the journal's thread, which would then sync back to back in
    /// small batches, every sync costing CPU the loops share.
    func writeSoon(through lsn: UInt64) {
        loop.assertInEventLoop()
        guard journal.lastDurableLSN < lsn else { return }
        queueWrite()
    }

    private func queueWrite() {
        if !writeQueued {
            writeQueued = true
            // Runs after this turn's reads: one write and one sync for every round they started.
            loop.execute { self.writeAndAnswer() }
        }
    }

    /// On the loop: writes what is pending (unless another writer is at it) and answers what is durable.
    private func writeAndAnswer() {
        writeQueued = false
        writingHere = true
        journal.writeAsCaller()
        writingHere = false
        drain()
    }

    /// The journal's observer (on whichever thread wrote the batch): queues one drain on the loop when
    /// something here waits for a position at or before `lsn`, or when nothing will become durable any
    /// more.
    func durable(_ lsn: UInt64) {
        guard lowestWaiting.load(ordering: .sequentiallyConsistent) <= lsn || journal.terminalReason != nil else { return }
        // `writingHere` is read only on the loop's own thread, where it is written.
        if loop.inEventLoop && writingHere { return }
        guard !drainQueued.exchange(true, ordering: .acquiringAndReleasing) else { return }
        loop.execute { self.drain() }
    }

    /// On the loop: answers every round whose position is durable (or all of them, once the log
    /// failed or closed), until a pass finds none.
    private func drain() {
        drainQueued.store(false, ordering: .sequentiallyConsistent)
        while !waiting.isEmpty {
            let durable = journal.lastDurableLSN
            let reason = journal.terminalReason
            // Taken, not borrowed: an answer may start another drain (``wait(for:_:)``).
            var ready = spareReady
            spareReady = []
            var lowest = UInt64.max
            waiting.removeAll { entry in
                if entry.lsn <= durable || reason != nil {
                    ready.append(entry)
                    return true
                }
                lowest = min(lowest, entry.lsn)
                return false
            }
            lowestWaiting.store(lowest, ordering: .sequentiallyConsistent)
            for entry in ready { entry.waiter.durableReached(entry.lsn <= durable ? nil : reason) }
            let answered = !ready.isEmpty
            if ready.capacity <= Self.spareReadyMax {
                ready.removeAll(keepingCapacity: true)
                spareReady = ready
            }
            // Stop when nothing left is durable now; a sync after this store queues the next drain.
            if !answered && journal.lastDurableLSN < lowestWaiting.load(ordering: .sequentiallyConsistent)
                && journal.terminalReason == nil
            {
                break
            }
        }
    }

    /// The log started again (a node rejoining a primary): every round waiting here waits for a
    /// position of the old log, and is answered with `reason` (on the loop).
    func logRestarted(_ reason: String) {
        loop.execute {
            let all = self.waiting
            self.waiting = []
            self.lowestWaiting.store(.max, ordering: .sequentiallyConsistent)
            for entry in all { entry.waiter.durableReached(reason) }
        }
    }

    private final class ClosureWaiter: DurableWaiter {
        let answer: (String?) -> Void
        init(_ answer: @escaping (String?) -> Void) { self.answer = answer }
        func durableReached(_ failure: String?) { answer(failure) }
    }

    /// Rounds waiting (for tests and INFO).
    var waitingCount: Int {
        loop.assertInEventLoop()
        return waiting.count
    }
}
