import Foundation
import StockadeCore
import Synchronization

/// When the log is forced to disk, and so what a crash can take back.
public enum FsyncPolicy: String, Sendable, CaseIterable {
    /// fdatasync after every group-commit batch, before any caller in it is answered: a crash loses
    /// nothing that was acknowledged. The default.
    case always
    /// Answer after write(); fdatasync at most once a second: a machine crash loses up to a second of
    /// acknowledged changes, a process crash loses nothing (the kernel has the pages).
    case everysec
    /// Answer after write(), never fdatasync (the kernel flushes when it likes): a machine crash loses
    /// whatever the kernel had not flushed.
    case none
}

/// The write-ahead log: shards append encoded records; a batch of them is framed into LZ4 blocks,
/// written with one write and one fdatasync (group commit), and then every caller whose records the
/// batch held is answered.
///
/// Who writes a batch: the writer thread, or, with ``Options/writerWakesOnAppend`` off (the server),
/// the event loop whose replies wait for it (``writeAsCaller()``, after the loop's reads, the way Redis
/// syncs in `beforeSleep`), so a durable reply costs no hand-off to another thread and back. One batch
/// is written at a time (`writing`). A caller writes one batch; records appended meanwhile (by another
/// loop, which found the write under way) go on to the writer thread as the caller lets go, so no loop
/// spends its turn writing for the others. The writer thread writes until nothing is pending.
///
/// Its files go through the directory's ``Storage``. With ``Options/writerThread`` off there is no
/// thread: whoever drives the journal (the deterministic simulator) calls ``writePending()`` to
/// write one batch, so every interleaving is chosen by a seed.
///
/// After a write or sync fails, the journal is failed for good: ``failure`` says why, every change is
/// refused with that reason, and every caller still waiting is told its records will never be durable.
public final class Journal: ChangeLog, @unchecked Sendable {
    public struct Options: Sendable {
        public var fsync: FsyncPolicy = .always
        /// A segment file is closed and a new one started past this size: bounds the unit that
        /// snapshots let us delete.
        public var segmentBytesMax = 64 << 20
        /// The open segment's space is allocated ahead of its writes in steps of this many bytes
        /// (``StorageFile/preallocate(to:)``, zeros written), so most batches overwrite zeros already
        /// written and their fdatasync writes the batch's data and nothing else: no new file length,
        /// no blocks to mark written (on ext4 here the sync of a -P16 batch about halves against
        /// space from `fallocate`, and durable RESERVE -P16 gains about x1.3 with one loop;
        /// BENCHMARKS.md). A closed segment is cut back to its last block. 0: off, the file grows
        /// with each batch.
        public var preallocationBytes = 1 << 20
        /// Records waiting to be written, in bytes, past which changes are refused with BUSY rather
        /// than queued without limit (about a quarter-second of writes at disk speed).
        public var pendingBytesMax = 32 << 20
        /// Run the writer on its own thread (the server). Off: nothing is written until the owner
        /// calls ``Journal/writePending()`` (deterministic tests and the simulator).
        public var writerThread = true
        /// An append wakes the writer thread (on by default). Off (the server): appends leave their
        /// records pending for whoever waits for them; an event loop writes them itself
        /// (``Journal/writeAsCaller()``), and the writer thread wakes for a ``Journal/waitDurable(_:)``,
        /// a ``Journal/requestWrite()``, or records piling up past ``leaderlessBytesMax``.
        public var writerWakesOnAppend = true
        /// With ``writerWakesOnAppend`` off: pending bytes past which an append wakes the writer
        /// anyway, so records that nobody waits for (expiry) cannot fill the pending buffer.
        public var leaderlessBytesMax = 1 << 20
        /// A batch whose write and sync took longer than this (a slow or stalled disk) sends the
        /// callers' batches to the writer thread until one takes less again: while a loop syncs, its
        /// other clients (PING and INFO too) wait, so a slow disk may hold a loop for one sync, not
        /// for every one.
        public var callerWriteNanosMax: UInt64 = 10_000_000
        /// Raw bytes of the newest records kept in memory for readers at the end of the log
        /// (``LogTail``); 0: none, every read goes to the files.
        public var tailBytesMax = 4 << 20
        public init() {}
    }

    /// Group-commit figures since start, for metrics and benchmarks.
    public struct Stats: Sendable {
        public var batches = 0
        public var blocks = 0
        public var records = 0
        public var rawBytes = 0
        public var writtenBytes = 0
        /// fdatasyncs that made records durable: the policy's, and those made whatever it (a full
        /// segment before the next starts, the writer's last act, a rebase).
        public var syncs = 0
        public var syncNanosTotal: UInt64 = 0
        public var syncNanosMax: UInt64 = 0
        public init() {}
    }

    public let directory: DataDirectory
    public let shardCount: Int
    public let options: Options
    /// Where blocks start in the segments, for the readers of this log (``LogReader``); forgotten
    /// when the log starts again (``rebase(to:)``, ``restart(at:)``).
    public let blockIndex = BlockIndex()
    /// The newest records, for readers at the end of the log (``LogTail``): added as each batch is
    /// written, emptied when the log starts again, cut when segments are removed.
    public let tail: LogTail

    // Guarded by `mutex`.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var pending: [UInt8] = []
    private var spare: [UInt8] = []
    private var pendingRecords = 0
    private var pendingFirstLSN: UInt64
    private var appendedLSN: UInt64
    private var durableLSN: UInt64
    private var waiters: [(lsn: UInt64, continuation: CheckedContinuation<Bool, Never>)] = []
    private var waitingHook: (@Sendable () -> Void)?
    /// A batch is being written, by the writer thread or a caller (``writeAsCaller()``): the segment,
    /// the framing buffers and the sync state below belong to whoever set it.
    private var writing = false
    /// Someone asked the writer thread to write what is pending (a ``waitDurable(_:)``, a
    /// ``requestWrite()``, pending bytes past ``Options/leaderlessBytesMax``, or an append when
    /// ``Options/writerWakesOnAppend`` is on).
    private var writeRequested = false
    /// The writer thread waits for a caller's write to end (``writing``) before it acts.
    private var writerWaitsForCaller = false
    private var failed: String?
    private var stopping = false
    private var closed = false
    private var writerFinished = false
    private var stats = Stats()
    private var segments: [(firstLSN: UInt64, path: String)]
    private var observers: [@Sendable (UInt64) -> Void] = []
    private var batchObservers: [@Sendable (_ records: Int, _ syncNanos: UInt64) -> Void] = []
    /// A ``rebase(to:)`` or ``restart(at:)`` asked of the writer: the position to start again after,
    /// and whether every segment goes (a restart, which may go back).
    private var rebaseTo: (lsn: UInt64, startOver: Bool)?
    private var rebaseError: JournalError?
    private let rebased = DispatchSemaphore(value: 0)

    // Mirrors of guarded state, read without the lock on every shard run and every reply.
    /// ``durableLSN``, stored after it changes (sequentially consistent: see ``onDurable(_:)``).
    private let durableMirror: Atomic<UInt64>
    /// ``pending``'s byte count.
    private let pendingMirror = Atomic<Int>(0)
    /// ``failed`` is set.
    private let failedMirror = Atomic<Bool>(false)
    /// The last batch's write and sync took longer than ``Options/callerWriteNanosMax``: callers leave
    /// the writing to the writer thread (``writeAsCaller()``) until a batch is fast again.
    private let diskSlow = Atomic<Bool>(false)
    /// The writer has finished (closed or failed): nothing more becomes durable.
    private let finishedMirror = Atomic<Bool>(false)

    // Owned by whoever holds `writing` (the writer thread, or a caller in ``writeAsCaller()``).
    private var segment: any StorageFile
    /// Where the open segment's next batch goes: the end of its last block.
    private var segmentBytes: Int
    /// The open segment's file length: `segmentBytes`, or more where space was allocated ahead
    /// (zeros past `segmentBytes`).
    private var segmentAllocated: Int
    /// False once the open segment's storage refused to allocate ahead: it grows with each write.
    private var segmentPreallocates = true
    private var lastSyncNanos: UInt64 = 0
    private var unsynced = false
    private var framed: [UInt8] = []
    private let done = DispatchSemaphore(value: 0)

    /// Opens the log for appending after recovery reached `lsn`: starts a new segment there.
    public init(directory: DataDirectory, shardCount: Int, lsn: UInt64, options: Options = Options()) throws(JournalError) {
        self.directory = directory
        self.shardCount = shardCount
        self.options = options
        tail = LogTail(bytesMax: options.tailBytesMax)
        appendedLSN = lsn
        durableLSN = lsn
        durableMirror = Atomic(lsn)
        pendingFirstLSN = lsn + 1
        try directory.create()
        try Self.syncRecovered(directory)
        segment = try Self.startSegment(in: directory, shardCount: shardCount, firstLSN: lsn + 1).file
        segmentBytes = SegmentHeader.size
        segmentAllocated = SegmentHeader.size
        segments = try directory.segments()
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        pending.reserveCapacity(1 << 20)
        spare.reserveCapacity(1 << 20)
        framed.reserveCapacity(1 << 20)
        if options.writerThread {
            let thread = Thread { [self] in self.writerLoop() }
            thread.name = "stockade-journal"
            thread.start()
        }
    }

    /// Syncs every segment already in the directory, and the directory itself. What recovery read may
    /// be in the page cache only: a process killed between a write and its sync leaves its bytes
    /// there, and recovery reads them back. They are made durable before the recovered position counts
    /// as durable (a reply may show their state at once, a sold-out answer included) and before a new
    /// segment starts after them (a power cut would otherwise take them back and leave a gap in front of
    /// the new segment that no restart can pass, stranding what was acknowledged after the restart).
    /// A sync of a segment already on the medium costs little: nothing of it is dirty.
    private static func syncRecovered(_ directory: DataDirectory) throws(JournalError) {
        for segment in try directory.segments() {
            let file = try directory.storage.open(segment.path, .read)
            defer { file.close() }
            try file.dataSync()
        }
        try directory.storage.syncDirectory(directory.path)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(wake)
        mutex.deallocate()
        wake.deallocate()
    }

    @inline(__always) private func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    // MARK: ChangeLog

    public func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 {
        pthread_mutex_lock(mutex)
        if let failed {
            pthread_mutex_unlock(mutex)
            throw .unavailable(failed)
        }
        if stopping {
            pthread_mutex_unlock(mutex)
            throw .unavailable("the journal is closed")
        }
        if pendingRecords == 0 { pendingFirstLSN = appendedLSN + 1 }
        pending.append(contentsOf: records.bytes)
        pendingMirror.store(pending.count, ordering: .relaxed)
        pendingRecords += records.count
        appendedLSN += UInt64(records.count)
        let lsn = appendedLSN
        if options.writerWakesOnAppend || pending.count >= options.leaderlessBytesMax {
            writeRequested = true
            pthread_cond_signal(wake)
        }
        pthread_mutex_unlock(mutex)
        return lsn
    }

    public func waitDurable(_ lsn: UInt64) async throws(Rejection) {
        let ok: Bool = await withCheckedContinuation { continuation in
            pthread_mutex_lock(mutex)
            if durableLSN >= lsn {
                pthread_mutex_unlock(mutex)
                continuation.resume(returning: true)
            } else if failed != nil || writerFinished {
                pthread_mutex_unlock(mutex)
                continuation.resume(returning: false)
            } else {
                waiters.append((lsn, continuation))
                // The writer thread writes for a task that waits (no loop writes for it).
                writeRequested = true
                pthread_cond_signal(wake)
                let hook = waitingHook
                pthread_mutex_unlock(mutex)
                hook?()
            }
        }
        if !ok { throw .unavailable(locked { failed ?? (writerFinished ? "the journal is closed" : Self.restartedReason) }) }
    }

    /// Why a wait ended that ``restart(at:)`` made meaningless: its position is of the old log.
    public static let restartedReason = "the log started again (this node rejoined a primary): the position waited for is not in it"

    /// false while the records waiting to be written are over ``Options/pendingBytesMax`` (retry
    /// later), and for good once the journal failed (see ``failure``, which tells the two apart).
    public var admitsChanges: Bool {
        pendingMirror.load(ordering: .relaxed) < options.pendingBytesMax && !failedMirror.load(ordering: .acquiring)
    }

    // MARK: State for operators

    public var lastAppendedLSN: UInt64 { locked { appendedLSN } }
    public var lastDurableLSN: UInt64 { durableMirror.load(ordering: .sequentiallyConsistent) }
    /// Why the journal stopped accepting changes: set once, by the first write or sync that failed,
    /// and never cleared (only a restart, with recovery, brings the log back). nil while healthy.
    /// Read synchronously, from any thread: every shard checks it to refuse with this reason
    /// (`UNAVAILABLE`) rather than `BUSY`.
    public var failure: String? { failedMirror.load(ordering: .acquiring) ? locked { failed } : nil }
    /// The same as ``failure`` (the name INFO's code uses).
    public var failureReason: String? { failure }
    public var statistics: Stats { locked { stats } }
    /// Bytes of records appended but not yet written.
    public var pendingBytes: Int { locked { pending.count } }

    /// Writes and syncs what is pending, stops the writer, and closes the segment. Calling it again
    /// does nothing; appends afterwards are refused.
    public func close() {
        let first = locked { () -> Bool in
            defer { closed = true }
            stopping = true
            pthread_cond_signal(wake)
            return !closed
        }
        guard first else { return }
        if options.writerThread {
            done.wait()
        } else {
            while locked({ pendingRecords > 0 && failed == nil }) { writeOnce() }
            finishWriter()
        }
        // Anyone still waiting (records appended after a failure or the close) is told no.
        failWaiters()
    }

    /// Calls `body` (on the caller's thread, outside the journal's lock) each time a caller starts
    /// waiting for a position that is not durable yet: a deterministic driver in manual mode learns
    /// that a reply is parked and can decide when to ``writePending()``.
    public func onWaiting(_ body: @escaping @Sendable () -> Void) { locked { waitingHook = body } }

    /// Why nothing more will become durable: the failure, or "the journal is closed" once the writer has
    /// finished; nil while records can still become durable.
    public var terminalReason: String? {
        if let failure { return failure }
        return finishedMirror.load(ordering: .sequentiallyConsistent) ? "the journal is closed" : nil
    }

    /// Calls `observer` (on the writer's thread, outside the journal's lock) after each batch becomes
    /// durable, with the new durable position, and once more when the journal fails or closes (see
    /// ``terminalReason``). Register observers before any traffic.
    ///
    /// This is how a server answers many waiting clients with one hand-off per sync: an observer wakes
    /// its event loop once, and the loop answers everything that waited for a position now durable.
    /// The durable position is stored before observers run, with sequentially consistent ordering, so
    /// a waiter that publishes itself and then reads ``lastDurableLSN`` (also sequentially consistent)
    /// either sees its position durable or is seen by the observer.
    public func onDurable(_ observer: @escaping @Sendable (UInt64) -> Void) { locked { observers.append(observer) } }

    /// Calls `observer` (on the writer's thread, outside the journal's lock) after each batch is
    /// written, with its record count and how long its fdatasync took in nanoseconds (0 when the
    /// policy did not sync it), and after each sync of records written earlier (records 0): the
    /// policy's later sync (`everysec`), and the syncs made whatever the policy (a full segment
    /// before the next starts, the writer's last act, a rebase). One call per event, not a sample:
    /// what a latency histogram needs; ``statistics`` counts the same syncs. Register observers
    /// before any traffic.
    public func onBatch(_ observer: @escaping @Sendable (_ records: Int, _ syncNanos: UInt64) -> Void) {
        locked { batchObservers.append(observer) }
    }

    private func notifyObservers() {
        let (list, lsn) = locked { (observers, durableLSN) }
        for observer in list { observer(lsn) }
    }

    /// Callers waiting for a position that is not durable yet.
    public var waiterCount: Int { locked { waiters.count } }

    /// Manual mode (``Options/writerThread`` off): writes everything appended so far as one batch
    /// (framing, one write, the sync the policy asks for), answers its waiters, and returns the
    /// number of records written; 0 when nothing was pending or the journal has failed.
    @discardableResult
    public func writePending() -> Int {
        precondition(!options.writerThread, "writePending() is for a journal without a writer thread")
        guard locked({ failed == nil && !closed }) else { return 0 }
        return writeOnce()
    }

    /// Removes segments whose every record is at or before `lsn` (covered by a snapshot), keeping
    /// the newest `keep` of those and never the one being written.
    public func removeSegments(coveredThrough lsn: UInt64, keep: Int) throws(JournalError) -> [String] {
        let list = locked { segments }
        var covered: [String] = []
        for (i, s) in list.enumerated() where i + 1 < list.count && list[i + 1].firstLSN <= lsn + 1 {
            covered.append(s.path)
        }
        let doomed = Array(covered.dropLast(max(0, keep)))
        // What the files will no longer hold is not read from memory either, from before the first
        // file goes (and whether or not the removal then fails): such a read is TRIMMED.
        if let oldest = list.first(where: { !doomed.contains($0.path) })?.firstLSN, !doomed.isEmpty {
            tail.drop(below: oldest)
        }
        for path in doomed { try directory.storage.remove(path) }
        if !doomed.isEmpty {
            try directory.storage.syncDirectory(directory.path)
            locked { segments.removeAll { doomed.contains($0.path) } }
        }
        return doomed
    }

    /// A replica that received a full copy (a primary's snapshot at `lsn`) continues its log from
    /// there: the current segment is synced and closed, and a new one starts at `lsn + 1`; the
    /// positions appended and durable become `lsn`. Nothing may be pending (the replica's link is the
    /// only writer and waits for durability first). Older segments are left for the caller to remove
    /// (``removeSegments(coveredThrough:keep:)``) once the snapshot is in place.
    public func rebase(to lsn: UInt64) throws(JournalError) {
        if locked({ durableLSN == lsn && appendedLSN == lsn && pendingRecords == 0 }) { return }
        guard locked({ lsn >= durableLSN }) else {
            throw JournalError(.io, "the log cannot continue at \(lsn), below its durable position \(lastDurableLSN) (see restart(at:))")
        }
        try startAgain(after: lsn, startOver: false)
    }

    /// Starts the log again after `lsn`, which may be below the durable position: a node whose log
    /// went another way from its primary's takes the primary's history instead. Every segment still
    /// in the directory is removed (the caller moves those it keeps out first:
    /// ``DataDirectory/setAside(into:)``, which also makes the change crash-safe), the open one is
    /// synced and closed, a new segment starts at `lsn + 1`, and the positions appended and durable
    /// become `lsn`. Nothing may be pending. Waits for positions of the old log end
    /// (``waitDurable(_:)`` throws ``Rejection/unavailable(_:)``); observers are called with `lsn`.
    public func restart(at lsn: UInt64) throws(JournalError) {
        try startAgain(after: lsn, startOver: true)
        // Waits for positions of the old log can never be answered truly: they end now.
        failWaiters()
    }

    /// ``rebase(to:)`` and ``restart(at:)``: hands the writer the new start and waits until it is there.
    private func startAgain(after lsn: UInt64, startOver: Bool) throws(JournalError) {
        let ready: Bool = locked {
            guard failed == nil, !closed, pendingRecords == 0, appendedLSN == durableLSN, rebaseTo == nil else { return false }
            if options.writerThread {
                rebaseTo = (lsn, startOver)
                pthread_cond_signal(wake)
            }
            return true
        }
        guard ready else { throw JournalError(.io, "the log cannot start again at \(lsn): records are pending, or it failed or closed") }
        if options.writerThread {
            rebased.wait()
        } else {
            writerStartAgain(after: lsn, startOver: startOver)
        }
        if let error = locked({ rebaseError }) {
            locked { rebaseError = nil }
            throw error
        }
        notifyObservers()
    }

    /// Creates the segment starting at `firstLSN` with its header, synced, and its directory entry
    /// synced: where the log starts at open and after ``rebase(to:)``.
    private static func startSegment(
        in directory: DataDirectory, shardCount: Int, firstLSN: UInt64
    ) throws(JournalError) -> (file: any StorageFile, path: String) {
        let path = directory.segmentPath(firstLSN: firstLSN)
        let file = try directory.storage.open(path, .create)
        try file.write(SegmentHeader(shardCount: shardCount, firstLSN: firstLSN).encode(), at: 0)
        try file.dataSync()
        try directory.storage.syncDirectory(directory.path)
        return (file, path)
    }

    /// The writer's side of ``rebase(to:)`` and ``restart(at:)``.
    private func writerStartAgain(after lsn: UInt64, startOver: Bool) {
        // Segments may be removed and one of the same name started: what the readers learned of the
        // old ones is forgotten before, and again after, so a read in between learns nothing.
        blockIndex.reset()
        tail.reset()
        defer {
            blockIndex.reset()
            tail.reset()
        }
        do throws(JournalError) {
            try closeSegment()
            if startOver {
                // No record of the old log may stay where recovery would replay it.
                let left = try directory.segments()
                for old in left { try directory.storage.remove(old.path) }
                if !left.isEmpty { try directory.storage.syncDirectory(directory.path) }
                locked { segments = [] }
            }
            let (file, path) = try Self.startSegment(in: directory, shardCount: shardCount, firstLSN: lsn + 1)
            segment = file
            segmentBytes = SegmentHeader.size
            segmentAllocated = SegmentHeader.size
            segmentPreallocates = true
            locked {
                segments.removeAll { $0.firstLSN == lsn + 1 }
                segments.append((lsn + 1, path))
                appendedLSN = lsn
                durableLSN = lsn
                pendingFirstLSN = lsn + 1
                durableMirror.store(lsn, ordering: .sequentiallyConsistent)
                rebaseTo = nil
            }
        } catch {
            fail("\(error)")
            locked { rebaseError = error; rebaseTo = nil }
        }
        if options.writerThread { rebased.signal() }
    }

    // MARK: Writer thread

    private func writerLoop() {
        while true {
            pthread_mutex_lock(mutex)
            while !(stopping || failed != nil || rebaseTo != nil || (pendingRecords > 0 && writeRequested)) {
                // `everysec` syncs what earlier batches left unsynced once a second (writeOnce checks).
                if options.fsync == .everysec {
                    var deadline = timespec()
                    clock_gettime(CLOCK_REALTIME, &deadline)
                    deadline.tv_sec += 1
                    if pthread_cond_timedwait(wake, mutex, &deadline) == ETIMEDOUT { break }
                } else {
                    pthread_cond_wait(wake, mutex)
                }
            }
            // A caller is writing: it lets go with nothing pending (or for the cases below), then wakes us.
            while writing {
                writerWaitsForCaller = true
                pthread_cond_wait(wake, mutex)
            }
            writerWaitsForCaller = false
            writeRequested = false
            writing = true
            let exit = failed != nil || (stopping && pendingRecords == 0)
            let rebase = pendingRecords == 0 ? rebaseTo : nil
            pthread_mutex_unlock(mutex)
            if let rebase, !exit {
                writerStartAgain(after: rebase.lsn, startOver: rebase.startOver)
                locked { writing = false }
                continue
            }
            if exit {
                if locked({ rebaseTo != nil }) {
                    locked { rebaseError = JournalError(.io, failed ?? "the log is closing"); rebaseTo = nil }
                    rebased.signal()
                }
                finishWriter()
                locked { writing = false }
                done.signal()
                return
            }
            writeUntilDrained()
        }
    }

    /// Writes what is pending on the calling thread: an event loop, after its reads, for the replies
    /// it holds until their records are durable (with ``Options/writerWakesOnAppend`` off). Returns at
    /// once when nothing is pending, or when another write is under way: whoever runs it writes these
    /// records, or hands them on to the writer thread as it lets go (``writeUntilDrained(byCaller:)``).
    /// Closing, a failure and starting again are the writer thread's.
    public func writeAsCaller() {
        guard options.writerThread else { return }
        if diskSlow.load(ordering: .relaxed) {
            requestWrite()
            return
        }
        pthread_mutex_lock(mutex)
        guard !writing, pendingRecords > 0, failed == nil, !stopping, rebaseTo == nil else {
            pthread_mutex_unlock(mutex)
            return
        }
        writing = true
        pthread_mutex_unlock(mutex)
        writeUntilDrained(byCaller: true)
    }

    /// Asks the writer thread to write what is pending, if anything is (the server's housekeeping
    /// tick, for records that nobody waits for).
    public func requestWrite() {
        guard options.writerThread, pendingMirror.load(ordering: .relaxed) > 0 else { return }
        locked {
            writeRequested = true
            pthread_cond_signal(wake)
        }
    }

    /// Holding `writing`: writes a batch, and (the writer thread) more until nothing is pending, then
    /// lets go of it. The check and the release are one step under the lock: a record appended before
    /// the release is written here or handed on (a caller's write wakes the writer thread for what was
    /// appended meanwhile), and one appended after it is its appender's to have written. Leaves what
    /// the writer thread must do (closing, a failure, starting again) to it, and wakes it.
    private func writeUntilDrained(byCaller: Bool = false) {
        while true {
            writeOnce()
            pthread_mutex_lock(mutex)
            if !byCaller && pendingRecords > 0 && failed == nil && !stopping && rebaseTo == nil {
                pthread_mutex_unlock(mutex)
                continue
            }
            writing = false
            if writerWaitsForCaller || stopping || rebaseTo != nil || failed != nil || pendingRecords > 0 {
                writeRequested = true
                pthread_cond_signal(wake)
            }
            pthread_mutex_unlock(mutex)
            return
        }
    }

    /// The writer's last act: sync what the policy left unsynced, cut the segment back to its last
    /// block, close it. A failed log is left as it is for recovery to read.
    private func finishWriter() {
        if locked({ failed == nil }) {
            do { try closeSegment() } catch { fail("\(error)") }
        }
        segment.close()
        locked { writerFinished = true }
        finishedMirror.store(true, ordering: .sequentiallyConsistent)
    }

    /// Takes everything pending and writes it as one batch; with nothing pending, syncs if the
    /// policy is due. Returns the number of records written. Only by whoever holds `writing` (or the
    /// manual driver).
    @discardableResult
    private func writeOnce() -> Int {
        pthread_mutex_lock(mutex)
        swap(&pending, &spare)
        pendingMirror.store(0, ordering: .relaxed)
        let firstLSN = pendingFirstLSN
        let count = pendingRecords
        pendingRecords = 0
        pthread_mutex_unlock(mutex)
        do {
            guard count > 0 else {
                let synced = try syncIfDue()
                if synced > 0 { recordSync(synced) }
                return 0
            }
            framed.removeAll(keepingCapacity: true)
            let blocks = frame(spare, firstLSN: firstLSN, into: &framed)
            let started = monotonicNanos()
            try writeBatch(framed, firstLSN: firstLSN)
            // Kept for readers before the batch is published as durable: a copy of exactly its bytes
            // (`Array(spare[...])` would share `spare`'s whole buffer, a megabyte or more, and `spare`
            // would allocate another for the next batch).
            if tail.bytesMax > 0 { tail.add(firstLSN: firstLSN, count: count, bytes: spare.withUnsafeBytes { [UInt8]($0) }) }
            let synced = try syncIfDue()
            diskSlow.store(monotonicNanos() - started > options.callerWriteNanosMax, ordering: .relaxed)
            let rawBytes = spare.count
            spare.removeAll(keepingCapacity: spare.capacity <= 8 << 20)
            complete(
                through: firstLSN + UInt64(count) - 1, records: count, blocks: blocks, raw: rawBytes,
                written: framed.count, synced: synced)
            return count
        } catch {
            spare.removeAll(keepingCapacity: true)
            fail("\(error)")
            return 0
        }
    }

    /// Splits raw records (at record boundaries) into blocks of at most ``BlockHeader/rawBytesMax``.
    private func frame(_ raw: [UInt8], firstLSN: UInt64, into out: inout [UInt8]) -> Int {
        var blocks = 0
        raw.withUnsafeBytes { bytes in
            var start = 0
            var lsn = firstLSN
            while start < bytes.count {
                var end = start
                var records = 0
                while end < bytes.count {
                    let length = 3 + (Int(bytes[end + 1]) | Int(bytes[end + 2]) << 8)
                    if end + length - start > BlockHeader.rawBytesMax && records > 0 { break }
                    end += length
                    records += 1
                }
                BlockCodec.appendBlock(
                    raw: UnsafeRawBufferPointer(rebasing: bytes[start..<end]), firstLSN: lsn, recordCount: records, to: &out)
                lsn += UInt64(records)
                start = end
                blocks += 1
            }
        }
        return blocks
    }

    private func writeBatch(_ framed: [UInt8], firstLSN: UInt64) throws(JournalError) {
        if segmentBytes + framed.count > options.segmentBytesMax && segmentBytes > SegmentHeader.size {
            // Always synced, whatever the policy, and cut back to its last block: a segment that a
            // later one follows must be whole, or recovery would take its lost tail (or its
            // allocated zeros) for corruption in the middle of the log.
            try closeSegment()
            let path = directory.segmentPath(firstLSN: firstLSN)
            segment = try directory.storage.open(path, .create)
            try segment.write(SegmentHeader(shardCount: shardCount, firstLSN: firstLSN).encode(), at: 0)
            try directory.storage.syncDirectory(directory.path)
            segmentBytes = SegmentHeader.size
            segmentAllocated = SegmentHeader.size
            segmentPreallocates = true
            locked { segments.append((firstLSN, path)) }
        }
        let end = segmentBytes + framed.count
        if end > segmentAllocated {
            // Allocate a step ahead (not past the segment's bound unless this batch is): the next
            // batches' syncs then find the file's length unchanged.
            let step = options.preallocationBytes
            let target = step > 0 ? max(end, min((end + step - 1) / step * step, options.segmentBytesMax)) : end
            if target > end && segmentPreallocates {
                if try segment.preallocate(to: target) {
                    segmentAllocated = target
                } else {
                    // Not here (a file system without it, a full disk, a file size limit): this segment
                    // grows with each write. A refusal may still have grown the file partway.
                    segmentPreallocates = false
                    segmentAllocated = max(segmentAllocated, try segment.size())
                }
            }
        }
        try segment.write(framed, at: segmentBytes)
        segmentBytes = end
        segmentAllocated = max(segmentAllocated, end)
        unsynced = true
    }

    /// Makes the open segment whole and closes it: cut back to its last block where space was
    /// allocated past it, then synced (fsync, which also makes the cut length durable; fdatasync when
    /// nothing was cut and something is unsynced).
    private func closeSegment() throws(JournalError) {
        if segmentAllocated > segmentBytes {
            try segment.truncate(to: segmentBytes)
            segmentAllocated = segmentBytes
            try syncSegmentNow(full: true)
        } else if unsynced {
            try syncSegmentNow()
        }
        segment.close()
    }

    /// An fdatasync (an fsync when `full`) of the open segment whatever the policy (a segment that
    /// another follows, the writer's last act, a rebase), counted and observed as every sync of
    /// records is.
    private func syncSegmentNow(full: Bool = false) throws(JournalError) {
        let start = monotonicNanos()
        if full { try segment.sync() } else { try segment.dataSync() }
        unsynced = false
        recordSync(max(1, monotonicNanos() - start))
    }

    /// Counts a sync that no batch's ``complete(through:records:blocks:raw:written:synced:)`` counts,
    /// and tells the batch observers (records 0).
    private func recordSync(_ nanos: UInt64) {
        let list = locked {
            countSync(nanos)
            return batchObservers
        }
        for observer in list { observer(0, nanos) }
    }

    /// Adds one sync to ``statistics``. Called with the lock held.
    private func countSync(_ nanos: UInt64) {
        stats.syncs += 1
        stats.syncNanosTotal += nanos
        stats.syncNanosMax = max(stats.syncNanosMax, nanos)
    }

    /// fdatasync as the policy asks; returns the nanoseconds it took (0 when it did not sync).
    private func syncIfDue() throws(JournalError) -> UInt64 {
        guard unsynced else { return 0 }
        let now = monotonicNanos()
        switch options.fsync {
        case .always: break
        case .everysec: guard now - lastSyncNanos >= 1_000_000_000 else { return 0 }
        case .none: return 0
        }
        try segment.dataSync()
        let end = monotonicNanos()
        lastSyncNanos = end
        unsynced = false
        return max(1, end - now)
    }

    private func complete(through lsn: UInt64, records: Int, blocks: Int, raw: Int, written: Int, synced: UInt64) {
        var ready: [CheckedContinuation<Bool, Never>] = []
        let batchList = locked {
            durableLSN = lsn
            durableMirror.store(lsn, ordering: .sequentiallyConsistent)
            stats.batches += 1
            stats.blocks += blocks
            stats.records += records
            stats.rawBytes += raw
            stats.writtenBytes += written
            if synced > 0 { countSync(synced) }
            var kept: [(lsn: UInt64, continuation: CheckedContinuation<Bool, Never>)] = []
            for waiter in waiters {
                if waiter.lsn <= lsn { ready.append(waiter.continuation) } else { kept.append(waiter) }
            }
            waiters = kept
            return batchObservers
        }
        for observer in batchList { observer(records, synced) }
        for continuation in ready { continuation.resume(returning: true) }
        notifyObservers()
    }

    /// A write or sync failed: nothing more is accepted, and every waiter is told no.
    private func fail(_ reason: String) {
        locked {
            if failed == nil { failed = "log write failed, changes are refused until restart: \(reason)" }
            failedMirror.store(true, ordering: .sequentiallyConsistent)
            // What was appended but not written can never become durable.
            pending.removeAll(keepingCapacity: false)
            pendingMirror.store(0, ordering: .relaxed)
            pendingRecords = 0
        }
        failWaiters()
    }

    /// Answers every waiter whose position is not durable with "never".
    private func failWaiters() {
        var all: [CheckedContinuation<Bool, Never>] = []
        locked {
            all = waiters.map(\.continuation)
            waiters = []
        }
        for continuation in all { continuation.resume(returning: false) }
        notifyObservers()
    }
}
