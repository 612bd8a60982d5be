import Foundation
import Logging
import NIOCore
import NIOPosix
import StockadeCore
import StockadeJournal
import StockadeWire
import Synchronization

// Replication: a replica follows a primary's log.
//
//   replica                                   primary
//   AUTH password (when the primary has one)  -> +OK
//   REPLICATE next [LISTENING-PORT p]         -> +CONTINUE next SHARDS n EPOCH e DURABLE d CONFIRMED c
//   REPLCONF CAPA CONFIRMED                   ->
//                                             <- $n <block>  (log blocks as written: header, LZ4
//                                                 payload, CRC32C; each verified on both sides)
//                                             <- +CONFIRMED c  (the primary's confirmed position, as
//                                                 it rises: what the replica's EVENTS may serve)
//                                             <- +HEARTBEAT durable  (once a second while idle)
//   REPLACK position (durable on the replica) ->
//
// The replica verifies each block, writes its records to its own log (same positions), applies them
// through recovery's replay (``Engine/applyReplicated(_:at:)``) and acknowledges what its own log
// made durable. A broken link is retried from the replica's position; a position the primary no
// longer keeps gets -TRIMMED.

/// Bounds of the replication stream.
enum ReplicationLimits {
    /// Log bytes read and sent to a replica in one go: the most the primary holds for one replica.
    static let chunkBytes = 1 << 20
    /// A replica that leaves a chunk unread this long is cut off (it reconnects and resumes).
    static let stallSeconds: Int64 = 30
    /// An idle stream carries a heartbeat this often, so both sides see a dead link.
    static let heartbeatMillis: Int64 = 1000
    /// A replica that hears nothing from its primary this long drops the link and reconnects.
    static let silenceSeconds: UInt64 = 10
    /// Waits between attempts to reach the primary: from the first to the last, doubling.
    static let retryMillisFirst: UInt64 = 100
    static let retryMillisMax: UInt64 = 2000
    /// The replica's unparsed input: a block is at most a header and 4 MiB raw, compressed.
    static let inputBytesMax = 16 << 20
    /// Replica streams a primary serves at once: each may hold a chunk (and the socket's buffers),
    /// so they are bounded like clients are; real deployments have a handful.
    static let replicasMax = 16
    /// The largest full copy a replica accepts: far above any state this engine holds in memory
    /// (a snapshot is a compressed image of it), far below what would fill a disk by mistake.
    static let fullCopyBytesMax = 64 << 30
    /// Logs set aside (`diverged-*`) a node keeps before it refuses to start over again: each holds a
    /// whole former log, and a node that keeps being refused (a flapping cluster, a peer that lies)
    /// must not fill its disk with them. Past it the link stops until an operator removes some.
    static let setAsideMax = 8
}

/// What a server knows of replication: its role, its replicas (on a primary) and its link (on a
/// replica). For ROLE and INFO replication.
final class ReplicationState: Sendable {
    struct Replica: Sendable {
        var address: String
        var listeningPort: Int
        /// The last position the replica said its log made durable.
        var ackedLSN: UInt64
        var lastAckNanos: UInt64
        /// Set when the replica asked for this node's confirmed position (`REPLCONF CAPA CONFIRMED`):
        /// called when it rises (``confirmedRaised()``).
        var confirmedListener: (@Sendable () -> Void)?
        /// Closes the replica's stream (a newer stream of the same replica replaced it).
        var close: (@Sendable () -> Void)? = nil
    }

    struct Link: Sendable {
        var host: String
        var port: Int
        /// connect, connecting, sync, connected (Redis's words for master_link_status).
        var state = "connect"
        var lastIONanos: UInt64 = 0
        /// The primary's durable position, as its last message said.
        var primaryDurableLSN: UInt64 = 0
        /// The primary's confirmed position, as its last message said (`+CONTINUE ... CONFIRMED c`,
        /// `+CONFIRMED c`); nil while this link has not heard one (a primary of an older build).
        var primaryConfirmedLSN: UInt64?
        /// When this replica last had everything the primary had made durable.
        var caughtUpNanos: UInt64 = 0
        var lastError = ""
        var linksMade = 0
    }

    /// Someone waiting until `count` replicas acknowledged `position` (WAIT, semi-synchronous changes).
    private struct AckWaiter {
        var position: UInt64
        var count: Int
        var deadlineNanos: UInt64
        var done: @Sendable (Int) -> Void
    }

    private struct State {
        var replicas: [Int: Replica] = [:]
        var nextReplicaID = 0
        var link: Link?
        /// Waiters by the count they wait for, each list sorted by position: those an acknowledgement
        /// satisfies are a prefix, so an acknowledgement costs what it answers, not every waiter.
        var waiters: [Int: [AckWaiter]] = [:]
        /// The earliest deadline of any waiter: the tick scans only when one is due.
        var earliestDeadlineNanos = UInt64.max
        var closed = false
        var rejoin = Rejoin()

        func acknowledged(_ position: UInt64) -> Int { replicas.values.reduce(0) { $0 + ($1.ackedLSN >= position ? 1 : 0) } }

        /// The highest position at least `count` replicas have acknowledged (0 with fewer connected).
        func acknowledgedPosition(by count: Int) -> UInt64 {
            guard count > 0 else { return .max }
            guard replicas.count >= count else { return 0 }
            return replicas.values.map(\.ackedLSN).sorted(by: >)[count - 1]
        }

        mutating func add(_ waiter: AckWaiter) {
            var list = waiters[waiter.count, default: []]
            if let last = list.last, last.position > waiter.position {
                // Rare (positions mostly grow): insert in order.
                let at = list.firstIndex { $0.position > waiter.position } ?? list.count
                list.insert(waiter, at: at)
            } else {
                list.append(waiter)
            }
            waiters[waiter.count] = list
            earliestDeadlineNanos = min(earliestDeadlineNanos, waiter.deadlineNanos)
        }

        /// Takes the waiters the acknowledgements now satisfy.
        mutating func satisfied() -> [(@Sendable (Int) -> Void, Int)] {
            let acks = replicas.values.map(\.ackedLSN).sorted(by: >)
            var ready: [(@Sendable (Int) -> Void, Int)] = []
            for (count, list) in waiters where count >= 1 && count <= acks.count {
                let threshold = acks[count - 1]  // the count-th highest acknowledged position
                let taken = list.prefix { $0.position <= threshold }
                guard !taken.isEmpty else { continue }
                for waiter in taken { ready.append((waiter.done, acks.prefix { $0 >= waiter.position }.count)) }
                let rest = Array(list.dropFirst(taken.count))
                waiters[count] = rest.isEmpty ? nil : rest
            }
            return ready
        }
    }

    /// What this node's starts over did (``ReplicaLink``'s rejoin), for INFO replication.
    struct Rejoin: Sendable {
        /// Starts over since the process started.
        var count = 0
        /// Where the last one kept the old files.
        var lastDirectory = ""
        /// The old log's last position, and the first one the primary did not have (at or before).
        var lastPreviousLSN: UInt64 = 0
        var lastDivergedFrom: UInt64 = 0
        /// Between a start over and the first link that follows the primary after it: the state is
        /// empty or a copy being put in place, so an election must not count on it.
        var inProgress = false
    }

    private let state = Mutex(State())

    var rejoin: Rejoin { state.withLock { $0.rejoin } }

    func updateRejoin(_ body: (inout Rejoin) -> Void) { state.withLock { body(&$0.rejoin) } }

    /// Registers a replica's stream; returns its id, or nil when ``ReplicationLimits/replicasMax``
    /// streams are open.
    /// A replica that names its listening port is known by its address and that port: a new stream
    /// of it replaces (and closes) an older one that is still open (a link the replica gave up on,
    /// which the primary has not seen close), so one replica never counts twice towards
    /// `--min-replicas-to-write` or WAIT.
    func addReplica(_ replica: Replica) -> Int? {
        let (id, replaced): (Int?, [@Sendable () -> Void]) = state.withLock { s in
            var replaced: [@Sendable () -> Void] = []
            if replica.listeningPort > 0 {
                for (old, other) in s.replicas where other.address == replica.address && other.listeningPort == replica.listeningPort {
                    s.replicas[old] = nil
                    if let close = other.close { replaced.append(close) }
                }
            }
            guard s.replicas.count < ReplicationLimits.replicasMax else { return (nil, replaced) }
            defer { s.nextReplicaID += 1 }
            s.replicas[s.nextReplicaID] = replica
            return (s.nextReplicaID, replaced)
        }
        for close in replaced { close() }
        return id
    }

    /// The highest position at least `count` replicas have acknowledged (0 with fewer connected).
    func acknowledgedPosition(by count: Int) -> UInt64 {
        state.withLock { $0.acknowledgedPosition(by: count) }
    }

    /// The confirmed position of a semi-synchronous node (`--min-replicas-to-write N`), the last one
    /// EVENTS serves (``ServerContext/eventsLimit``): the highest position ``eventsReplicas``
    /// replicas acknowledged while this node follows nobody, or that a link to a primary vouched for
    /// (``ServerContext/confirmEvents(through:)``: the primary's own confirmed position). It only
    /// grows, but for a log that starts over (``logStartedOver()``) and a new link, which keeps it
    /// only for records this log holds (``DurablePositionWatch/cap(at:)``); 0 at start. Clients
    /// blocked in EVENTS on a position durable here but not yet confirmed wait on it: woken when it
    /// is (no polling).
    let acknowledgedWatch = DurablePositionWatch()
    /// The replicas whose acknowledgement EVENTS waits for (`--min-replicas-to-write`; 0: none).
    let eventsReplicas = Atomic<Int>(0)

    /// Replica `id` has `lsn` durably. `confirming`: this node takes changes (a primary within its
    /// lease): only then does an acknowledgement raise its confirmed position.
    func acknowledged(_ id: Int, lsn: UInt64, confirming: Bool = true) {
        let needed = eventsReplicas.load(ordering: .relaxed)
        var raised = false
        let ready: [(@Sendable (Int) -> Void, Int)] = state.withLock { s in
            guard var replica = s.replicas[id] else { return [] }
            replica.ackedLSN = max(replica.ackedLSN, lsn)
            replica.lastAckNanos = monotonicNanos()
            s.replicas[id] = replica
            // Under the lock: ordered with ``logStartedOver()``, so no acknowledgement of the old
            // log confirms a position of the new one. A node that follows a primary confirms only
            // what that primary confirmed: its own replicas' acknowledgements say nothing of the
            // primary's others.
            if needed > 0, s.link == nil, confirming { raised = acknowledgedWatch.publish(s.acknowledgedPosition(by: needed)) }
            return s.satisfied()
        }
        for (done, count) in ready { done(count) }
        if raised { confirmedRaised() }
    }

    /// Replica `id` asked to hear this node's confirmed position: `listener` is called each time it
    /// rises, until the replica's stream ends.
    func listenConfirmed(_ id: Int, _ listener: @escaping @Sendable () -> Void) {
        state.withLock { s in s.replicas[id]?.confirmedListener = listener }
    }

    /// This node's confirmed position rose (a primary's link vouched for more): the replicas that
    /// listen are told.
    func confirmedRaised() {
        let listeners = state.withLock { s in s.replicas.values.compactMap(\.confirmedListener) }
        for listener in listeners { listener() }
    }

    /// This node's log started over (a rejoin): the streams of its replicas are being closed and
    /// what they acknowledged was of the old log, so they no longer count, and nothing of the new
    /// log is confirmed until the link to the primary vouches for it.
    func logStartedOver() {
        state.withLock { s in
            s.replicas = [:]
            acknowledgedWatch.restarted(at: 0)
        }
    }

    /// Shut down (``close()``).
    var isClosed: Bool { state.withLock { $0.closed } }

    /// Replicas connected now.
    var replicaCount: Int { state.withLock { $0.replicas.count } }

    /// Waiters now (INFO).
    var waiterCount: Int { state.withLock { $0.waiters.values.reduce(0) { $0 + $1.count } } }

    /// Calls `done` with the number of replicas that acknowledged `position`, once `count` have or
    /// at the deadline (``expireDue(nowNanos:)``) or shutdown (``close()``), whichever comes first.
    func whenAcknowledged(by count: Int, position: UInt64, deadlineNanos: UInt64, _ done: @escaping @Sendable (Int) -> Void) {
        let now: Int? = state.withLock { s in
            let acked = s.acknowledged(position)
            if acked >= count || s.closed { return acked }
            s.add(AckWaiter(position: position, count: count, deadlineNanos: deadlineNanos, done: done))
            return nil
        }
        if let now { done(now) }
    }

    func waitForAcknowledgements(by count: Int, position: UInt64, deadlineNanos: UInt64) async -> Int {
        await withCheckedContinuation { continuation in
            whenAcknowledged(by: count, position: position, deadlineNanos: deadlineNanos) { continuation.resume(returning: $0) }
        }
    }

    /// Answers the waiters whose time is up (the housekeeping tick); nothing to scan until one is.
    func expireDue(nowNanos: UInt64) {
        let due: [(@Sendable (Int) -> Void, Int)] = state.withLock { s in
            guard nowNanos >= s.earliestDeadlineNanos else { return [] }
            var due: [(@Sendable (Int) -> Void, Int)] = []
            var earliest = UInt64.max
            for (count, list) in s.waiters {
                var kept: [AckWaiter] = []
                for waiter in list {
                    if waiter.deadlineNanos <= nowNanos {
                        due.append((waiter.done, s.acknowledged(waiter.position)))
                    } else {
                        kept.append(waiter)
                        earliest = min(earliest, waiter.deadlineNanos)
                    }
                }
                s.waiters[count] = kept.isEmpty ? nil : kept
            }
            s.earliestDeadlineNanos = earliest
            return due
        }
        for (done, count) in due { done(count) }
    }

    /// Shutdown: every waiter is answered now, and later ones at once.
    func close() {
        let all: [(@Sendable (Int) -> Void, Int)] = state.withLock { s in
            s.closed = true
            defer { s.waiters = [:] }
            return s.waiters.values.flatMap { $0 }.map { ($0.done, s.acknowledged($0.position)) }
        }
        for (done, count) in all { done(count) }
    }

    /// A replica's stream ended. What it acknowledged stays confirmed for EVENTS
    /// (``acknowledgedWatch``): its log holds it durably, as when it said so.
    func removeReplica(_ id: Int) {
        state.withLock { _ = $0.replicas.removeValue(forKey: id) }
    }

    var replicas: [Replica] { state.withLock { s in s.replicas.keys.sorted().map { s.replicas[$0]! } } }

    var link: Link? { state.withLock { $0.link } }

    func updateLink(_ body: (inout Link) -> Void) {
        state.withLock { s in
            if var link = s.link {
                body(&link)
                s.link = link
            }
        }
    }

    func setLink(_ link: Link?) { state.withLock { $0.link = link } }
}

// MARK: Primary side

/// Streams the log to one replica over its connection, from the position it asked for: reads whole
/// verified blocks on the blocking pool, writes a chunk and waits until the socket took it before the
/// next (so a replica costs at most one chunk of memory), and waits for the durable position when
/// caught up, with a heartbeat each second. Acknowledgements (REPLACK) come back on the same socket.
final class ReplicaFeed: @unchecked Sendable {
    private let server: ServerContext
    private let channel: Channel
    private var next: UInt64
    /// nil: refused, too many replicas (``run()`` says so and closes).
    private let id: Int?
    /// The replica takes a full copy when its position is no longer kept.
    private let fullCopy: Bool
    /// The fingerprint of the replica's record before `next` (``LogReader/fingerprint(at:durable:)``).
    private let last: UInt64?
    /// The replica's newest primary term (nil: none in its log).
    private let lastTerm: EpochHistory.Term?
    /// The last position written to this stream: an acknowledgement beyond it is capped to it (a
    /// client cannot vouch for records it was never sent).
    private let sentThrough = Atomic<UInt64>(0)
    /// The replica asked for this node's confirmed position (`REPLCONF CAPA CONFIRMED`).
    private let wantsConfirmed = Atomic<Bool>(false)
    /// `+CONTINUE` went out: from then on a `+CONFIRMED` line may go between the stream's writes
    /// (never inside a full copy, whose file goes out in several).
    private let streaming = Atomic<Bool>(false)
    /// The highest confirmed position sent on this stream (``writeConfirmed(into:)``).
    private let confirmedSent = Atomic<UInt64>(0)
    /// A ``pushConfirmed()`` is queued on the channel's loop: at most one at a time.
    private let confirmedPushQueued = Atomic<Bool>(false)
    /// Bytes the replica sent (REPLACK lines); only touched on the channel's loop.
    private var input = ByteBuffer()
    private var parser = RESPParser()

    init(server: ServerContext, channel: Channel, request: ReplicaRequest) {
        self.server = server
        self.channel = channel
        self.fullCopy = request.fullCopy
        self.last = request.last
        self.lastTerm = request.lastTerm
        let from = request.from
        let listeningPort = request.listeningPort
        next = max(from, 1)
        let address = channel.remoteAddress?.ipAddress ?? "?"
        // Its position counts as acknowledged only once checked to be this log's (``run()``).
        id = server.replication.addReplica(
            .init(
                address: address, listeningPort: listeningPort, ackedLSN: 0, lastAckNanos: monotonicNanos(),
                close: { [channel] in channel.close(promise: nil) }))
    }

    /// Takes bytes the replica sent: REPLACK commands. Called on the channel's loop.
    func received(_ bytes: inout ByteBuffer) {
        input.writeBuffer(&bytes)
        while true {
            let outcome: RESPParser.Outcome
            do { outcome = try parser.next(&input) } catch {
                channel.close(promise: nil)
                return
            }
            guard case .command(let arguments) = outcome else { break }
            if let id, arguments.count == 2, Word(arguments[0]) == Word("REPLACK"),
               let lsn = arguments[1].withUnsafeReadableBytes({ RESPParser.decimal($0) }), lsn >= 0 {
                server.replication.acknowledged(
                    id, lsn: min(UInt64(lsn), sentThrough.load(ordering: .acquiring)), confirming: !server.engine.role.isReadOnly)
            } else if let id, arguments.count == 3, Word(arguments[0]) == Word("REPLCONF"), Word(arguments[1]) == Word("CAPA"),
                      Word(arguments[2]) == Word("CONFIRMED"), !wantsConfirmed.exchange(true, ordering: .acquiringAndReleasing) {
                // A replica that keeps the promise of --min-replicas-to-write N for its EVENTS: it
                // hears this node's confirmed position each time it rises. (Other words are ignored,
                // as an older primary ignores this one.)
                server.replication.listenConfirmed(id) { [weak self] in self?.pushConfirmed() }
                pushConfirmed()
            }
        }
        input.discardReadBytes()
    }

    /// Sends this node's confirmed position (``ServerContext/eventsLimit``) on its own, when it rose
    /// past what the stream carried (any thread). Coalesced: one write queued on the loop at a time,
    /// which sends the position then current.
    private func pushConfirmed() {
        guard streaming.load(ordering: .acquiring), !confirmedPushQueued.exchange(true, ordering: .acquiringAndReleasing) else { return }
        channel.eventLoop.execute {
            self.confirmedPushQueued.store(false, ordering: .releasing)
            var out = self.channel.allocator.buffer(capacity: 32)
            guard self.writeConfirmed(into: &out) else { return }
            self.channel.writeAndFlush(out, promise: nil)
        }
    }

    /// Writes `+CONFIRMED c` into `out` when the replica asked for it and `c`, this node's confirmed
    /// position now, is past what the stream carried; false when there is nothing to say. Lines may
    /// reach the replica out of order (from the loop and from the stream's task): it keeps the
    /// highest, so each says only "confirmed at least through c".
    private func writeConfirmed(into out: inout ByteBuffer) -> Bool {
        guard wantsConfirmed.load(ordering: .acquiring) else { return false }
        let confirmed = server.confirmedForReplicas
        var sent = confirmedSent.load(ordering: .relaxed)
        while confirmed > sent {
            let (exchanged, original) = confirmedSent.compareExchange(expected: sent, desired: confirmed, ordering: .relaxed)
            if exchanged {
                out.writeStaticString("+CONFIRMED ")
                out.writeString(String(confirmed))
                out.writeStaticString("\r\n")
                return true
            }
            sent = original
        }
        return false
    }

    /// Streams until the link closes or the log cannot serve the replica. Refuses a replica whose
    /// position is ahead of this log (it holds records this primary never made durable).
    func run() async {
        guard let id else {
            await send("-ERR too many replicas (at most \(ReplicationLimits.replicasMax) streams at once)\r\n", close: true)
            return
        }
        defer { server.replication.removeReplica(id) }
        let journal = server.store.journal
        let durableAtStart = journal.lastDurableLSN
        // The replica's log must be a prefix of this one. By terms first: its newest term must be one
        // of this log's, begun at the same position, and must not have ended here before the
        // replica's last record (a former primary's records of a term this log had moved on from).
        let (divergence, undecided) = server.engine.epochs.divergence(ofLogEndingAt: next - 1, lastTerm: lastTerm)
        let epoch = server.replicationEpoch.withLock { $0 }
        if let divergence {
            server.logger.warning("a replica's log is not a prefix of this one: \(divergence); refused")
            let from = Self.divergedFrom(server.engine.epochs, position: next - 1, lastTerm: lastTerm)
            await send("-DIVERGED the replica's log went another way: \(divergence)\(RefusalTail(epoch: epoch, from: from))\r\n", close: true)
            return
        }
        if undecided {
            server.logger.info("a replica's newest term is older than the terms this log keeps: compared by its last record only")
        }
        guard next <= durableAtStart + 1 else {
            await send("-ERR the replica is ahead of this primary: it asks for position \(next), this log ends at \(durableAtStart)\(RefusalTail(epoch: epoch, from: durableAtStart + 1))\r\n", close: true)
            return
        }
        // And where the logs meet, the record before `next` must be the same on both sides.
        if let last, next > 1 {
            let reader = LogReader(directory: server.store.directory, index: server.store.journal.blockIndex)
            let position = next - 1
            let ours = await withTaskExecutorPreference(server.blockingWork) { reader.fingerprint(at: position, durable: durableAtStart) }
            if let ours, ours != last {
                server.logger.warning("a replica's log diverged from this one at or before position \(position); refused")
                await send("-DIVERGED the replica's record at position \(position) is not this primary's: its log went another way (records this primary never had)\(RefusalTail(epoch: epoch, from: position))\r\n", close: true)
                return
            }
        }
        // A position the log no longer keeps: the newest snapshot first (FULLCOPY), or a refusal.
        if let oldest = try? server.store.directory.segments().first?.firstLSN, oldest > next {
            guard fullCopy else {
                server.logger.warning("a replica asked for position \(next), which the log no longer keeps (oldest \(oldest))")
                await send("-TRIMMED \(oldest) the log before position \(oldest) was removed after a snapshot; the replica needs a full copy\r\n", close: true)
                return
            }
            guard let copied = await sendFullCopy() else { return }
            next = copied + 1
        }
        // What the replica holds already (its position, or the full copy just sent) counts as sent.
        sentThrough.store(next - 1, ordering: .releasing)
        server.replication.acknowledged(id, lsn: next - 1, confirming: !server.engine.role.isReadOnly)
        // CONFIRMED: what this node's EVENTS serves (its confirmed position); a replica of this build
        // serves no further, an older one ignores the word.
        let confirmed = server.confirmedForReplicas
        confirmedSent.store(confirmed, ordering: .relaxed)
        // RUNID: this process's, so a replica can tell it reached itself (an older one ignores the word).
        guard await send("+CONTINUE \(next) SHARDS \(server.engine.shardCount) EPOCH \(epoch) DURABLE \(journal.lastDurableLSN) CONFIRMED \(confirmed) RUNID \(server.runID)\r\n") else { return }
        streaming.store(true, ordering: .releasing)
        // A REPLCONF that came before (a replica does not send it so early) is answered now.
        pushConfirmed()
        let reader = LogReader(directory: server.store.directory, index: server.store.journal.blockIndex)
        var lastSentNanos = monotonicNanos()
        var emptySinceNanos: UInt64?
        while channel.isActive {
            let durable = journal.lastDurableLSN
            if next <= durable {
                let from = next
                let read: Result<[LogReader.RawBlock], LogReader.ReadError> = await withTaskExecutorPreference(server.blockingWork) {
                    do throws(LogReader.ReadError) {
                        return .success(try reader.readBlocks(from: from, bytesMax: ReplicationLimits.chunkBytes, durable: durable))
                    } catch { return .failure(error) }
                }
                switch read {
                case .failure(.trimmed(let oldest)):
                    server.logger.warning("a replica asked for position \(from), which the log no longer keeps (oldest \(oldest))")
                    await send("-TRIMMED \(oldest) the log before position \(oldest) was removed after a snapshot; the replica needs a full copy\r\n", close: true)
                    return
                case .failure(.unreadable(let why)):
                    await send("-ERR cannot read the log: \(why)\r\n", close: true)
                    return
                case .success(let blocks) where blocks.isEmpty:
                    // The position says there is more, the files do not show it yet: try again
                    // shortly, but not for long: durable records that stay unreadable are damage.
                    let since = emptySinceNanos ?? monotonicNanos()
                    emptySinceNanos = since
                    if monotonicNanos() - since > 2_000_000_000 {
                        server.logger.error("the log does not show durable position \(from) to a replica: damaged? (see stockade inspect)")
                        await send("-ERR the primary cannot read its log at position \(from)\r\n", close: true)
                        return
                    }
                    try? await Task.sleep(for: .milliseconds(5))
                    continue
                case .success(let blocks):
                    emptySinceNanos = nil
                    var out = channel.allocator.buffer(capacity: blocks.reduce(0) { $0 + $1.bytes.count + 16 } + 32)
                    // The confirmed position rides with the blocks when it rose: on a node without
                    // --min-replicas-to-write it is the durable end, which moves with them.
                    _ = writeConfirmed(into: &out)
                    for block in blocks {
                        out.writeString("$\(block.bytes.count)\r\n")
                        out.writeBytes(block.bytes)
                        out.writeString("\r\n")
                    }
                    guard await send(out, through: blocks.last!.lastLSN) else { return }
                    next = blocks.last!.lastLSN + 1
                    lastSentNanos = monotonicNanos()
                }
                continue
            }
            let deadline = monotonicNanos() + UInt64(ReplicationLimits.heartbeatMillis) * 1_000_000
            _ = await server.eventsWaiters.wait(from: next, deadlineNanos: deadline)
            if server.eventsWaiters.isClosed { break }
            if monotonicNanos() - lastSentNanos >= UInt64(ReplicationLimits.heartbeatMillis) * 1_000_000 {
                guard await send("+HEARTBEAT \(journal.lastDurableLSN)\r\n") else { return }
                lastSentNanos = monotonicNanos()
            }
        }
        channel.close(promise: nil)
    }

    /// The first position at which a refused replica's log (ending at `position`, its newest term
    /// `lastTerm`) may differ from this one, by the terms: where its term and this log's part, or
    /// `position` when only its last record tells (the logs may part earlier).
    static func divergedFrom(_ epochs: EpochHistory, position: UInt64, lastTerm: EpochHistory.Term?) -> UInt64 {
        guard let lastTerm else { return epochs.terms.first.map { min($0.start, position) } ?? position }
        guard let index = epochs.terms.firstIndex(where: { $0.epoch == lastTerm.epoch }) else { return min(lastTerm.start, position) }
        let ours = epochs.terms[index]
        if ours.start != lastTerm.start { return min(ours.start, lastTerm.start, position) }
        if index + 1 < epochs.terms.count { return min(epochs.terms[index + 1].start, position) }
        return position
    }

    /// Sends the newest snapshot that verifies: `+FULLCOPY lsn bytes EPOCH e`, then the file as one bulk
    /// string, read and sent ``ReplicationLimits/chunkBytes`` at a time. Returns its position, or nil
    /// when the link is gone or there is no snapshot to send (the replica is told why).
    private func sendFullCopy() async -> UInt64? {
        let directory = server.store.directory
        typealias Opened = (lsn: UInt64, file: any StorageFile, size: Int)
        let opened: Result<Opened, JournalError> = await withTaskExecutorPreference(server.blockingWork) {
            do throws(JournalError) {
                for snapshot in try directory.snapshots().reversed() {
                    // Opened before it is verified: a snapshot pruned meanwhile stays readable.
                    let file = try directory.storage.open(snapshot.path, .read)
                    do throws(JournalError) {
                        try SnapshotFile.verify(snapshot.path, lsn: snapshot.lsn, storage: directory.storage)
                        return .success((snapshot.lsn, file, try file.size()))
                    } catch {
                        file.close()
                    }
                }
                return .failure(JournalError(.io, "no snapshot verifies"))
            } catch { return .failure(error) }
        }
        guard case .success(let copy) = opened else {
            if case .failure(let error) = opened {
                await send("-ERR no full copy to send: \(error.message); take a SNAPSHOT on the primary\r\n", close: true)
            }
            return nil
        }
        defer { copy.file.close() }
        server.logger.info("sending a replica a full copy: the snapshot at position \(copy.lsn), \(copy.size) bytes")
        let epoch = server.replicationEpoch.withLock { $0 }
        guard await send("+FULLCOPY \(copy.lsn) \(copy.size) EPOCH \(epoch)\r\n$\(copy.size)\r\n") else { return nil }
        var offset = 0
        while offset < copy.size {
            let count = min(ReplicationLimits.chunkBytes, copy.size - offset)
            let at = offset
            let chunk: [UInt8]? = await withTaskExecutorPreference(server.blockingWork) { try? copy.file.read(at: at, count: count) }
            guard let chunk, chunk.count == count else {
                await send("-ERR the snapshot could not be read\r\n", close: true)
                return nil
            }
            var out = channel.allocator.buffer(capacity: count)
            out.writeBytes(chunk)
            guard await send(out) else { return nil }
            offset += count
        }
        guard await send("\r\n") else { return nil }
        return copy.lsn
    }

    @discardableResult
    private func send(_ text: String, close: Bool = false) async -> Bool {
        await send(channel.allocator.buffer(string: text), close: close)
    }

    /// Writes and waits until the socket took the bytes; a replica that leaves them unread for
    /// ``ReplicationLimits/stallSeconds`` is cut off. false when the link is gone. `through`: the
    /// last position the bytes carry, counted as sent (``sentThrough``) on the channel's loop the
    /// moment the socket takes them: before the replica can read them, so before its acknowledgement
    /// (read on the same loop) can be capped below them. Counted once this task resumed, an
    /// acknowledgement that came first was capped, and the change waited for the next one, a second
    /// later at a heartbeat.
    private func send(_ buffer: ByteBuffer, through: UInt64? = nil, close: Bool = false) async -> Bool {
        let channel = self.channel
        let written = channel.eventLoop.makePromise(of: Void.self)
        if let through {
            // Attached before the write, so it runs as the promise completes, on the loop.
            written.futureResult.whenSuccess { self.sentThrough.store(through, ordering: .releasing) }
        }
        channel.writeAndFlush(buffer, promise: written)
        let stall = channel.eventLoop.scheduleTask(in: .seconds(ReplicationLimits.stallSeconds)) {
            channel.close(promise: nil)
        }
        defer { stall.cancel() }
        do { try await written.futureResult.get() } catch { return false }
        if close { try? await channel.close() }
        return !close
    }
}

// MARK: Replica side

/// Follows a primary: connects, asks for the log after this replica's position, verifies and
/// applies what comes, acknowledges what is durable here, and reconnects (from its position) when
/// the link breaks. ``stop()`` returns once nothing more will be applied.
final class ReplicaLink: Sendable {
    let host: String
    let port: Int
    private let server: ServerContext
    private let group: EventLoopGroup
    private let task = Mutex<Task<Void, Never>?>(nil)

    init(host: String, port: Int, server: ServerContext, group: EventLoopGroup) {
        self.host = host
        self.port = port
        self.server = server
        self.group = group
    }

    func start() {
        server.replication.setLink(.init(host: host, port: port))
        let task = Task { await self.follow() }
        self.task.withLock { $0 = task }
    }

    /// Stops following; returns once the link's task has ended (nothing is applied after it).
    func stop() async {
        let task = self.task.withLock { $0 }
        task?.cancel()
        await task?.value
    }

    private func follow() async {
        var retryMillis = ReplicationLimits.retryMillisFirst
        while !Task.isCancelled {
            server.replication.updateLink { $0.state = "connecting" }
            do {
                try await session()
                retryMillis = ReplicationLimits.retryMillisFirst
            } catch let error as ReplicationError where error.divergence != nil {
                do {
                    try await rejoin(error)
                } catch {
                    let message = "this node's log went another way from the primary's, and setting it aside failed (\(error)): restart it (a move begun is finished at start)"
                    server.logger.error("replication from \(host):\(port) stopped: \(message)")
                    server.replication.updateLink { $0.state = "stopped"; $0.lastError = message }
                    return
                }
                // At once: the primary is there, and this node has nothing to serve until it follows.
                retryMillis = ReplicationLimits.retryMillisFirst
                continue
            } catch let error as ReplicationError where error.fatal {
                server.logger.error("replication from \(host):\(port) stopped: \(error.message)")
                server.replication.updateLink { $0.state = "stopped"; $0.lastError = error.message }
                return
            } catch {
                if Task.isCancelled { break }
                let message = (error as? ReplicationError)?.message ?? "\(error)"
                server.logger.warning("replication link to \(host):\(port): \(message); retrying in \(retryMillis) ms")
                server.replication.updateLink { $0.lastError = message }
            }
            server.replication.updateLink { $0.state = "connect" }
            try? await Task.sleep(for: .milliseconds(Int64(retryMillis)))
            retryMillis = min(retryMillis * 2, ReplicationLimits.retryMillisMax)
        }
    }

    /// A node starting over (``rejoin(_:)``) has the primary's history once its log holds what the
    /// primary had made durable when the link began: only then is it a replica like any other (it
    /// stands for election again, and a start without --replica-of may serve it as a primary's).
    /// Returns whether the node is still starting over.
    private func endStartingOver(holding position: UInt64, primaryHad durable: UInt64?) -> Bool {
        guard let durable, position >= durable else { return true }
        server.replication.updateRejoin { $0.inProgress = false }
        do { try server.store.directory.clearStartingOver() } catch {
            server.logger.warning("could not remove \(server.store.directory.startingOverMarkerPath) (\(error)): a start as a primary will wait for REPLICAOF NO ONE")
        }
        return false
    }

    /// One connection to the primary, until it breaks or the task is cancelled.
    private func session() async throws {
        // The primary's durable end when this link began (``endStartingOver(holding:primaryHad:)``).
        var caughtUpAt: UInt64?
        // The primary's confirmed position at the handshake (`CONFIRMED c`); nil: an older build,
        // which never sends it.
        var primaryConfirmed: UInt64?
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .connect(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        let server = self.server
        let journal = server.store.journal
        let engine = server.engine
        // A link silent for ``ReplicationLimits/silenceSeconds`` (the primary sends heartbeats) is
        // closed, which ends the reads below; so is the link of a cancelled task.
        let raw = channel.channel
        server.replication.updateLink { $0.lastIONanos = monotonicNanos(); $0.primaryDurableLSN = 0; $0.primaryConfirmedLSN = nil }
        let silent = Atomic<Bool>(false)
        let watchdog = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                let last = server.replication.link?.lastIONanos ?? 0
                if Task.isCancelled { return }
                if monotonicNanos() - last > ReplicationLimits.silenceSeconds * 1_000_000_000 {
                    silent.store(true, ordering: .relaxed)
                    raw.close(promise: nil)
                    return
                }
            }
        }
        defer { watchdog.cancel() }
        try await withTaskCancellationHandler {
          try await channel.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            var input = ByteBuffer()
            // Reads until one message is complete; nil when the link closed.
            func message() async throws -> StreamMessage? {
                while true {
                    // Bytes taken in are dropped once they outweigh what is left: the buffer holds
                    // at most about one message, however long the link lives.
                    if input.readerIndex >= max(input.readableBytes, 64 << 10) { input.discardReadBytes() }
                    if let message = try StreamMessage.parse(&input) { return message }
                    guard input.readableBytes <= ReplicationLimits.inputBytesMax else {
                        throw ReplicationError("the primary sent a message over \(ReplicationLimits.inputBytesMax) bytes")
                    }
                    guard var bytes = try await iterator.next() else { return nil }
                    input.writeBuffer(&bytes)
                    server.replication.updateLink { $0.lastIONanos = monotonicNanos() }
                }
            }
            if let password = server.configuration.primaryPassword {
                try await outbound.write(Self.command(["AUTH", password]))
                guard case .line(let reply)? = try await message(), reply == "+OK" else {
                    throw ReplicationError("the primary refused the password (--primary-auth)", fatal: true)
                }
            }
            // A log that failed (a write or sync error: a full disk, say) takes nothing until the node
            // restarts; its appended position may hold a record that never became durable.
            if let failure = journal.failureReason {
                throw ReplicationError("this node's log failed (\(failure)): it takes no records until it is restarted", fatal: true)
            }
            // Before anything of the primary's is taken (a full copy or a record): a later start as
            // primary begins a term (``DataDirectory/markReplicated()``).
            do throws(JournalError) { try server.store.directory.markReplicated() } catch {
                throw ReplicationError("this replica cannot mark its data directory as a replica's: \(error)", fatal: true)
            }
            var next = journal.lastAppendedLSN + 1
            var request = ["REPLICATE", String(next), "LISTENING-PORT", String(server.listeningPort.withLock { $0 }), "FULLCOPY"]
            let reader = LogReader(directory: server.store.directory, index: server.store.journal.blockIndex)
            let durable = journal.lastDurableLSN
            let position = next - 1
            if let last = await withTaskExecutorPreference(server.blockingWork, operation: { reader.fingerprint(at: position, durable: durable) }) {
                request += ["LAST", String(last, radix: 16)]
            }
            if let term = engine.epochs.last, term.start < next {
                request += ["EPOCH", String(term.epoch), String(term.start)]
            }
            try await outbound.write(Self.command(request))
            var answer = try await message()
            if case .line(let reply)? = answer, reply.hasPrefix("+FULLCOPY ") {
                // The primary no longer keeps the log after this replica's position: its newest
                // snapshot comes first, then the log after it.
                let words = reply.split(separator: " ")
                guard words.count == 5, words[3] == "EPOCH", let lsn = UInt64(words[1]), let size = Int(words[2]), let epoch = UInt64(words[4]),
                      epoch <= EpochHistory.epochMax, size > 0, size <= ReplicationLimits.fullCopyBytesMax, lsn >= next
                else {
                    throw ReplicationError("bad full-copy header from the primary: \(reply.prefix(80))")
                }
                // A primary of an older term does not replace this node's data.
                let known = server.replicationEpoch.withLock { $0 }
                guard epoch >= known else {
                    throw ReplicationError("\(host):\(port) offers a full copy at epoch \(epoch), older than epoch \(known) this node knows; refused")
                }
                server.replication.updateLink { $0.state = "sync" }
                server.logger.info("receiving a full copy from \(host):\(port): the snapshot at position \(lsn), \(size) bytes")
                let path = server.store.directory.snapshotPath(lsn: lsn) + ".tmp"
                let file = try server.store.directory.storage.open(path, .create)
                var closed = false
                defer { if !closed { file.close(); try? server.store.directory.storage.remove(path) } }
                // "$size\r\n", the bytes, "\r\n": written to the file as they come, never held whole.
                let header = "$\(size)\r\n"
                while input.readableBytes < header.utf8.count {
                    guard var bytes = try await iterator.next() else { throw ReplicationError("the primary closed the link during a full copy") }
                    input.writeBuffer(&bytes)
                }
                guard input.readString(length: header.utf8.count) == header else { throw ReplicationError("bad full-copy framing from the primary") }
                var left = size
                while left > 0 {
                    if input.readableBytes == 0 {
                        input.clear()  // what was written out is not kept: the copy is never held whole
                        guard var bytes = try await iterator.next() else { throw ReplicationError("the primary closed the link during a full copy") }
                        input.writeBuffer(&bytes)
                        server.replication.updateLink { $0.lastIONanos = monotonicNanos() }
                    }
                    let take = min(left, input.readableBytes)
                    let chunk = input.readBytes(length: take)!
                    try await withTaskExecutorPreference(server.blockingWork) { try Self.append(chunk, to: file) }
                    left -= take
                }
                while input.readableBytes < 2 {
                    guard var bytes = try await iterator.next() else { throw ReplicationError("the primary closed the link during a full copy") }
                    input.writeBuffer(&bytes)
                }
                guard input.readString(length: 2) == "\r\n" else { throw ReplicationError("bad full-copy framing from the primary") }
                try file.dataSync()
                file.close()
                closed = true
                try await installFullCopy(path: path, lsn: lsn)
                next = lsn + 1
                answer = try await message()
            }
            switch answer {
            case .line(let reply)? where reply.hasPrefix("+CONTINUE \(next) SHARDS "):
                let words = reply.split(separator: " ")
                let shards = words.count >= 4 ? Int(words[3]) ?? -1 : -1
                let epoch = words.count >= 6 && words[4] == "EPOCH" ? UInt64(words[5]) ?? 0 : 0
                guard epoch <= EpochHistory.epochMax else {
                    throw ReplicationError("\(host):\(port) names epoch \(epoch), past the largest a log takes (\(EpochHistory.epochMax))")
                }
                // A primary of an older term (a former primary that has not learned it was replaced)
                // is not followed.
                let known = server.replicationEpoch.withLock { $0 }
                guard epoch >= known else {
                    throw ReplicationError("\(host):\(port) is a primary of epoch \(epoch), older than epoch \(known) this node knows; not followed")
                }
                server.replicationEpoch.withLock { $0 = max($0, epoch) }
                // The primary's durable end at the handshake (an older primary does not say: its
                // first heartbeat then does): a node starting over has the primary's history once
                // it holds that much of it.
                if let at = words.firstIndex(of: "DURABLE"), at + 1 < words.count, let durable = UInt64(words[at + 1]) {
                    caughtUpAt = durable
                }
                if let at = words.firstIndex(of: "CONFIRMED"), at + 1 < words.count, let confirmed = Self.position(words[at + 1]) {
                    primaryConfirmed = confirmed
                }
                // The primary's run id (an older primary does not say): this node's own means the
                // link came back to this node (its own address, another name for it, a forwarder).
                if let at = words.firstIndex(of: "RUNID"), at + 1 < words.count, words[at + 1] == server.runID {
                    throw ReplicationError(
                        "\(host):\(port) is this node itself: it cannot follow its own log. Name another primary (REPLICAOF host port), or REPLICAOF NO ONE",
                        fatal: true)
                }
                guard shards == engine.shardCount else {
                    guard shards >= 1, shards <= Limits.shardCountMax else {
                        throw ReplicationError("the primary's answer names no valid shard count: \(reply.prefix(80))", fatal: true)
                    }
                    throw ReplicationError(
                        "the primary has \(shards) shards, this replica \(engine.shardCount): start the replica with --shards \(shards) on an empty data directory",
                        fatal: true)
                }
            case .line(let reply)? where reply.hasPrefix("-TRIMMED"):
                throw ReplicationError(
                    "the primary no longer keeps the log after position \(next - 1) (\(reply.dropFirst())); this replica needs a full copy: "
                        + "stop it, empty its data directory, and start it again", fatal: true)
            case .line(let reply)? where reply.hasPrefix("-DIVERGED") || reply.hasPrefix("-ERR the replica is ahead"):
                // This node holds records the primary does not (a former primary): it starts over as
                // the primary's replica, keeping its files (``rejoin(_:)``).
                // Only for a primary that names its epoch, and not an older one than this node knows: a
                // node never discards its log for a primary it would then refuse to follow.
                guard let tail = RefusalTail.parse(reply) else {
                    throw ReplicationError(
                        "the primary refused: \(reply.dropFirst()). This node holds records the primary does not (a former primary?), "
                            + "and the primary does not name its epoch (an older build): move its data directory aside and start it again "
                            + "with --replica-of, which takes a full copy", fatal: true)
                }
                let known = server.replicationEpoch.withLock { $0 }
                guard tail.epoch <= EpochHistory.epochMax else {
                    throw ReplicationError(
                        "\(host):\(port) refused this node's log naming epoch \(tail.epoch), past the largest epoch \(EpochHistory.epochMax); not followed, nothing discarded")
                }
                guard tail.epoch >= known else {
                    throw ReplicationError(
                        "\(host):\(port) refused this node's log and is a primary of epoch \(tail.epoch), older than epoch \(known) this node knows; not followed, nothing discarded")
                }
                // A peer behind this node in this node's own newest term (a replica that lags, taken
                // for a primary) has not gone another way: this node waits for it, discarding nothing.
                let ownEpoch = engine.epochs.lastEpoch
                if reply.hasPrefix("-ERR the replica is ahead"), ownEpoch > 0, tail.epoch == ownEpoch {
                    throw ReplicationError(
                        "\(host):\(port) is behind this node in the same term (epoch \(ownEpoch)): waiting for it to catch up; nothing discarded")
                }
                // An empty log has nothing to set aside: a refusal of it is the peer's fault, retried.
                guard server.store.journal.lastAppendedLSN > 0 else {
                    throw ReplicationError("\(host):\(port) refused this node's empty log: \(reply.dropFirst())")
                }
                let kept: Int
                do { kept = try server.store.directory.setAsideNames().count } catch {
                    throw ReplicationError(
                        "the primary refused this node's log (\(reply.dropFirst())), and its data directory cannot be listed to count the logs it keeps set aside (\(error)): not starting over", fatal: true)
                }
                guard kept < ReplicationLimits.setAsideMax else {
                    throw ReplicationError(
                        "the primary refused this node's log (\(reply.dropFirst())), and its data directory already keeps \(kept) logs set aside (diverged-*), the most it keeps: "
                            + "not starting over again. Read them (stockade inspect --records DIR), remove those no longer needed, and restart this node", fatal: true)
                }
                var error = ReplicationError("the primary refused: \(reply.dropFirst())")
                error.divergence = .init(primaryEpoch: tail.epoch, from: tail.from)
                throw error
            case .line(let reply)? where reply.hasPrefix("-"):
                throw ReplicationError("the primary refused: \(reply.dropFirst())")
            case let other:
                throw ReplicationError("unexpected answer to REPLICATE: \(String(describing: other))")
            }
            // The last error stays until the stream proves sound (its first heartbeat or blocks):
            // a link that breaks at once on each attempt keeps saying why.
            server.replication.updateLink { $0.state = "connected"; $0.linksMade += 1; $0.primaryConfirmedLSN = primaryConfirmed }
            var sound = false
            // EVENTS here serves what the primary confirmed (--min-replicas-to-write N: on its disk
            // and acknowledged by N replicas), no further. What an earlier link confirmed holds for
            // the records this log keeps (the handshake found them to be this primary's too), not
            // for positions it does not hold yet: those will be this primary's records.
            server.replication.acknowledgedWatch.cap(at: next - 1)
            // A primary of an older build never says what it confirmed. What this replica holds from
            // it is on the primary and here: the promise of N = 1, kept as before when that is all
            // this node promises; for N of 2 or more nothing past what was confirmed before.
            let selfVouching = primaryConfirmed == nil && server.configuration.minReplicasToWrite <= 1
            if let primaryConfirmed {
                server.confirmEvents(through: primaryConfirmed)
                // A link that already closed says so at the next read, with what it sent before.
                try? await outbound.write(Self.command(["REPLCONF", "CAPA", "CONFIRMED"]))
            } else if selfVouching {
                server.confirmEvents(through: next - 1)
            } else if server.configuration.minReplicasToWrite > 1 {
                server.logger.warning(
                    "\(host):\(port) does not send its confirmed position (an older build): EVENTS here serves nothing past position \(server.eventsLimit) while it is the primary (--min-replicas-to-write \(server.configuration.minReplicasToWrite)); upgrade it or read EVENTS from it")
            }
            // Under a coordinator, following its cluster's primary makes this directory one of its nodes.
            if let coordinator = server.coordinator.withLock({ $0 }), coordinator.etcd.clusterID != nil {
                do { try server.store.directory.recordCluster(coordinator.membership) } catch {
                    server.logger.warning("could not record the cluster in \(server.store.directory.clusterMarkerPath) (\(error))")
                }
            }
            var startingOver = server.replication.rejoin.inProgress || server.store.directory.isStartingOver
            if startingOver { startingOver = endStartingOver(holding: next - 1, primaryHad: caughtUpAt) }
            server.logger.info("replicating from \(host):\(port) at position \(next)")
            while !Task.isCancelled {
                guard let first = try await message() else {
                    throw ReplicationError(silent.load(ordering: .relaxed)
                        ? "nothing from the primary for \(ReplicationLimits.silenceSeconds) s; reconnecting" : "the primary closed the link")
                }
                // Every block already here is applied together: one append, one run on the shards.
                var pending = [first]
                while pending.count < 256, let more = try StreamMessage.parse(&input) { pending.append(more) }
                var records: [Record] = []
                var heartbeat = false
                for item in pending {
                    switch item {
                    case .line(let line) where line.hasPrefix("+HEARTBEAT "):
                        heartbeat = true
                        // Believed only as a position (review: 2^64 - 1 was shown in INFO as the primary's).
                        if let durable = Self.position(line.dropFirst("+HEARTBEAT ".count)) {
                            if caughtUpAt == nil { caughtUpAt = durable }
                            if startingOver { startingOver = endStartingOver(holding: next - 1, primaryHad: caughtUpAt) }
                            server.replication.updateLink { link in
                                link.primaryDurableLSN = max(link.primaryDurableLSN, durable)
                                if next > durable { link.caughtUpNanos = monotonicNanos() }
                            }
                        }
                    case .line(let line) where line.hasPrefix("+CONFIRMED "):
                        if let confirmed = Self.position(line.dropFirst("+CONFIRMED ".count)) {
                            server.confirmEvents(through: confirmed)
                            server.replication.updateLink { $0.primaryConfirmedLSN = max($0.primaryConfirmedLSN ?? 0, confirmed) }
                        }
                    case .line(let line) where line.hasPrefix("-TRIMMED"):
                        throw ReplicationError(
                            "the primary no longer keeps the log after position \(next - 1) (\(line.dropFirst())); this replica needs a full copy: "
                                + "stop it, empty its data directory, and start it again", fatal: true)
                    case .line(let line):
                        throw ReplicationError("the primary said: \(line)")
                    case .block(let bytes):
                        switch LogReader.decodeBlock(bytes) {
                        case .failure(let error):
                            throw ReplicationError("refused a block from the primary: \(error)")
                        case .success(let block):
                            let expected = next + UInt64(records.count)
                            guard block.firstLSN <= expected, block.firstLSN + UInt64(block.records.count) > expected else {
                                throw ReplicationError("the primary sent positions \(block.firstLSN)... where \(expected) was expected")
                            }
                            records += block.records[Int(expected - block.firstLSN)...]
                        }
                    }
                }
                if !sound {
                    sound = true
                    server.replication.updateLink { $0.lastError = "" }
                }
                guard !records.isEmpty else {
                    // A heartbeat is answered (the primary sees the replica alive); a confirmed
                    // position alone is not, or each would cost the primary an acknowledgement.
                    if heartbeat { try await outbound.write(Self.command(["REPLACK", String(journal.lastDurableLSN)])) }
                    continue
                }
                // The state first, through recovery's checks; then the replica's own log (same
                // positions) gets exactly the records that fit, so its directory always recovers. Reads
                // meanwhile wait for the log to make the applied position durable, as on a primary.
                let (reached, failure) = await engine.applyReplicated(records, at: next - 1)
                let applied = Int(reached - (next - 1))
                if applied > 0 {
                    var buffer = RecordBuffer(capacity: applied * 64)
                    for record in records[..<applied] { buffer.append(record) }
                    var last: UInt64 = 0
                    while true {
                        do throws(Rejection) {
                            last = try journal.append(buffer)
                            break
                        } catch .busy {
                            try await Task.sleep(for: .milliseconds(1))
                        } catch {
                            throw ReplicationError("this replica's log refused the records: \(error)", fatal: true)
                        }
                    }
                    guard last == reached else {
                        throw ReplicationError("this replica's log put the records at \(last + 1 - UInt64(applied))..., not \(next)...", fatal: true)
                    }
                }
                next = reached + 1
                server.replication.updateLink { link in
                    link.primaryDurableLSN = max(link.primaryDurableLSN, reached)
                    if reached >= link.primaryDurableLSN { link.caughtUpNanos = monotonicNanos() }
                }
                do throws(Rejection) { try await journal.waitDurable(reached) } catch {
                    throw ReplicationError("this replica's log failed: \(error)", fatal: true)
                }
                if selfVouching { server.confirmEvents(through: reached) }
                if startingOver { startingOver = endStartingOver(holding: reached, primaryHad: caughtUpAt) }
                if let failure {
                    throw ReplicationError(
                        "record \(reached + 1) from the primary does not fit this replica's state (\(failure)); stopped at position \(reached), "
                            + "which this replica holds durably. Is it following the right primary? To start over: move its data directory aside", fatal: true)
                }
                try await outbound.write(Self.command(["REPLACK", String(reached)]))
            }
          }
        } onCancel: {
            raw.close(promise: nil)
        }
    }

    /// The primary refused this node's log (it holds records the primary does not have: a former
    /// primary whose last records were never shipped): the node starts over as the primary's replica,
    /// as Redis's full resynchronisation does, but keeps what it discards. Every client connection is
    /// closed (what they read may be records the primary's log does not have: a consumer of EVENTS
    /// must reconnect and compare terms); every segment and snapshot moves into
    /// `diverged-<epoch>-<unix-ms>/` in the data directory (``Store/startOver(setAsideAs:)``: renames
    /// and directory syncs, crash-safe); the log starts again at position 0 and the state is empty;
    /// the next link then takes the primary's history (a full copy, or its log from the start).
    private func rejoin(_ refusal: ReplicationError) async throws {
        guard let divergence = refusal.divergence else { return }
        let store = server.store
        let name = store.directory.freeSetAsideName(epoch: divergence.primaryEpoch, unixMillis: wallClockMillis())
        let last = store.journal.lastAppendedLSN
        let from = min(divergence.from, last + 1)
        let count = last >= from ? last - from + 1 : 0
        let path = "\(store.directory.path)/\(name)"
        server.logger.warning(
            "\(host):\(port): \(refusal.message). Its log holds \(count) record(s) the primary does not have (positions \(from)-\(last), or from earlier). Starting over as its replica: closing every client connection, moving this node's log and snapshots to \(path)")
        server.replication.updateRejoin { r in
            r.count += 1
            r.lastDirectory = path
            r.lastPreviousLSN = last
            r.lastDivergedFrom = from
            r.inProgress = true
        }
        server.replication.updateLink { $0.state = "sync"; $0.lastError = refusal.message; $0.primaryDurableLSN = 0 }
        server.closeClientConnections()
        // A change a primary turned replica had in flight is let reach the log first: the log starts
        // again only with nothing pending.
        try await store.journal.waitDurable(store.journal.lastAppendedLSN)
        // Durable before anything moves: a start after a crash from here on serves no state as a
        // primary's until it follows one again (or an operator's REPLICAOF NO ONE says so).
        try store.directory.markStartingOver()
        let result = try await store.startOver(setAsideAs: name)
        server.logStartedOver()
        // Connections accepted while the files moved may have read the old state.
        server.closeClientConnections()
        server.logger.warning(
            "moved \(result.setAside.files.count) file(s) (the log through position \(result.previousLSN)) to \(result.setAside.path) (read them with: stockade inspect --records \(result.setAside.path)); this node's log starts again at position 0, and it takes the primary's history from \(host):\(port)")
    }

    /// Puts a received snapshot in place and continues from it: verifies and reads it, renames it to
    /// its final name (from then on recovery starts from it), starts the log again after its position,
    /// replaces the state, and removes the segments and snapshots it supersedes. Each step leaves a
    /// directory that recovers: before the rename the old state, after it the copy.
    private func installFullCopy(path: String, lsn: UInt64) async throws {
        let directory = server.store.directory
        let journal = server.store.journal
        let state: EngineState
        do {
            state = try await withTaskExecutorPreference(server.blockingWork) { try SnapshotFile.read(path, storage: directory.storage) }
        } catch {
            try? directory.storage.remove(path)
            throw ReplicationError("the full copy from the primary does not verify: \(error)")
        }
        guard state.lsn == lsn, state.shards.count == server.engine.shardCount else {
            try? directory.storage.remove(path)
            throw ReplicationError("the full copy is of position \(state.lsn) with \(state.shards.count) shards, not \(lsn) with \(server.engine.shardCount)", fatal: true)
        }
        let final = directory.snapshotPath(lsn: lsn)
        let engine = server.engine
        // No snapshot of this replica's own runs meanwhile: it would read and prune the files moved here.
        try await server.store.withoutSnapshots {
            do {
                try directory.storage.rename(path, to: final)
                try directory.storage.syncDirectory(directory.path)
                try journal.rebase(to: lsn)
            } catch {
                throw ReplicationError("this replica could not put the full copy in place: \(error)", fatal: true)
            }
            await engine.installReplicated(state)
            // What was confirmed of the log the copy replaces says nothing of the copy's records (a
            // primary's snapshot may hold changes it has not confirmed): only the primary's
            // `CONFIRMED`, which follows, does.
            server.replication.acknowledgedWatch.restarted(at: 0)
            // Superseded: the log before the copy and older snapshots (best effort: recovery skips them).
            _ = try? journal.removeSegments(coveredThrough: lsn, keep: 0)
            for old in (try? directory.snapshots()) ?? [] where old.path != final { try? directory.storage.remove(old.path) }
            try? directory.storage.syncDirectory(directory.path)
        }
        server.replication.updateLink { $0.primaryDurableLSN = max($0.primaryDurableLSN, lsn) }
        server.logger.info("full copy in place at position \(lsn); following the log after it")
    }

    private static func append(_ bytes: [UInt8], to file: any StorageFile) throws {
        var failure: JournalError?
        bytes.withUnsafeBytes { raw in
            do throws(JournalError) { try file.append(raw) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// A log position as a primary writes one: 1 to 20 ASCII digits, nothing else (no sign, no
    /// spaces), at most 2^63 - 1.
    static func position(_ text: Substring) -> UInt64? {
        guard !text.isEmpty, text.utf8.count <= 20, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
        // Positions are RESP integers, signed: no log reaches past 2^63 - 1.
        return UInt64(text).flatMap { $0 <= UInt64(Int64.max) ? $0 : nil }
    }

    /// A command as a RESP array of bulk strings.
    static func command(_ words: [String]) -> ByteBuffer {
        var out = ByteBuffer()
        out.writeRESPArrayHeader(words.count)
        for word in words { out.writeRESPBulk(word) }
        return out
    }
}

/// Why a replication link ended; `fatal` ones stop replication until an operator acts; a
/// `divergence` (the primary refused this node's log) makes the node start over as its replica.
struct ReplicationError: Error, CustomStringConvertible {
    var message: String
    var fatal = false
    /// The primary refused this node's log as going another way (or ahead of its own).
    var divergence: Divergence?

    struct Divergence {
        /// The primary's epoch, as its refusal names it.
        var primaryEpoch: UInt64
        /// The first position of this node's log the primary does not have (or an earlier one).
        var from: UInt64
    }

    init(_ message: String, fatal: Bool = false) {
        self.message = message
        self.fatal = fatal
    }
    var description: String { message }
}

/// The end of a primary's refusal of a replica's log (`-DIVERGED ...`, `-ERR the replica is ahead
/// ...`): ` [primary-epoch E diverged-from F]`, the primary's epoch (which names the directory the
/// replica keeps its old files in) and the first position where the logs may part. A replica does
/// not start over on a refusal without it (an older primary).
struct RefusalTail: CustomStringConvertible, Equatable {
    var epoch: UInt64
    var from: UInt64

    var description: String { " [primary-epoch \(epoch) diverged-from \(from)]" }

    static func parse(_ line: String) -> RefusalTail? {
        guard line.hasSuffix("]"), let open = line.range(of: " [primary-epoch ", options: .backwards) else { return nil }
        let words = line[open.upperBound...].dropLast().split(separator: " ")
        guard words.count == 3, words[1] == "diverged-from", let epoch = UInt64(words[0]), let from = UInt64(words[2]) else { return nil }
        return RefusalTail(epoch: epoch, from: from)
    }
}

/// One message of the stream as the replica reads it: a status line (with its `+` or `-`) or a
/// block's bytes (binary-safe, unlike a client's reply parser).
enum StreamMessage: Equatable {
    case line(String)
    case block([UInt8])

    /// The longest status line: positions and error texts are short.
    static let lineBytesMax = 4096

    /// The next complete message, or nil when more bytes are needed (nothing consumed).
    static func parse(_ buffer: inout ByteBuffer) throws(ReplicationError) -> StreamMessage? {
        let view = buffer.readableBytesView
        guard let first = view.first else { return nil }
        let searchEnd = view.index(view.startIndex, offsetBy: min(view.count, lineBytesMax + 2))
        guard let newline = view[view.startIndex..<searchEnd].firstIndex(of: UInt8(ascii: "\n")) else {
            if view.count > lineBytesMax + 1 { throw ReplicationError("a line from the primary is over \(lineBytesMax) bytes") }
            return nil
        }
        guard newline > buffer.readerIndex, buffer.getInteger(at: newline - 1, as: UInt8.self) == UInt8(ascii: "\r") else {
            throw ReplicationError("a line from the primary does not end with CRLF")
        }
        let line = buffer.getString(at: buffer.readerIndex, length: newline - 1 - buffer.readerIndex) ?? ""
        switch first {
        case UInt8(ascii: "+"), UInt8(ascii: "-"):
            buffer.moveReaderIndex(to: newline + 1)
            return .line(line)
        case UInt8(ascii: "$"):
            guard let length = Int(line.dropFirst()), length > 0, length <= ReplicationLimits.inputBytesMax else {
                throw ReplicationError("bad block length from the primary: \(line.prefix(40))")
            }
            let start = newline + 1
            guard buffer.writerIndex - start >= length + 2 else { return nil }
            guard buffer.getInteger(at: start + length, as: UInt8.self) == UInt8(ascii: "\r"),
                  buffer.getInteger(at: start + length + 1, as: UInt8.self) == UInt8(ascii: "\n")
            else { throw ReplicationError("a block from the primary is not followed by CRLF") }
            let bytes = buffer.getBytes(at: start, length: length)!
            buffer.moveReaderIndex(to: start + length + 2)
            return .block(bytes)
        default:
            throw ReplicationError("unexpected byte \(first) from the primary")
        }
    }
}
