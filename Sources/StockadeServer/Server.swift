import CJemalloc
import Dispatch
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import StockadeCore
import StockadeJournal
import StockadeWire
import Synchronization

/// What every connection shares: the engine, the store, limits, counters.
final class ServerContext: Sendable {
    /// A client connection's write buffer water marks: past the high mark of replies not yet taken
    /// by the socket, the channel turns unwritable and the client's next rounds wait (pacing); below
    /// the low mark they go on. 1 MiB and 256 KiB, lower under a small `--max-output-bytes`: at
    /// most half of it, so that a writable channel (less than the high mark unread) has room for a
    /// whole round (``roundReplyBytes``) within the limit, and a client that reads slowly is paced
    /// rather than disconnected.
    let writeBufferHighWaterBytes: Int
    let writeBufferLowWaterBytes: Int
    /// The worst-case reply bytes one round of a client admits: 4 MiB, or what the output limit
    /// leaves above the high water mark (``ConnectionHandler/roundReplyBytesMax``).
    let roundReplyBytes: Int

    let configuration: ServerConfiguration
    let store: Store
    let engine: Engine
    let metrics: ServerMetrics
    let logger: Logger
    let protocolErrorLog = ProtocolErrorLog()
    /// The port the listener got (the configured one, or the one `--port 0` was given).
    let listeningPort = Mutex<Int>(0)
    /// The next connection's id (CLIENT ID, HELLO's `id`): from 1, never reused while the process runs.
    let nextClientID = Atomic<Int64>(1)
    /// Every client connection (CLIENT LIST, CLIENT KILL).
    let clients = ClientRegistry()
    let startedNanos = monotonicNanos()
    let startedWallMillis = wallClockMillis()
    /// Called by SHUTDOWN.
    let requestShutdown: @Sendable () -> Void
    /// Where work that grows with the state or touches files runs (snapshots, EVENTS log reads):
    /// never on an event loop, where it would stall every client of that loop.
    let blockingWork: BlockingWorkExecutor
    /// EVENTS ... BLOCK waiters, woken when the durable position moves.
    let eventsWaiters = DurablePositionWatch()
    /// Accept failures of both listeners (out of file descriptors), for INFO and a rate-limited log line.
    let acceptFailures: AcceptFailureLog
    /// Role, replicas and the link to a primary (ROLE, INFO replication).
    let replication = ReplicationState()
    /// The link to the primary while this server is a replica.
    let replicaLink = Mutex<ReplicaLink?>(nil)
    /// This process's id, 40 random hex digits as Redis's `run_id` (INFO server): a primary's stream
    /// names it (`RUNID`), so a node whose link came back to itself can tell.
    let runID: String = String((0..<40).map { _ in "0123456789abcdef".randomElement()! })
    /// The loops, for the replica's link to the primary.
    let group: EventLoopGroup?
    /// The highest primary epoch this node has seen (its log's newest term, the coordinator's key, a
    /// primary's stream): a stream from a lower epoch is refused. The epoch of the history its log
    /// holds is the engine's (``Engine/epochs``), what it stands on in an election: seeing a newer
    /// epoch in etcd does not make a node's log part of it.
    let replicationEpoch: Mutex<UInt64>
    /// `--coordinator`: etcd decides who is primary.
    let coordinator = Mutex<Coordinator?>(nil)

    /// This node takes changes (as far as its role goes; a lapsed lease still refuses them).
    var isPrimary: Bool { !engine.role.isFollower }

    private struct Counters {
        var clients: [ObjectIdentifier: Channel] = [:]
        var connectionsReceived = 0
        var connectionsRejected = 0
        var lastSnapshotLSN: UInt64 = 0
        var lastSnapshotNanos: UInt64 = 0
        var lastSnapshotDurationNanos: UInt64 = 0
        var snapshotsTaken = 0
        var metricsConnections = 0
        var metricsConnectionsRejected = 0
    }

    private let counters: Mutex<Counters>
    private let rounds = Atomic<Int>(0)
    /// Bytes all connections hold for requests begun and not finished, and which of them to close
    /// past ``ServerConfiguration/partialRequestBytesMax`` (each connection sets its own share).
    let partialRequests: Mutex<PartialRequestBudget<ObjectIdentifier, NIOLoopBound<(ConnectionHandler, ChannelHandlerContext)>>>
    /// Connections closed because the partial requests of all of them passed that bound.
    let partialRequestRefusals = Atomic<Int>(0)
    /// Per event loop: the shards it runs and the rounds waiting there for durability.
    private let loopStates: [ObjectIdentifier: DurableReplies]
    /// Per event loop: the loop time its rounds with large replies may take (``HeavyRounds``).
    private let heavyRoundBudgets: [ObjectIdentifier: HeavyRounds]
    /// The loop state of the loop each shard runs on, by shard.
    private let shardLoops: [DurableReplies]

    init(
        configuration: ServerConfiguration, store: Store, logger: Logger, blockingWork: BlockingWorkExecutor,
        loops: [EventLoop], group: EventLoopGroup? = nil, requestShutdown: @escaping @Sendable () -> Void
    ) {
        self.group = group
        self.configuration = configuration
        writeBufferHighWaterBytes = min(1 << 20, configuration.clientOutputBytesMax / 2)
        writeBufferLowWaterBytes = min(256 << 10, writeBufferHighWaterBytes / 4)
        roundReplyBytes = min(ConnectionHandler.roundReplyBytesMax, configuration.clientOutputBytesMax - writeBufferHighWaterBytes)
        self.store = store
        engine = store.engine
        replicationEpoch = Mutex(store.engine.epochs.lastEpoch)
        replication.eventsReplicas.store(configuration.minReplicasToWrite, ordering: .relaxed)
        let metrics = ServerMetrics()
        self.metrics = metrics
        store.journal.onBatch { records, syncNanos in metrics.journalBatch(records: records, syncNanos: syncNanos) }
        self.logger = logger
        self.blockingWork = blockingWork
        self.requestShutdown = requestShutdown
        acceptFailures = AcceptFailureLog(logger: logger, metrics: metrics)
        partialRequests = Mutex(PartialRequestBudget(bound: configuration.partialRequestBytesMax))
        counters = Mutex(Counters(lastSnapshotLSN: store.recovery.snapshotLSN, lastSnapshotNanos: monotonicNanos()))
        var states: [ObjectIdentifier: DurableReplies] = [:]
        var byIndex: [DurableReplies] = []
        // The loops the shards run on: all of them, or the first alone on a replica (see ``StockadeServer/run()``).
        // (None when the shards run elsewhere: then no batch runs in place.)
        let shardLoopCount = min(loops.count, store.options.shardExecutors.count)
        for (i, loop) in loops.enumerated() {
            let local = (0..<store.engine.shardCount).map {
                shardLoopCount > 0 && Engine.executorIndex(ofShard: $0, executorCount: shardLoopCount) == i
            }
            let state = DurableReplies(loop: loop, journal: store.journal, localShards: local)
            states[ObjectIdentifier(loop)] = state
            byIndex.append(state)
            store.journal.onDurable { lsn in state.durable(lsn) }
        }
        loopStates = states
        heavyRoundBudgets = Dictionary(uniqueKeysWithValues: loops.map { (ObjectIdentifier($0), HeavyRounds(loop: $0, now: monotonicNanos(), metrics: metrics)) })
        shardLoops = byIndex.isEmpty || shardLoopCount == 0
            ? [] : (0..<store.engine.shardCount).map { byIndex[Engine.executorIndex(ofShard: $0, executorCount: shardLoopCount)] }
    }

    /// The state of the loop that shard `index` runs on.
    func loopState(ofShard index: Int) -> DurableReplies? { index < shardLoops.count ? shardLoops[index] : nil }

    /// The state of the loop a connection runs on (nil for a loop the server did not start, in tests).
    func durableReplies(for loop: EventLoop) -> DurableReplies? { loopStates[ObjectIdentifier(loop)] }

    /// The heavy-round budget of a connection's loop (nil for a loop the server did not start, in tests).
    func heavyRounds(for loop: EventLoop) -> HeavyRounds? { heavyRoundBudgets[ObjectIdentifier(loop)] }

    // MARK: Connections

    /// Counts a new connection; false when it would pass maxclients.
    func admit(_ channel: Channel) -> Bool {
        let admitted = counters.withLock { c in
            c.connectionsReceived += 1
            guard c.clients.count < configuration.maxClients else {
                c.connectionsRejected += 1
                return false
            }
            c.clients[ObjectIdentifier(channel)] = channel
            return true
        }
        if admitted {
            metrics.connectedClients.increment()
        } else {
            metrics.rejectedConnections.increment()
        }
        return admitted
    }

    func release(_ channel: Channel) {
        counters.withLock { _ = $0.clients.removeValue(forKey: ObjectIdentifier(channel)) }
        metrics.connectedClients.decrement()
    }

    var clientChannels: [Channel] { counters.withLock { Array($0.clients.values) } }

    /// Closes every client connection (replica streams served here too): a node starting over as a
    /// replica (``ReplicaLink``) may have shown them records the primary's log does not have.
    func closeClientConnections() {
        for channel in clientChannels { channel.close(promise: nil) }
    }

    /// After the log started again at position 0 (``Store/startOver(setAsideAs:)``): what assumed
    /// positions only grow is told. Rounds waiting for a position of the old log are answered with why
    /// it never comes; EVENTS waiters follow the new log; the snapshot cadence counts from 0.
    func logStartedOver() {
        eventsWaiters.restarted(at: store.journal.lastDurableLSN)
        replication.logStartedOver()
        for state in loopStates.values { state.logRestarted(Journal.restartedReason) }
        counters.withLock { c in
            c.lastSnapshotLSN = 0
            c.lastSnapshotNanos = monotonicNanos()
        }
    }
    var connectedCount: Int { counters.withLock { $0.clients.count } }

    /// Counts a new metrics connection; false when it would pass ``ServerConfiguration/metricsConnectionsMax``.
    func admitMetricsConnection() -> Bool {
        counters.withLock { c in
            guard c.metricsConnections < configuration.metricsConnectionsMax else {
                c.metricsConnectionsRejected += 1
                return false
            }
            c.metricsConnections += 1
            return true
        }
    }

    func releaseMetricsConnection() { counters.withLock { $0.metricsConnections -= 1 } }

    /// Rounds in flight, and those of them that carry a change (what a replica-to-be lets finish).
    func beginRound(changes: Bool) {
        rounds.add(1, ordering: .relaxed)
        if changes { changeRounds.add(1, ordering: .relaxed) }
    }
    func endRound(changes: Bool) {
        rounds.subtract(1, ordering: .relaxed)
        if changes { endChanges() }
    }
    /// A round's changes are done (before its step runs, which ends it with `endRound(changes: false)`):
    /// a step that lets changes in flight finish first (REPLICAOF) does not wait for its own round's.
    func endChanges() {
        changeRounds.subtract(1, ordering: .relaxed)
    }
    private let changeRounds = Atomic<Int>(0)
    var roundsInFlight: Int { rounds.load(ordering: .relaxed) }

    // MARK: Snapshots

    /// Takes a snapshot now (one at a time) and records it for INFO and metrics. It runs on
    /// ``blockingWork``: it reads the log and writes a file, for as long as the state is large.
    func snapshot() async throws -> Store.SnapshotReport {
        let store = self.store
        let report = try await withTaskExecutorPreference(blockingWork) { try await store.snapshot() }
        if report.unchanged {
            logger.debug("\(report)")
            return report
        }
        counters.withLock { c in
            c.lastSnapshotLSN = report.written.lsn
            c.lastSnapshotNanos = monotonicNanos()
            c.lastSnapshotDurationNanos = report.durationNanos
            c.snapshotsTaken += 1
        }
        metrics.snapshotDurationSeconds.set(Double(report.durationNanos) / 1e9)
        logger.info("\(report)")
        return report
    }

    /// Whether the cadence asks for a snapshot now.
    func snapshotDue() -> Bool {
        let durable = store.journal.lastDurableLSN
        let (lastLSN, lastNanos) = counters.withLock { ($0.lastSnapshotLSN, $0.lastSnapshotNanos) }
        metrics.snapshotAgeSeconds.set(Double(monotonicNanos() - lastNanos) / 1e9)
        guard durable > lastLSN else { return false }
        if configuration.snapshotEveryChanges > 0, durable - lastLSN >= configuration.snapshotEveryChanges { return true }
        let seconds = configuration.snapshotEverySeconds
        return seconds > 0 && monotonicNanos() - lastNanos >= UInt64(seconds) * 1_000_000_000
    }

    // MARK: Commands answered without the engine

    /// `client`: the connection's id (CLIENT ID, HELLO); `resp3`: the protocol its replies are in.
    func writeLocal(_ request: Request, client: Int64, resp3: Bool, into out: inout ByteBuffer) {
        switch request {
        case .ping(let message):
            if let message { out.writeRESPBulk(message) } else { out.writeRESPPong() }
        case .echo(let message):
            out.writeRESPBulk(message)
        case .commandInfo(let count):
            // COMMAND COUNT: how many commands there are; the rest (COMMAND, COMMAND DOCS, ...) gives no
            // hints: an empty array, or under RESP3 an empty map (COMMAND DOCS is a map there in Redis).
            if count { out.writeRESPInteger(Int64(Verb.allCases.count)) } else if resp3 { out.writeRESP3MapHeader(0) } else { out.writeRESPArrayHeader(0) }
        case .configGet(let pattern):
            let values: [(String, String)] = [
                ("save", ""), ("appendonly", configuration.fsync == .none ? "no" : "yes"),
                ("appendfsync", configuration.fsync.rawValue), ("maxclients", String(configuration.maxClients)),
                ("port", String(listeningPort.withLock { $0 })), ("databases", "1"),
            ]
            let matching = values.filter { globMatch(pattern, $0.0) }
            // A map under RESP3, as Redis answers (and as RESP3 clients read it).
            if resp3 { out.writeRESP3MapHeader(matching.count) } else { out.writeRESPArrayHeader(matching.count * 2) }
            for (key, value) in matching { out.writeRESPBulk(key); out.writeRESPBulk(value) }
        case .clientAccepted:
            out.writeRESPSimple("OK")
        case .clientID:
            out.writeRESPInteger(client)
        case .clientSet(let field, let value):
            clients.record(client)?.set(field, value)
            out.writeRESPSimple("OK")
        case .clientGetName:
            let name = clients.record(client)?.name ?? ""
            out.writeRESPBulk(name.isEmpty ? nil : name)
        case .clientInfo:
            out.writeRESPBulk((clients.record(client)?.line(nowNanos: monotonicNanos()) ?? "id=\(client)") + "\n")
        case .clientList(let ids, let replica, let matchesNone):
            let now = monotonicNanos()
            let listed = matchesNone ? [] : clients.matching(ids: ids, replica: replica)
            out.writeRESPBulk(listed.map { $0.line(nowNanos: now) + "\n" }.joined())
        case .clientKill(let filter):
            let killed = clients.kill(filter, me: client)
            if !filter.oldForm {
                out.writeRESPInteger(Int64(killed))
            } else if killed > 0 {
                out.writeRESPSimple("OK")
            } else {
                out.writeRESPError("ERR No such client")
            }
        case .hello(let version, _, let name):
            // Both are accepted. Under 3, this reply and STOCK, ORDER and EVENTS entries are maps
            // (the connection switches once this is answered); the rest is the same in both.
            if let version, version != 2 && version != 3 {
                out.writeRESPError("NOPROTO sorry, this protocol version is not supported")
                return
            }
            if version == 3 { out.writeRESP3MapHeader(7) } else { out.writeRESPArrayHeader(14) }
            out.writeRESPBulk("server"); out.writeRESPBulk("stockade")
            out.writeRESPBulk("version"); out.writeRESPBulk(stockadeVersion)
            out.writeRESPBulk("proto"); out.writeRESPInteger(Int64(version ?? 2))
            out.writeRESPBulk("id"); out.writeRESPInteger(client)
            out.writeRESPBulk("mode"); out.writeRESPBulk("standalone")
            out.writeRESPBulk("role"); out.writeRESPBulk("master")
            out.writeRESPBulk("modules"); out.writeRESPArrayHeader(0)
            if let record = clients.record(client) {
                if let name { record.set(.name, name) }
                if let version { record.protocolVersion.store(version, ordering: .relaxed) }
            }
        case .logTerm(let position):
            writeTerm(at: position, into: &out)
        case .select(let db):
            if db == 0 { out.writeRESPSimple("OK") } else { out.writeRESPError("ERR DB index is out of range") }
        case .invalid(let message):
            out.writeRESPError(message)
        default:
            out.writeRESPError("ERR internal: \(request.metricName) is not a local command")
        }
    }

    /// Runs the step that ends a round; returns its reply (nil: none), whether to close after it, and
    /// how long encoding its reply took (EVENTS; 0 for the others), for ``HeavyRounds``.
    func run(step: RoundStep, presence: ClientPresence? = nil, turn: HeavyTurn? = nil) async -> (ByteBuffer?, Bool, encodeNanos: UInt64) {
        var out = ByteBufferAllocator().buffer(capacity: 256)
        var encodeNanos: UInt64 = 0
        switch step {
        case .snapshot:
            do {
                _ = try await snapshot()
                out.writeRESPSimple("OK")
                metrics.count("snapshot", outcome: "ok")
            } catch {
                out.writeRESPError("ERR snapshot failed: \(error)")
                metrics.count("snapshot", outcome: "err")
            }
        case .shutdown:
            metrics.count("shutdown", outcome: "ok")
            logger.info("SHUTDOWN requested by a client")
            requestShutdown()
            return (nil, true, 0)
        case .info(let section):
            out.writeRESPBulk(await info(section: section))
            metrics.count("info", outcome: "ok")
        case .events(let from, let count, let blockMillis, let resp3):
            await events(from: from, count: count, blockMillis: blockMillis, resp3: resp3, turn: turn, presence: presence, into: &out, encodeNanos: &encodeNanos)
        case .replicate:
            out.writeRESPError("ERR REPLICATE must be the first command of its pipeline")
        case .role:
            writeRole(into: &out)
            metrics.count("role", outcome: "ok")
        case .replicaOf(let host, let port):
            let (ok, message) = coordinator.withLock({ $0 }) != nil
                ? (false, "ERR this node's role is decided by its coordinator (--coordinator): it follows the primary that holds the key in etcd")
                : await follow(host: host, port: port)
            if ok { out.writeRESPSimple(message) } else { out.writeRESPError(message) }
            metrics.count("replicaof", outcome: ok ? "ok" : "err")
        case .promote:
            if coordinator.withLock({ $0 }) != nil {
                out.writeRESPError("ERR this node's role is decided by its coordinator (--coordinator): it takes the primary key in etcd when the primary's lease lapses")
                metrics.count("replicaof", outcome: "err")
            } else if await promote() {
                out.writeRESPSimple("OK")
                metrics.count("replicaof", outcome: "ok")
            } else {
                out.writeRESPError("ERR the log could not record the new epoch; still a read-only replica (see the server log)")
                metrics.count("replicaof", outcome: "err")
            }
        case .wait(let replicas, let timeoutMillis):
            guard replication.link == nil else {
                out.writeRESPError("ERR WAIT cannot be used with replica instances. Please also note that since Redis 4.0 if a replica is configured to be writable (which is not the default) writes to replicas are just local and are not propagated.")
                break
            }
            // Every change answered before this command is durable here by now: waiting for the
            // durable position covers this client's changes (and may cover more).
            let position = store.journal.lastDurableLSN
            let deadline = timeoutMillis == 0 ? UInt64.max : monotonicNanos() + UInt64(timeoutMillis) * 1_000_000
            // In slices of 100 ms: a client that went away stops its WAIT (and frees its socket).
            var acknowledged = 0
            while true {
                let slice = min(deadline, monotonicNanos() + 100_000_000)
                acknowledged = await replication.waitForAcknowledgements(by: replicas, position: position, deadlineNanos: slice)
                if acknowledged >= replicas || monotonicNanos() >= deadline || presence?.isGone == true || replication.isClosed { break }
            }
            out.writeRESPInteger(Int64(acknowledged))
            metrics.count("wait", outcome: "ok")
        }
        return (out, false, encodeNanos)
    }

    // MARK: Replication

    /// ROLE, in Redis's shape: `master`, the durable position, and each replica's address, listening
    /// port and acknowledged position; or `slave`, the primary's host and port, the link's state and
    /// the position applied here.
    func writeRole(into out: inout ByteBuffer) {
        if let link = replication.link {
            out.writeRESPArrayHeader(5)
            out.writeRESPBulk("slave")
            out.writeRESPBulk(link.host)
            out.writeRESPInteger(Int64(link.port))
            out.writeRESPBulk(link.state)
            out.writeRESPInteger(Int64(store.journal.lastDurableLSN))
        } else if engine.role.isReadOnly {
            // Read-only and following nobody, or a primary fenced by its lapsed lease (see
            // ``replicationInfo()``): not a primary to a client now.
            out.writeRESPArrayHeader(5)
            out.writeRESPBulk("slave")
            out.writeRESPBulk("")
            out.writeRESPInteger(0)
            out.writeRESPBulk("none")
            out.writeRESPInteger(Int64(store.journal.lastDurableLSN))
        } else {
            let replicas = replication.replicas
            out.writeRESPArrayHeader(3)
            out.writeRESPBulk("master")
            out.writeRESPInteger(Int64(store.journal.lastDurableLSN))
            out.writeRESPArrayHeader(replicas.count)
            for replica in replicas {
                out.writeRESPArrayHeader(3)
                out.writeRESPBulk(replica.address)
                out.writeRESPBulk(String(replica.listeningPort))
                out.writeRESPBulk(String(replica.ackedLSN))
            }
        }
    }

    /// Whether this server can follow a primary without a restart: a replica's shards share one
    /// loop (``Engine/applyReplicated(_:at:)``), which only a server started with `--replica-of` has.
    var canFollow: Bool { store.options.shardExecutors.count <= 1 && group != nil }

    /// Role changes (follow, promote) run one at a time: two REPLICAOF NO ONE at once would start
    /// two terms.
    private let roleChanges = AsyncLock()

    /// Starts following `host:port` (REPLICAOF host port, or `--replica-of` at start).
    func follow(host: String, port: Int) async -> (Bool, String) {
        (try? await roleChanges.run { await self.followAlone(host: host, port: port) })
            ?? (false, "ERR cannot follow \(host):\(port) now")
    }

    private func followAlone(host: String, port: Int) async -> (Bool, String) {
        guard canFollow, let group else {
            return (false, "ERR this server was started as a primary, its shards on every loop; to follow \(host):\(port), restart it with --replica-of \(host):\(port)")
        }
        if let link = replicaLink.withLock({ $0 }) {
            // The same primary again: nothing to do, unless the link stopped (then it starts over).
            if link.host == host && link.port == port && replication.link?.state != "stopped" {
                return (true, "OK Already connected to specified master")
            }
            await link.stop()
        } else {
            engine.role.setReadOnly(true)
            // Changes that passed the check before it are let finish before the log is followed.
            await changesInFlightFinish()
        }
        let link = ReplicaLink(host: host, port: port, server: self, group: group)
        replicaLink.withLock { $0 = link }
        link.start()
        logger.info("following \(host):\(port) (REPLICAOF): read-only")
        return (true, "OK")
    }

    /// Waits (at most 2 s) for rounds of changes that passed the read-only check before it was set.
    private func changesInFlightFinish() async {
        let deadline = monotonicNanos() + 2_000_000_000
        // Only rounds with changes: a client blocked in WAIT or EVENTS ... BLOCK is no reason to wait.
        while changeRounds.load(ordering: .relaxed) > 0 && monotonicNanos() < deadline { try? await Task.sleep(for: .milliseconds(5)) }
    }

    /// Becomes primary (REPLICAOF NO ONE, or the coordinator's election): stops following (nothing is
    /// applied after that), starts a term in the log (``Engine/startEpoch(_:)``), and only then takes
    /// changes. `epoch`: the coordinator's; nil (an operator's REPLICAOF NO ONE): one past every epoch
    /// this node has seen. `writableUntil`: the lease's fencing bound, set before changes are taken.
    /// False when the term could not be logged: the node stays read-only.
    @discardableResult
    func promote(epoch: UInt64? = nil, writableUntil: UInt64? = nil) async -> Bool {
        (try? await roleChanges.run { await self.promoteAlone(epoch: epoch, writableUntil: writableUntil) }) ?? false
    }

    private func promoteAlone(epoch: UInt64?, writableUntil: UInt64?) async -> Bool {
        let previous = replicaLink.withLock { $0 }
        if let previous { await previous.stop() }
        replicaLink.withLock { $0 = nil }
        replication.setLink(nil)
        if !engine.role.isFollower {
            // Primary already: REPLICAOF NO ONE has nothing to do. Elected again by the coordinator
            // (its lease lapsed and no other node took the key), the key's new revision is a new term
            // like any other: logged, and streamed as its epoch. Else replicas that read the new epoch
            // from etcd refuse its stream as of an older epoch, and no node can follow it. Its changes
            // stop while the term's record is logged (they were fenced since the lease lapsed).
            guard epoch != nil else { return true }
            engine.role.setReadOnly(true)
            await changesInFlightFinish()
        }
        // The coordinator's epoch (its key's revision), unless the log already holds that one or a
        // newer one (etcd's data was replaced: its revisions started again); otherwise one of the
        // node's own, above every epoch it has seen (``EpochHistory/next(after:using:)``).
        let seen = replicationEpoch.withLock { max($0, engine.epochs.lastEpoch) }
        var rng = SystemRandomNumberGenerator()
        let chosen = epoch.flatMap { $0 > engine.epochs.lastEpoch && $0 <= EpochHistory.epochMax ? $0 : nil }
            ?? EpochHistory.next(after: seen, using: &rng)
        do throws(Rejection) {
            guard let chosen else { throw .badArgument("no epoch is left above \(seen)") }
            let position = try await engine.startEpoch(chosen)
            replicationEpoch.withLock { $0 = max($0, chosen) }
            logger.info("epoch \(chosen) starts at log position \(position)")
        } catch {
            // Not a primary: it goes on following what it followed (or stays a replica of nobody).
            logger.error("could not log the start of a new epoch (\(error)): staying a read-only replica")
            if let previous { _ = await followAlone(host: previous.host, port: previous.port) }
            return false
        }
        if let writableUntil { engine.role.setWritableUntil(writableUntil) }
        // A node that was starting over is a primary now, as it is (an operator's REPLICAOF NO ONE;
        // the coordinator elects none such).
        try? store.directory.clearStartingOver()
        engine.role.setReadOnly(false)
        logger.info("promoted to primary at epoch \(engine.epochs.lastEpoch), log position \(store.journal.lastDurableLSN)")
        return true
    }

    /// Semi-synchronous replication (``ServerConfiguration/minReplicasToWrite``): calls `done` with
    /// the replies once that many replicas acknowledged `position`; if they do not in time, the
    /// successful replies of changes become NOREPLICAS (the change is durable here, not on them).
    func awaitReplicas(_ batch: [Command], _ replies: [Reply], position: UInt64, done: @escaping @Sendable ([Reply]) -> Void) {
        let wanted = configuration.minReplicasToWrite
        let deadline = monotonicNanos() + UInt64(configuration.minReplicasTimeoutMillis) * 1_000_000
        replication.whenAcknowledged(by: wanted, position: position, deadlineNanos: deadline) { acknowledged in
            // Acknowledged in time, and while this node still takes changes: once its lease lapsed
            // (or it stepped down), another node may have been elected without the change, and
            // replicas that still follow this one prove nothing about that node.
            let fenced = self.engine.role.isReadOnly
            guard acknowledged < wanted || fenced else { return done(replies) }
            let rejection: Rejection = acknowledged < wanted ? .notReplicated(acknowledged: acknowledged, wanted: wanted) : .replicatedTooLate(wanted: wanted)
            done(zip(batch, replies).map { command, reply in
                if case .rejected = reply { return reply }
                return command.isChange ? .rejected(rejection) : reply
            })
        }
    }

    /// INFO's replication section, in Redis's keys, positions for offsets, and this node's starts
    /// over (a former primary whose log went another way rejoining: ``ReplicaLink``).
    func replicationInfo() -> [(String, String)] {
        let rejoin = replication.rejoin
        let rejoins: [(String, String)] = [
            ("rejoins", String(rejoin.count)), ("last_diverged_dir", infoText(rejoin.lastDirectory)),
            ("last_rejoin_previous_position", String(rejoin.lastPreviousLSN)),
            ("last_rejoin_diverged_from", String(rejoin.lastDivergedFrom)),
            ("diverged_dirs", String(divergedDirectoryCount)),
        ]
        return replicationRoleInfo() + rejoins
    }

    /// The `diverged-*` directories the data directory holds now (logs set aside by rejoins, of this
    /// process or an earlier one, until an operator removes them): one listing of the directory.
    var divergedDirectoryCount: Int {
        let directory = store.directory
        let names = (try? directory.storage.list(directory.path)) ?? []
        return names.filter { $0.hasPrefix(DataDirectory.setAsidePrefix) }.count
    }

    private func replicationRoleInfo() -> [(String, String)] {
        let durable = store.journal.lastDurableLSN
        if let link = replication.link {
            let now = monotonicNanos()
            let lagRecords = link.primaryDurableLSN > durable ? link.primaryDurableLSN - durable : 0
            let lagMillis = lagRecords == 0 ? 0 : (now - max(link.caughtUpNanos, startedNanos)) / 1_000_000
            return [
                ("role", "slave"), ("master_host", link.host), ("master_port", String(link.port)),
                ("master_link_status", link.state == "connected" ? "up" : "down"),
                ("master_link_state", link.state),
                ("master_last_io_seconds_ago", link.lastIONanos == 0 ? "-1" : String((now - link.lastIONanos) / 1_000_000_000)),
                ("master_repl_offset", String(link.primaryDurableLSN)), ("slave_repl_offset", String(durable)),
                ("slave_read_only", "1"), ("replica_lag_records", String(lagRecords)), ("replica_lag_ms", String(lagMillis)),
                // An INFO value holds no comma or line end (clients split on them).
                ("master_link_error", infoText(link.lastError)), ("master_links_made", String(link.linksMade)),
                // -1: the primary has not said (an older build never does).
                ("master_confirmed_position", link.primaryConfirmedLSN.map { String($0) } ?? "-1"),
                ("log_epoch", String(engine.epochs.lastEpoch)),
            ] + coordinatorInfo()
        }
        let replicas = replication.replicas
        // A read-only node that follows nobody (a coordinator's node before it knows the primary, a
        // promotion that could not log its term, a primary whose lease lapsed) is no primary now:
        // `role:slave`, its link down.
        if engine.role.isReadOnly {
            return [
                ("role", "slave"), ("master_host", ""), ("master_port", "0"), ("master_link_status", "down"),
                ("master_link_state", "none"), ("slave_repl_offset", String(durable)), ("slave_read_only", "1"),
                ("log_epoch", String(engine.epochs.lastEpoch)),
            ] + coordinatorInfo()
        }
        var pairs: [(String, String)] = [("role", "master"), ("connected_slaves", String(replicas.count))]
        for (i, replica) in replicas.enumerated() {
            let lag = (monotonicNanos() - replica.lastAckNanos) / 1_000_000_000
            pairs.append(("slave\(i)", "ip=\(replica.address),port=\(replica.listeningPort),state=online,offset=\(replica.ackedLSN),lag=\(lag),lag_records=\(durable > replica.ackedLSN ? durable - replica.ackedLSN : 0)"))
        }
        pairs.append(("master_repl_offset", String(durable)))
        // The newest primary term in this node's log (0: none; see docs/REPLICATION.md).
        pairs.append(("log_epoch", String(engine.epochs.lastEpoch)))
        return pairs + coordinatorInfo()
    }

    /// INFO replication's lines about the coordinator (none without one).
    func coordinatorInfo() -> [(String, String)] {
        guard let coordinator = coordinator.withLock({ $0 }) else { return [] }
        let view = coordinator.view.withLock { $0 }
        return [
            ("coordinator", "etcd://\(coordinator.etcd.host):\(coordinator.etcd.port)"), ("cluster", coordinator.cluster),
            ("advertise", coordinator.advertise), ("epoch", String(view.epoch)), ("cluster_primary", view.primary),
            ("writable", engine.role.isReadOnly ? "0" : "1"),
            ("coordinator_error", infoText(view.lastError)),
        ]
    }

    /// An EVENTS of at most this many records that the journal holds in memory (``Journal/tail``) is
    /// decoded on the client's loop; a larger page is decoded on ``blockingWork``, as a read of the
    /// files is (a page of 10,000 baskets takes milliseconds to decode).
    static let eventsInMemoryOnLoopMax: UInt64 = 128

    /// EVENTS: durable records from `from` (nil: `$`, the next position), waiting up to `blockMillis`
    /// for the first one. The newest records are read from memory (``Journal/tail``) on the caller's
    /// loop, older ones from the files on ``blockingWork``; a waiter sleeps until the durable
    /// position passes `from`, the deadline, or shutdown (then it gets an empty array, as on a
    /// timeout). A position past the next one gets `-BEYOND` at once: the consumer saved it from
    /// another log (the data directory was replaced or restored from an older copy), and waiting for
    /// it would hang the consumer for good. `resp3`: each event as a map.
    /// `turn`: taken before the log is read (not while waiting) when it can read more than one
    /// record, and for one record before its event is encoded when that can take more than a STOCK,
    /// so pages are read and encoded a few at a time per loop (``HeavyRounds``). `encodeNanos`: the
    /// time the page took to encode (the caller's loop time).
    func events(
        from: UInt64?, count: Int, blockMillis: Int, resp3: Bool = false, turn: HeavyTurn? = nil, presence: ClientPresence? = nil,
        into out: inout ByteBuffer, encodeNanos: inout UInt64
    ) async {
        let last = store.journal.lastDurableLSN
        let start = max(from ?? eventsLimit + 1, 1)
        if start > last + 1 {
            out.writeRESPError("BEYOND \(last) position \(start) is beyond the end of the log (last position \(last)): this server's data was replaced or restored from an older copy; rebuild the consumer from STOCK and ORDERS, or start it over")
            metrics.count("events", outcome: "beyond")
            return
        }
        let deadline = monotonicNanos() + UInt64(blockMillis) * 1_000_000
        let reader = LogReader(directory: store.directory, index: store.journal.blockIndex, tail: store.journal.tail)
        while true {
            let durable = eventsLimit
            if start <= durable {
                // A page of several records takes its turn before it is read (its read and its replies
                // grow with it). A consumer at the end of the log, woken by one new event, reads that
                // one and takes the turn only if its event is larger than a STOCK (a basket): a
                // fan-out of many woken consumers waits for no turn, and pipelines of basket events
                // still take turns.
                let turnFirst = durable - start >= 1 && count > 1
                if turnFirst { await turn?.take() }
                let read: Result<[(position: UInt64, record: Record)], LogReader.ReadError>
                if min(UInt64(count), durable - start + 1) <= Self.eventsInMemoryOnLoopMax,
                   let held = store.journal.tail.records(from: start, count: count, durable: durable)
                {
                    // A few of the newest records: decoded from memory here, on the client's loop.
                    read = .success(held)
                } else {
                    // From the files, or a larger page from memory, off the loops.
                    read = await withTaskExecutorPreference(blockingWork) {
                        do throws(LogReader.ReadError) { return .success(try reader.read(from: start, count: count, durable: durable)) } catch { return .failure(error) }
                    }
                }
                switch read {
                case .success(let records) where !records.isEmpty:
                    if !turnFirst, let turn, ReplyEncoding.eventBytesMax(records[0].record) > ReplyEncoding.smallReplyBytesMax {
                        await turn.take()
                    }
                    let encodeStarted = monotonicNanos()
                    defer { encodeNanos = monotonicNanos() - encodeStarted }
                    ReplyEncoding.writePage(count: records.count, into: &out) { index, page in
                        let (position, record) = records[index]
                        ReplyEncoding.writeEvent(position: position, record: record, skuName: skuName, resp3: resp3, into: &page)
                    }
                    metrics.count("events", outcome: "ok")
                    return
                case .success:
                    // Nothing readable although the position says there is: answer empty rather than spin.
                    out.writeRESPArrayHeader(0)
                    metrics.count("events", outcome: "ok")
                    return
                case .failure(.trimmed(let oldest)):
                    out.writeRESPError("TRIMMED \(oldest) events before position \(oldest) were removed after a snapshot; resume from \(oldest) or rebuild from STOCK and ORDERS")
                    metrics.count("events", outcome: "trimmed")
                    return
                case .failure(.unreadable(let why)):
                    out.writeRESPError("ERR cannot read the log: \(why)")
                    metrics.count("events", outcome: "err")
                    return
                }
            }
            if blockMillis == 0 || monotonicNanos() >= deadline { break }
            if store.journal.lastDurableLSN >= start {
                // Durable here but not yet acknowledged by enough replicas: the acknowledgement wakes it.
                guard await replication.acknowledgedWatch.wait(from: start, deadlineNanos: deadline, presence: presence) else { break }
                continue
            }
            guard await eventsWaiters.wait(from: start, deadlineNanos: deadline, presence: presence) else { break }
        }
        out.writeRESPArrayHeader(0)
        metrics.count("events", outcome: "ok")
    }

    /// LOG.TERM: `[epoch, start]` of the term in force at `position` (`[0, 0]`: no term had started
    /// by then). A consumer stores it with its last position and compares it after a reconnect: the
    /// same term at the same position means the same records up to it (one primary per epoch), so a
    /// server whose log went another way before that position (a replica promoted without the
    /// consumer's last events) is told apart from the one it followed. Positions past the durable end
    /// get `-BEYOND`, as from EVENTS; `-TRIMMED` when the history no longer keeps that far back
    /// (``EpochHistory/termsMax``); `-TRYAGAIN` while this node is starting a term.
    func writeTerm(at position: UInt64, into out: inout ByteBuffer) {
        let last = store.journal.lastDurableLSN
        guard position <= last else {
            out.writeRESPError("BEYOND \(last) position \(position) is beyond the end of the log (last position \(last))")
            return
        }
        guard let (term, undecided) = engine.term(at: position) else {
            out.writeRESPError("TRYAGAIN this node is starting a term; ask again")
            return
        }
        if undecided {
            let kept = engine.epochs.terms.first?.start ?? 0
            out.writeRESPError("TRIMMED \(kept) the terms before position \(kept) are no longer kept (only the last \(EpochHistory.termsMax))")
            return
        }
        out.writeRESPArrayHeader(2)
        out.writeRESPInteger(Int64(term?.epoch ?? 0))
        out.writeRESPInteger(Int64(term?.start ?? 0))
    }

    /// The last position EVENTS serves: durable and, on a semi-synchronous node
    /// (`--min-replicas-to-write N`), confirmed (``ReplicationState/acknowledgedWatch``), whatever
    /// its role now. A change that N replicas do not have is not yet answered to its client and may
    /// be lost in a failover: a consumer must not see it before (as Kafka's consumers read up to the
    /// high watermark), nor after the node stepped down, where a rejoin may discard it. Confirmed:
    /// acknowledged by N replicas (as primary), or confirmed by the primary a link follows (as
    /// replica: the primary's own confirmed position, sent in its stream, for the records this log
    /// holds from it); the highest position confirmed so far, so 0 after a restart until it is
    /// again. BEYOND stays relative to the durable end: such a position is this log's, only not yet
    /// confirmed. A primary sends this value to its replicas as its confirmed position.
    var eventsLimit: UInt64 {
        let durable = store.journal.lastDurableLSN
        guard configuration.minReplicasToWrite > 0 else { return durable }
        return min(durable, replication.acknowledgedWatch.position)
    }

    /// The position this node tells its replicas is confirmed (`CONFIRMED`, ``ReplicaFeed``): what
    /// its EVENTS serves, and on a node that follows a primary never past what that primary
    /// confirmed, whatever this node's own `--min-replicas-to-write` (a replica without it serves its
    /// whole log, which promises nothing to replicas of its own that run with it).
    var confirmedForReplicas: UInt64 {
        engine.role.isFollower ? min(store.journal.lastDurableLSN, replication.acknowledgedWatch.position) : eventsLimit
    }

    /// A link to a primary vouched for this log through `position` (the primary's confirmed
    /// position; from a primary of an older build, at most N = 1: its handshake, or the records it
    /// brought, durable here): EVENTS may serve them, its blocked clients are woken, and the
    /// replicas of this node that listen hear it.
    func confirmEvents(through position: UInt64) {
        if replication.acknowledgedWatch.publish(position) { replication.confirmedRaised() }
    }

    func skuName(_ shard: Int, _ index: UInt32) -> Name {
        guard shard < engine.shards.count else { return "?" }
        return engine.shards[shard].directory.name(at: Int(index)) ?? "?"
    }

    /// INFO, in Redis's `# Section` / `key:value` text.
    func info(section: String?) async -> String {
        let wanted = section.map { [$0] } ?? ["server", "clients", "stats", "persistence", "replication", "shards", "memory"]
        let journal = store.journal
        let stats = journal.statistics
        let c = counters.withLock { $0 }
        var text = ""
        func add(_ title: String, _ pairs: [(String, String)]) {
            guard wanted.contains(title.lowercased()) || section == "all" || section == "everything" else { return }
            text += "# \(title)\r\n"
            for (key, value) in pairs { text += "\(key):\(value)\r\n" }
            text += "\r\n"
        }
        add("Server", [
            ("stockade_version", stockadeVersion), ("redis_version", "7.0.0-stockade"), ("process_id", String(getpid())), ("run_id", runID),
            ("tcp_port", String(listeningPort.withLock { $0 })), ("uptime_in_seconds", String((monotonicNanos() - startedNanos) / 1_000_000_000)),
            ("shards", String(engine.shardCount)), ("data_dir", store.directory.path),
        ])
        let accepts = acceptFailures.summary
        let blocked = eventsWaiters.count + replication.acknowledgedWatch.count
        add("Clients", [
            ("connected_clients", String(c.clients.count)), ("maxclients", String(configuration.maxClients)),
            // Waiting for a durable position, or (semi-synchronous) for a durable one to be confirmed.
            ("blocked_events_clients", String(blocked)),
            ("blocked_clients", String(blocked)),  // Redis's name for the same (redis-cli --stat reads it)
            ("metrics_connections", String(c.metricsConnections)),
            ("partial_request_bytes", String(partialRequests.withLock { $0.total })),
            ("max_partial_request_bytes", String(configuration.partialRequestBytesMax)),
            ("open_files_limit", String(openFilesLimit())),
        ])
        add("Stats", [
            ("total_connections_received", String(c.connectionsReceived)),
            ("total_commands_processed", String(metrics.commandsProcessed.load(ordering: .relaxed))),
            ("rejected_connections", String(c.connectionsRejected)),
            ("rejected_metrics_connections", String(c.metricsConnectionsRejected)),
            ("partial_request_refusals", String(partialRequestRefusals.load(ordering: .relaxed))),
            ("accept_failures", String(accepts.count)), ("last_accept_failure", infoText(accepts.last)),
            ("log_records", String(stats.records)), ("log_batches", String(stats.batches)),
            ("rounds_in_flight", String(roundsInFlight)),
        ])
        let syncMeanMillis = stats.syncs > 0 ? Double(stats.syncNanosTotal) / Double(stats.syncs) / 1e6 : 0
        add("Persistence", [
            ("fsync", configuration.fsync.rawValue), ("log_position_appended", String(journal.lastAppendedLSN)),
            ("log_position_durable", String(journal.lastDurableLSN)), ("log_pending_bytes", String(journal.pendingBytes)),
            ("log_fsyncs", String(stats.syncs)), ("log_fsync_mean_ms", String(format: "%.3f", syncMeanMillis)),
            ("log_fsync_max_ms", String(format: "%.3f", Double(stats.syncNanosMax) / 1e6)),
            ("log_failure", infoText(journal.failureReason ?? "")),
            ("snapshots_taken", String(c.snapshotsTaken)), ("last_snapshot_position", String(c.lastSnapshotLSN)),
            ("last_snapshot_age_seconds", String((monotonicNanos() - c.lastSnapshotNanos) / 1_000_000_000)),
            ("last_snapshot_duration_ms", String(c.lastSnapshotDurationNanos / 1_000_000)),
            ("recovery", infoText(store.recovery.description)),
        ])
        add("Replication", replicationInfo())
        if wanted.contains("shards") || section == "all" || section == "everything" {
            var pairs: [(String, String)] = []
            for shard in engine.shards {
                let counts = await shard.counts
                pairs.append(("shard\(shard.index)", "skus=\(counts.skus),orders=\(counts.orders)"))
            }
            add("Shards", pairs)
        }
        add("Memory", [("used_memory", String(allocatedBytes()))])
        return text
    }
}

/// Free text as an INFO value: no comma or line end, which clients split values on (redis-py turns
/// `a,b` into a list), so a message stays one value.
func infoText(_ text: String) -> String {
    String(text.map { $0 == "," ? ";" : $0.isNewline ? " " : $0 })
}

/// A step that needs the server beyond the engine batch; it ends a connection's round.
enum RoundStep: Sendable {
    case snapshot, shutdown, info(String?), events(from: UInt64?, count: Int, blockMillis: Int, resp3: Bool)
    case replicate(ReplicaRequest), role, replicaOf(host: String, port: Int), promote
    case wait(replicas: Int, timeoutMillis: Int)
}

/// The version this build reports.
public let stockadeVersion = "0.1.0"

/// Bytes allocated and not freed, from jemalloc (the process allocator).
public func allocatedBytes() -> Int {
    var epoch: UInt64 = 1
    _ = mallctl("epoch", nil, nil, &epoch, MemoryLayout<UInt64>.size)
    var allocated = 0
    var size = MemoryLayout<Int>.size
    guard mallctl("stats.allocated", &allocated, &size, nil, 0) == 0 else { return 0 }
    return allocated
}

/// Redis-style glob with `*` and `?` (CONFIG GET patterns), on bytes (no Unicode work on what a
/// client sent). Iterative, remembering only the last `*`, so a pattern of many stars costs
/// O(pattern x text), never exponential time; our texts are short config names.
func globMatch(_ pattern: [UInt8], _ text: String) -> Bool {
    let p = pattern, t = Array(text.utf8)
    var i = 0, j = 0
    var star: Int?
    var resume = 0
    while j < t.count {
        if i < p.count && (p[i] == UInt8(ascii: "?") || p[i] == t[j]) {
            i += 1
            j += 1
        } else if i < p.count && p[i] == UInt8(ascii: "*") {
            star = i
            resume = j
            i += 1
        } else if let s = star {
            i = s + 1
            resume += 1
            j = resume
        } else {
            return false
        }
    }
    while i < p.count && p[i] == UInt8(ascii: "*") { i += 1 }
    return i == p.count
}

/// `stockade serve`: recovers the data directory, listens, and runs until SIGTERM, SIGINT or SHUTDOWN.
public final class StockadeServer: Sendable {
    public let configuration: ServerConfiguration
    private let logger: Logger
    private let stopRequested = Mutex<CheckedContinuation<Void, Never>?>(nil)
    private let stopFlag = Mutex(false)

    public init(configuration: ServerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Asks the server to stop (signals, SHUTDOWN). Safe to call more than once, from anywhere.
    public func requestStop() {
        let continuation = stopRequested.withLock { c -> CheckedContinuation<Void, Never>? in
            defer { c = nil }
            return c
        }
        stopFlag.withLock { $0 = true }
        continuation?.resume()
    }

    /// Runs until stopped. Returns after a graceful shutdown: the log is flushed and synced.
    public func run() async throws {
        if let problem = configuration.problem() { throw ServerError(message: problem) }
        // The loops come first: each shard runs on one of them.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.ioThreads > 0 ? configuration.ioThreads : max(1, System.coreCount))
        let loops = Array(group.makeIterator())
        var storeOptions = Store.Options(shardCount: configuration.shards)
        storeOptions.journal.fsync = configuration.fsync
        // The loops write the records their replies wait for (``DurableReplies``); the writer thread
        // writes for tasks that wait, and for the housekeeping tick.
        storeOptions.journal.writerWakesOnAppend = false
        storeOptions.truncateCorrupt = configuration.truncateCorrupt
        storeOptions.coveredSegmentsKept = configuration.eventsRetentionSegments
        storeOptions.journal.preallocationBytes = configuration.logPreallocateBytes
        // A replica's shards share the first loop: each record of the primary is applied to all of
        // them in one run there (``Engine/applyReplicated(_:at:)``).
        // So do the shards of a node under a coordinator, which may become a replica at any time.
        let mayFollow = configuration.replicaOf != nil || configuration.coordinator != nil
        let shardLoops = mayFollow ? [loops[0]] : loops
        storeOptions.shardExecutors = shardLoops.map { $0.executor }
        // Long engine work (an AUDIT of every SKU, a backlog of due holds) pauses between its slices
        // until the shard's loop has polled its sockets: for as long as the slice kept it busy, like a
        // client's next round (``ConnectionHandler/laterTurn(on:busyNanos:)``).
        storeOptions.laterTurn = { index, busyNanos in await ConnectionHandler.laterTurn(on: shardLoops[index], busyNanos: busyNanos) }
        // Under a coordinator a node takes no change until etcd made it primary.
        storeOptions.readOnly = mayFollow
        let store: Store
        do {
            store = try Store(path: configuration.dataDirectory, options: storeOptions)
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        for finished in store.finishedSetAside {
            logger.warning("finished moving a diverged log into \(finished), which a crash had interrupted: this node starts over empty")
        }
        let state = store.recovery
        logger.info("recovered \(configuration.dataDirectory): \(state)")
        let blockingWork = BlockingWorkExecutor(threads: BlockingWorkExecutor.threadCount)
        // Clients and metrics connections never take the last descriptors (as Redis lowers its
        // maxclients to the open-files limit less 32): with the table full, the server could not open
        // a log segment or a snapshot, and the runtime's thread-pool monitor (libdispatch), which
        // reads /proc for each worker, traps the process. Past the bounds, connections are accepted
        // and refused with "max number of clients reached", their descriptor freed at once.
        var configuration = configuration
        let limit = openFilesLimit()
        if limit > 0 {
            let available = max(2, limit - Self.descriptorsReserved)
            let metricsShare = configuration.metricsPort == nil ? 0 : min(configuration.metricsConnectionsMax, max(1, available / 4))
            let clients = max(1, available - metricsShare)
            if configuration.maxClients > clients || configuration.metricsConnectionsMax > max(1, metricsShare) {
                var lowered: [String] = []
                if configuration.maxClients > clients { lowered.append("--maxclients \(configuration.maxClients) lowered to \(clients)") }
                let metrics = configuration.metricsPort != nil
                if metrics, configuration.metricsConnectionsMax > max(1, metricsShare) {
                    lowered.append("metrics connections \(configuration.metricsConnectionsMax) lowered to \(max(1, metricsShare))")
                }
                // Without a metrics listener its bound is lowered silently: nothing an operator set.
                if !lowered.isEmpty { logger.warning("the open-files limit (\(limit), ulimit -n) allows \(clients) clients\(metrics ? " and \(max(1, metricsShare)) metrics connections" : ""), keeping \(Self.descriptorsReserved) descriptors for the server's own files: \(lowered.joined(separator: ", ")); raise the limit for more") }
                configuration.maxClients = min(configuration.maxClients, clients)
                configuration.metricsConnectionsMax = min(configuration.metricsConnectionsMax, max(1, metricsShare))
            }
        }
        let context = ServerContext(
            configuration: configuration, store: store, logger: logger, blockingWork: blockingWork, loops: loops, group: group
        ) { [self] in
            requestStop()
        }
        let watcher = Task { await context.eventsWaiters.follow(store.journal) }
        var skus = 0, orders = 0
        for shard in store.engine.shards {
            let counts = await shard.counts
            skus += counts.skus
            orders += counts.orders
        }
        logger.info("\(skus) SKUs and \(orders) orders on \(store.engine.shardCount) shards, log position \(state.lsn), fsync \(configuration.fsync.rawValue)")
        // A node started as a primary whose log holds terms (it was part of a replicated set: a
        // replica or a former primary restarted without --replica-of) starts a term of its own, so
        // it never goes on writing in a term another node may be writing in too. So does a former
        // replica of a log without terms (the directory's marker says it followed one): else its
        // records would be of no term, like its old primary's, and a consumer comparing terms
        // (LOG.TERM) could not tell the two logs apart where they went different ways.
        if !mayFollow, store.directory.isStartingOver {
            // It was starting over as a replica (its old log set aside): what it holds is empty or a
            // partial copy of another node's history, not a primary's state.
            store.engine.role.setReadOnly(true)
            logger.error(
                "this node was starting over as a replica (\(store.directory.startingOverMarkerPath)): it serves reads of what it holds and refuses changes. Start it with --replica-of HOST:PORT (or its --coordinator) to take the primary's history, or send REPLICAOF NO ONE to make it a primary as it is")
        } else if !mayFollow, store.engine.epochs.last != nil || store.directory.isMarkedReplicated {
            store.engine.role.setReadOnly(true)
            await context.promote()
        }


        let acceptFailures = context.acceptFailures
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        AcceptBackoff(listener: "clients", log: acceptFailures, backoff: Self.acceptBackoff))
                }
            }
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: context.writeBufferLowWaterBytes, high: context.writeBufferHighWaterBytes))
            .childChannelOption(.autoRead, value: true)
            .childChannelOption(.allowRemoteHalfClosure, value: true)  // answer a client that half-closed (ConnectionHandler)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionHandler(server: context))
                }
            }
        // Bind the address the loopback check looked at, not a second lookup of the name.
        let address = (try? ListenAddress.resolve(configuration.host).get())?.numeric ?? configuration.host
        let listener: Channel
        do {
            listener = try await bootstrap.bind(host: address, port: configuration.port).get()
        } catch {
            store.close()
            try? await group.shutdownGracefully()
            try? await blockingWork.shutdown()
            throw ServerError(message: "cannot listen on \(configuration.host):\(configuration.port): \(error)")
        }
        let port = listener.localAddress?.port ?? configuration.port
        context.listeningPort.withLock { $0 = port }
        logger.info("listening on \(configuration.host):\(port)")

        var metricsListener: Channel?
        if let metricsPort = configuration.metricsPort {
            let metrics = context.metrics
            let metricsAddress = (try? ListenAddress.resolve(configuration.metricsHost).get())?.numeric ?? configuration.metricsHost
            let idle = TimeAmount.seconds(Int64(configuration.metricsIdleSeconds))
            do {
                metricsListener = try await ServerBootstrap(group: group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                AcceptBackoff(listener: "metrics", log: acceptFailures, backoff: Self.acceptBackoff))
                        }
                    }
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(MetricsConnectionGuard(server: context, idle: idle))
                        }.flatMap {
                            channel.pipeline.configureHTTPServerPipeline()
                        }.flatMapThrowing {
                            try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(metrics: metrics))
                        }
                    }
                    .bind(host: metricsAddress, port: metricsPort).get()
            } catch {
                try? await listener.close()
                store.close()
                try? await group.shutdownGracefully()
                try? await blockingWork.shutdown()
                throw ServerError(message: "cannot serve metrics on \(configuration.metricsHost):\(metricsPort): \(error)")
            }
            logger.info("metrics on http://\(configuration.metricsHost):\(metricsListener?.localAddress?.port ?? metricsPort)/metrics")
        }

        // A line the tests and scripts can wait for, once every listener is up. A failed write (a
        // closed pipe, a full disk, a file size limit) is not the server's failure: it serves on.
        // (`write(_:)` without `contentsOf:` traps on one.)
        try? FileHandle.standardOutput.write(contentsOf: Data("stockade listening on \(configuration.host):\(port)\n".utf8))

        if let primary = configuration.replicaOf {
            _ = await context.follow(host: primary.host, port: primary.port)
        }
        if let etcd = configuration.coordinator {
            let advertise = configuration.advertise ?? "\(address.contains(":") ? "[\(address)]" : address):\(port)"
            let coordinator = Coordinator(
                etcd: EtcdClient(host: etcd.host, port: etcd.port, group: group), cluster: configuration.cluster,
                advertise: advertise, leaseSeconds: configuration.leaseSeconds, server: context)
            context.coordinator.withLock { $0 = coordinator }
            coordinator.start()
            logger.info("coordinator etcd://\(etcd.host):\(etcd.port), cluster \(configuration.cluster), this node \(advertise)")
        }

        let signals = installSignalHandlers()
        let background = Task { await self.housekeeping(context) }

        await withCheckedContinuation { continuation in
            let alreadyStopped = stopFlag.withLock { $0 }
            if alreadyStopped { continuation.resume() } else { stopRequested.withLock { $0 = continuation } }
        }

        logger.info("shutting down: no new connections, answering what is in flight")
        background.cancel()
        await context.coordinator.withLock({ $0 })?.stop()
        await context.replicaLink.withLock({ $0 })?.stop()
        try? await listener.close()
        try? await metricsListener?.close()
        // EVENTS ... BLOCK waiters get their empty array now instead of holding shutdown up.
        context.eventsWaiters.close()
        context.replication.acknowledgedWatch.close()
        context.replication.close()
        let graceEnd = monotonicNanos() + UInt64(configuration.shutdownGraceSeconds) * 1_000_000_000
        await waitForRounds(context, until: graceEnd)
        for channel in context.clientChannels { try? await channel.close() }
        // A snapshot the cadence started finishes before the log closes under it.
        await background.value
        store.close()
        // Rounds still running (past the grace) are refused by the closed log and end now; only
        // then do the loops stop, so nothing is scheduled on a loop that is gone.
        await waitForRounds(context, until: monotonicNanos() + 2_000_000_000)
        if let failure = store.journal.failure {
            logger.error("the log failed while serving (\(failure)); durable up to position \(store.journal.lastDurableLSN), which the next start recovers")
        } else {
            logger.info("log flushed and synced at position \(store.journal.lastDurableLSN); bye")
        }
        for source in signals { source.cancel() }
        watcher.cancel()
        try? await group.shutdownGracefully()
        try? await blockingWork.shutdown()
        if let failure = store.journal.failure {
            throw ServerError(message: "stopped after a log failure: \(failure)")
        }
    }

    /// Accept attempts are retried after this while they fail (out of file descriptors): at most
    /// 10 attempts a second instead of a busy loop, and a freed descriptor is used within 100 ms.
    static let acceptBackoff = TimeAmount.milliseconds(100)

    /// Descriptors the server needs besides clients: log segment, snapshots, listeners, event loops.
    static let descriptorsReserved = 32

    /// Waits until no round is in flight or `deadline` passes, checking every 5 ms.
    private func waitForRounds(_ context: ServerContext, until deadline: UInt64) async {
        while context.roundsInFlight > 0 && monotonicNanos() < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Expiry every 10 ms, snapshot cadence and metrics every second.
    private func housekeeping(_ context: ServerContext) async {
        var ticks = 0
        while !Task.isCancelled {
            await context.engine.expire(now: wallClockMillis())
            context.eventsWaiters.expireDue(nowNanos: monotonicNanos())
            context.replication.acknowledgedWatch.expireDue(nowNanos: monotonicNanos())
            context.replication.expireDue(nowNanos: monotonicNanos())
            // Records that nobody waits for (expiry's) are written within a tick.
            context.store.journal.requestWrite()
            ticks += 1
            if ticks % 100 == 0 {
                context.metrics.observe(context.store.journal)
                if context.snapshotDue() {
                    do { _ = try await context.snapshot() } catch { logger.error("snapshot failed: \(error)") }
                }
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    private func installSignalHandlers() -> [DispatchSourceSignal] {
        [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { [self] in
                logger.info("received signal \(number)")
                requestStop()
            }
            source.resume()
            return source
        }
    }
}

/// The soft open-files limit (`ulimit -n`), or 0 when unknown.
func openFilesLimit() -> Int {
    var limit = rlimit()
    #if canImport(Glibc)
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
    #else
    guard getrlimit(RLIMIT_NOFILE, &limit) == 0 else { return 0 }
    #endif
    return Int(clamping: limit.rlim_cur)  // RLIM_INFINITY is the largest value: clamped to Int.max
}

/// Accept failures of the listeners: counted for INFO and metrics, logged at most once per
/// ``AcceptFailureLog/logIntervalNanos`` with the number since the last line, so a server out of
/// descriptors says so without flooding its log.
final class AcceptFailureLog: Sendable {
    /// One line per 10 s is enough to see the problem and its rate.
    static let logIntervalNanos: UInt64 = 10_000_000_000

    private struct State {
        var count = 0
        var unlogged = 0
        var lastLoggedNanos: UInt64 = 0
        var last = ""
    }

    private let state = Mutex(State())
    private let logger: Logger
    private let metrics: ServerMetrics
    private let nowNanos: @Sendable () -> UInt64

    init(logger: Logger, metrics: ServerMetrics, nowNanos: @escaping @Sendable () -> UInt64 = { monotonicNanos() }) {
        self.logger = logger
        self.metrics = metrics
        self.nowNanos = nowNanos
    }

    func record(listener: String, error: Error) {
        let reason = (error as? IOError).map { "\(String(cString: strerror($0.errnoCode))) (errno \($0.errnoCode))" } ?? "\(error)"
        let line: String? = state.withLock { s in
            // Under the lock: a time read before it could be older than the last line's, logged
            // meanwhile by the other listener's loop, and the difference would underflow (a trap).
            let now = nowNanos()
            s.count += 1
            s.unlogged += 1
            s.last = "\(listener): \(reason)"
            guard s.lastLoggedNanos == 0 || (now >= s.lastLoggedNanos && now - s.lastLoggedNanos >= Self.logIntervalNanos) else { return nil }
            defer {
                s.unlogged = 0
                s.lastLoggedNanos = now
            }
            return "cannot accept connections on the \(listener) port: \(reason); \(s.unlogged) failure(s) since the last such line, \(s.count) in all. "
                + "New connections wait in the backlog; retrying every \(StockadeServer.acceptBackoff.nanoseconds / 1_000_000) ms. "
                + "Raise the open-files limit (ulimit -n) or lower --maxclients."
        }
        metrics.acceptFailures.increment()
        if let line { logger.warning("\(line)") }
    }

    /// Failures so far and the last one (`listener: reason`), for INFO.
    var summary: (count: Int, last: String) { state.withLock { ($0.count, $0.last) } }
}

/// On a listener: when accepting fails (out of file descriptors), stops reading from the listening
/// socket for `backoff`, then tries again, and reports each failure to ``AcceptFailureLog``.
///
/// SwiftNIO's `AcceptBackoffHandler` is not enough here: it delays the next `read()`, but when the
/// first `accept` of a read fails the channel still has its read pending and stays registered for
/// readability, so the event loop is woken again at once and spins at 100% CPU (measured with
/// `ulimit -n 64`: 11,000 failed accepts a second). Turning `autoRead` off unregisters the socket
/// from epoll; turning it on again after the backoff registers it again.
final class AcceptBackoff: ChannelInboundHandler {
    typealias InboundIn = Channel
    typealias InboundOut = Channel

    private let listener: String
    private let log: AcceptFailureLog
    private let backoff: TimeAmount
    private var resume: Scheduled<Void>?

    init(listener: String, log: AcceptFailureLog, backoff: TimeAmount) {
        self.listener = listener
        self.log = log
        self.backoff = backoff
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard error is IOError else {
            context.fireErrorCaught(error)
            return
        }
        log.record(listener: listener, error: error)
        guard resume == nil, let options = context.channel.syncOptions else { return }
        try? options.setOption(.autoRead, value: false)
        let bound = NIOLoopBound((self, context.channel), eventLoop: context.eventLoop)
        resume = context.eventLoop.scheduleTask(in: backoff) {
            let (handler, channel) = bound.value
            handler.resume = nil
            if channel.isActive { try? channel.syncOptions?.setOption(.autoRead, value: true) }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        resume?.cancel()
        resume = nil
        context.fireChannelInactive()
    }
}

/// Why the server cannot start.
public struct ServerError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}
