import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import StockadeCore
import StockadeJournal
import Synchronization

/// Who is primary, decided by etcd (`--coordinator etcd://host:port --cluster NAME`), not by a
/// consensus of our own.
///
/// - The primary holds `/stockade/NAME/primary` (its address) under an etcd lease and keeps the lease
///   alive. The key's create revision is the term's **epoch**: etcd's revisions only grow.
/// - Each node publishes its durable log position under `/stockade/NAME/nodes/ADDRESS`, under its own
///   lease.
/// - When the primary's lease lapses, the key goes; the node with the highest position (ties: the
///   smallest address) creates it in a transaction (compare: key absent) and promotes itself; the
///   others follow the address the key names.
/// - **Fencing**: a primary takes changes only until its lease could have lapsed: the moment its last
///   successful renewal was sent, plus the lease's time to live, minus a margin
///   (``EngineRole/setWritableUntil(_:)``, checked on every change). A primary frozen (SIGSTOP) or cut
///   off past that refuses every change when it wakes, before any tick runs, and its next tick finds
///   the key held by another and follows it.
final class Coordinator: Sendable {
    let etcd: EtcdClient
    let cluster: String
    /// How other nodes and clients reach this one (host:port).
    let advertise: String
    let leaseSeconds: Int
    private let server: ServerContext
    private let task = Mutex<Task<Void, Never>?>(nil)

    /// What this node last saw; INFO replication shows it.
    struct View: Sendable {
        var epoch: UInt64 = 0
        var primary = ""
        var lastError = ""
    }
    let view = Mutex(View())
    /// This node could not start a term when elected (its log failed): it gave the key up and does
    /// not stand again until restarted (a failed log refuses every change until then anyway).
    private let unfit = Mutex(false)

    /// When this coordinator started (monotonic): it stands in no election before a lease has passed.
    private let startedNanos = monotonicNanos()
    /// When this node first saw the primary's key absent, since it last saw it held (monotonic).
    private let keyAbsentSince = Mutex<UInt64?>(nil)

    init(etcd: EtcdClient, cluster: String, advertise: String, leaseSeconds: Int, server: ServerContext) {
        self.etcd = etcd
        self.cluster = cluster
        self.advertise = advertise
        self.leaseSeconds = leaseSeconds
        self.server = server
    }

    private var primaryKey: String { "/stockade/\(cluster)/primary" }
    private var nodesPrefix: String { "/stockade/\(cluster)/nodes/" }
    /// Written (without a lease, so it stays) by the transaction that elects a cluster's first
    /// primary, and by every election after: the cluster has a history.
    private var begunKey: String { "/stockade/\(cluster)/begun" }
    /// Whether the "not standing" warning was logged (once per process).
    private let warnedTermless = Mutex(false)

    /// This cluster as a data directory records it (``DataDirectory/clusterRecorded()``): its name and
    /// etcd's cluster id, so that a cluster of the same name on another etcd is another cluster.
    var membership: String { "\(cluster) etcd-cluster-\(etcd.clusterID ?? "?")" }

    /// A tick every quarter of the lease: renewals, the node's position, the primary's key.
    private var tickMillis: Int { max(50, leaseSeconds * 1000 / 4) }

    func start() {
        let task = Task { await self.run() }
        self.task.withLock { $0 = task }
    }

    func stop() async {
        let task = self.task.withLock { $0 }
        task?.cancel()
        await task?.value
        await etcd.shutdown()
    }

    private func run() async {
        var lease: Int64?
        while !Task.isCancelled {
            let sentNanos = monotonicNanos()
            do {
                // The node's own lease: granted once, kept alive every tick, granted again if it lapsed.
                if let current = lease, try await etcd.keepAlive(current) {
                    // Renewed; writes are extended below only if the primary key is still held by this lease.
                } else {
                    if server.isPrimary { server.engine.role.setWritableUntil(0) }
                    lease = try await etcd.grantLease(seconds: leaseSeconds)
                }
                guard let lease else { continue }
                // What this node stands on, published: a node that may not stand publishes "stopped",
                // so that no other node defers to it.
                var stands = standing
                if let mine = stands, try await !mayStand(mine) { stands = nil }
                try await etcd.put(nodesPrefix + advertise, stands.map { "\($0.epoch) \($0.position)" } ?? "stopped", lease: lease)
                try await decide(lease: lease, sentNanos: sentNanos, stands: stands)
                view.withLock { $0.lastError = "" }
            } catch {
                if Task.isCancelled { break }
                view.withLock { $0.lastError = "\(error)" }
                server.logger.warning("coordinator \(etcd.host):\(etcd.port): \(error)")
            }
            try? await Task.sleep(for: .milliseconds(tickMillis))
        }
    }

    /// The time a renewal's answer may take to matter: writes stop this long before the lease could
    /// lapse in etcd, for clock rates and the request's own time.
    static let marginNanos: UInt64 = 250_000_000

    private func decide(lease: Int64, sentNanos: UInt64, stands: (epoch: UInt64, position: UInt64)?) async throws {
        if let holder = try await etcd.get(primaryKey) {
            keyAbsentSince.withLock { $0 = nil }
            view.withLock { $0.epoch = holder.createRevision; $0.primary = holder.value }
            if holder.value == advertise && holder.lease == lease {
                if server.isPrimary {
                    // Ours, and the lease renewed at `sentNanos`: writes stay allowed until it could lapse.
                    server.engine.role.setWritableUntil(sentNanos + UInt64(leaseSeconds) * 1_000_000_000 - Self.marginNanos)
                } else {
                    // Ours but not acted on (the transaction's answer was lost).
                    await becomePrimary(epoch: holder.createRevision, sentNanos: sentNanos, lease: lease)
                }
                return
            }
            if holder.value == advertise {
                // Our address under an older lease (this node restarted within it): it lapses by itself.
                server.engine.role.setWritableUntil(0)
                return
            }
            // Another node is primary: follow it (a primary whose lease lapsed steps down here).
            if server.isPrimary {
                server.engine.role.setWritableUntil(0)
                server.logger.warning("\(holder.value) holds the primary key (epoch \(holder.createRevision)): stepping down")
            }
            guard let target = ServerConfiguration.hostAndPort(holder.value) else { return }
            server.replicationEpoch.withLock { $0 = max($0, holder.createRevision) }
            if server.replicaLink.withLock({ $0.map { "\($0.host):\($0.port)" } }) != holder.value {
                _ = await server.follow(host: target.host, port: target.port)
            } else if server.replication.link?.state == "connected" {
                // Following this cluster's primary (etcd may have been replaced since the link
                // began, and with it etcd's cluster id): this directory holds the cluster's history.
                try? server.store.directory.recordCluster(membership)
            }
            return
        }
        // No primary: the node with the newest history takes the key. A node that cannot stand (its
        // history was refused, or it holds no history of this cluster) never does.
        guard let mine = stands else { return }
        // Fencing counts on etcd keeping a lapsed primary's key until its lease ends. A node that has
        // not watched etcd for a whole lease (it just started), or saw etcd's revision go back (its
        // data was lost, and the key with it, while the old primary's lease may still run), waits a
        // lease before it stands: by then any former primary's own bound has passed.
        let quietSince = max(startedNanos, etcd.revisions.wentBackNanos ?? 0)
        guard monotonicNanos() >= quietSince + UInt64(leaseSeconds) * 1_000_000_000 else { return }
        // Nor before the key has been absent a whole tick: a replica that acknowledged the old
        // primary's last changes just before its lease lapsed publishes its position at its next
        // tick, and the election must count it (else a node with less log could win, and changes
        // answered OK would be lost). Every node publishes once a tick, before it decides.
        let now = monotonicNanos()
        let absentSince = keyAbsentSince.withLock { since in
            if since == nil { since = now }
            return since!
        }
        guard now >= absentSince + UInt64(tickMillis) * 1_000_000 else { return }
        var candidates = try await etcd.prefix(nodesPrefix).compactMap { kv -> Candidate? in
            let address = String(kv.key.dropFirst(nodesPrefix.count))
            guard address != advertise else { return nil }
            let words = kv.value.split(separator: " ")
            guard words.count == 2, let epoch = UInt64(words[0]), let position = UInt64(words[1]) else { return nil }
            return Candidate(address: address, epoch: epoch, position: position)
        }
        candidates.append(Candidate(address: advertise, epoch: mine.epoch, position: mine.position))
        guard Self.elected(candidates) == advertise else { return }
        if let epoch = try await etcd.create(primaryKey, advertise, lease: lease, marking: begunKey) {
            view.withLock { $0.epoch = epoch; $0.primary = advertise }
            await becomePrimary(epoch: epoch, sentNanos: sentNanos, lease: lease)
        }
    }

    /// Whether a node with history `mine` may stand in this cluster. A node without a term (an empty
    /// log, one that started over, another data set) stands only in a cluster that never had a
    /// primary: elected while every node with the cluster's history is down, it would make each of
    /// them set its whole log aside when it came back. Nor does a node whose directory holds another
    /// cluster's history (another data set with terms of its own would win on its epoch) or none
    /// recorded: it stands once it has followed this cluster's primary (which records the cluster).
    /// Costs a request only for such a node.
    private func mayStand(_ mine: (epoch: UInt64, position: UInt64)) async throws -> Bool {
        let recorded = server.store.directory.clusterRecorded()
        guard mine.epoch == 0 || recorded != membership, let begun = try await etcd.get(begunKey) else { return true }
        if !warnedTermless.withLock({ $0 }) {
            warnedTermless.withLock { $0 = true }
            let why = mine.epoch == 0
                ? "this node's log has no term"
                : "this node's data directory holds \(recorded.map { "the history of \"\($0)\"" } ?? "no history of a coordinated cluster") (its CLUSTER file), not of \"\(membership)\""
            server.logger.warning(
                "cluster \(cluster) has had primaries (first elected: \(begun.value)) and \(why): it does not stand for election; it follows the next primary. If every node lost its data, delete \(begunKey) in etcd to let it stand")
        }
        return false
    }

    /// A node as it stands for election: the newest epoch it has followed or held, then its durable
    /// position. (`stopped`, or a value that does not parse, stands for nothing.)
    struct Candidate: Equatable {
        var address: String
        var epoch: UInt64
        var position: UInt64
    }

    /// Who takes the key: the newest epoch first, then the most log, then the smallest address. So a
    /// node that never followed this cluster (epoch 0: another data set, a fresh start) or a former
    /// primary of an older term loses to any node that followed the latest primary, whatever its
    /// position; positions compare only within one history.
    static func elected(_ candidates: [Candidate]) -> String? {
        candidates.max { ($0.epoch, $0.position, $1.address) < ($1.epoch, $1.position, $0.address) }?.address
    }

    /// What this node stands on, or nil when its link to a primary was refused for good (a record
    /// did not fit, another shard count; a primary of an older build refused its log as diverged):
    /// such a node is not elected until an operator resets it. Nor while it starts over (its log went
    /// another way: ``ReplicaLink``), until a link after that follows the primary.
    private var standing: (epoch: UInt64, position: UInt64)? {
        if server.replication.link?.state == "stopped" || unfit.withLock({ $0 }) { return nil }
        // Starting over (its old log set aside): empty, or a copy not yet followed on; not a history.
        if server.replication.rejoin.inProgress || server.store.directory.isStartingOver { return nil }
        return (server.engine.epochs.lastEpoch, server.store.journal.lastDurableLSN)
    }

    /// Takes the term the key gives: logs its epoch (the key's revision, or one above the log's newest
    /// when etcd's revisions started again below it) and takes changes until the lease could lapse.
    /// A node that cannot log the term gives the key up (revokes its lease) so another is elected.
    private func becomePrimary(epoch: UInt64, sentNanos: UInt64, lease: Int64) async {
        let until = sentNanos + UInt64(leaseSeconds) * 1_000_000_000 - Self.marginNanos
        // Recorded first: a crash right after the term begins leaves a node that stands again.
        do { try server.store.directory.recordCluster(membership) } catch {
            server.logger.warning("could not record the cluster in \(server.store.directory.clusterMarkerPath) (\(error)): this node stands again once it follows a primary")
        }
        guard await server.promote(epoch: epoch, writableUntil: until) else {
            unfit.withLock { $0 = true }
            server.logger.error("elected primary of cluster \(cluster) but could not log the new term: giving the key up; this node does not stand again until restarted")
            do { try await etcd.revokeLease(lease) } catch {
                server.logger.warning("could not revoke lease \(lease) (\(error)): the key lapses with it")
            }
            return
        }
        server.logger.info("primary of cluster \(cluster) at epoch \(server.engine.epochs.lastEpoch) (key revision \(epoch)), log position \(server.store.journal.lastDurableLSN)")
    }
}

/// etcd's v3 JSON gateway over HTTP, through AsyncHTTPClient on the server's event loops: a few
/// short requests a tick (grant and keep alive a lease, put, get, create-if-absent, list by prefix),
/// over a kept-alive connection. Keys and values are base64, 64-bit numbers are JSON strings. Each call
/// is bounded as a whole by ``timeoutSeconds`` (connect, answer and body), its answer by
/// ``responseBytesMax``.
struct EtcdClient: Sendable {
    let host: String
    let port: Int
    let http: HTTPClient
    /// etcd's revision as its answers report it: going back means etcd lost its data (replaced by an
    /// empty one, or restored from an older copy), and with it the leases a primary's fencing counts on.
    let revisions = RevisionWatch()
    /// etcd's cluster id, as its answers' headers give it (nil before the first answer).
    var clusterID: String? { revisions.clusterID }

    /// The highest revision seen, and when (monotonic) an answer last reported a lower one; and etcd's
    /// cluster id, as the answers' headers give it.
    final class RevisionWatch: Sendable {
        private let state = Mutex<(highest: Int64, wentBackNanos: UInt64?)>((0, nil))

        func observe(_ revision: Int64, nowNanos: UInt64) {
            state.withLock {
                if revision < $0.highest { $0.wentBackNanos = nowNanos }
                $0.highest = revision
            }
        }

        var wentBackNanos: UInt64? { state.withLock { $0.wentBackNanos } }

        private let id = Mutex<String?>(nil)
        func observe(clusterID: String) { id.withLock { $0 = clusterID } }
        var clusterID: String? { id.withLock { $0 } }
    }

    /// A request that takes longer is a failed tick (the next one tries again).
    static let timeoutSeconds = 1
    /// An answer larger than this is not etcd's to a request of ours.
    static let responseBytesMax = 1 << 20

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    struct KeyValue {
        var key: String
        var value: String
        var createRevision: UInt64
        var lease: Int64
    }

    func grantLease(seconds: Int) async throws -> Int64 {
        let answer = try await call("/v3/lease/grant", ["TTL": seconds])
        guard let id = (answer["ID"] as? String).flatMap(Int64.init) else { throw Failure(description: "lease/grant: no ID") }
        return id
    }

    /// true while the lease lives; false once it lapsed (etcd answers a TTL of 0 or none).
    func keepAlive(_ lease: Int64) async throws -> Bool {
        let answer = try await call("/v3/lease/keepalive", ["ID": String(lease)])
        let result = answer["result"] as? [String: Any] ?? answer
        return (result["TTL"] as? String).flatMap(Int.init).map { $0 > 0 } ?? false
    }

    /// Ends a lease now: the keys under it go at once.
    func revokeLease(_ lease: Int64) async throws {
        _ = try await call("/v3/lease/revoke", ["ID": String(lease)])
    }

    func put(_ key: String, _ value: String, lease: Int64) async throws {
        _ = try await call("/v3/kv/put", ["key": Self.base64(key), "value": Self.base64(value), "lease": String(lease)])
    }

    func get(_ key: String) async throws -> KeyValue? {
        try await range(["key": Self.base64(key)]).first
    }

    /// Every key under `prefix`.
    func prefix(_ prefix: String) async throws -> [KeyValue] {
        var end = Array(prefix.utf8)
        end[end.count - 1] += 1
        return try await range(["key": Self.base64(prefix), "range_end": Data(end).base64EncodedString()])
    }

    /// Creates `key` if it does not exist (a transaction comparing its create revision with 0), and
    /// in the same transaction puts `marking` (without a lease: it stays); returns the key's create
    /// revision, or nil when another node holds it.
    func create(_ key: String, _ value: String, lease: Int64, marking: String) async throws -> UInt64? {
        let encoded = Self.base64(key)
        let answer = try await call("/v3/kv/txn", [
            "compare": [["key": encoded, "target": "CREATE", "create_revision": "0"]],
            "success": [
                ["request_put": ["key": encoded, "value": Self.base64(value), "lease": String(lease)]],
                ["request_put": ["key": Self.base64(marking), "value": Self.base64(value)]],
            ],
        ])
        guard answer["succeeded"] as? Bool == true else { return nil }
        return ((answer["header"] as? [String: Any])?["revision"] as? String).flatMap(UInt64.init)
    }

    private func range(_ body: [String: Any]) async throws -> [KeyValue] {
        let answer = try await call("/v3/kv/range", body)
        return (answer["kvs"] as? [[String: Any]] ?? []).compactMap { kv in
            guard let key = (kv["key"] as? String).flatMap(Self.decode),
                  let value = (kv["value"] as? String).flatMap(Self.decode) ?? Optional("")
            else { return nil }
            return KeyValue(
                key: key, value: value, createRevision: (kv["create_revision"] as? String).flatMap(UInt64.init) ?? 0,
                lease: (kv["lease"] as? String).flatMap(Int64.init) ?? 0)
        }
    }

    static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
    static func decode(_ base64: String) -> String? { Data(base64Encoded: base64).flatMap { String(data: $0, encoding: .utf8) } }

    /// A client on `group` for etcd at `host:port`; ``shutdown()`` ends it.
    init(host: String, port: Int, group: EventLoopGroup) {
        self.host = host
        self.port = port
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .seconds(Int64(Self.timeoutSeconds)), read: .seconds(Int64(Self.timeoutSeconds))))
        configuration.connectionPool = .init(idleTimeout: .seconds(Int64(Self.idleSeconds)))
        configuration.httpVersion = .http1Only
        http = HTTPClient(eventLoopGroup: group, configuration: configuration)
    }

    /// A kept-alive connection to etcd is closed after this long unused (ticks come every quarter lease).
    static let idleSeconds = 60

    /// Closes the client's connections; a call in flight fails.
    func shutdown() async {
        try? await http.shutdown()
    }

    private var base: String { host.contains(":") ? "http://[\(host)]:\(port)" : "http://\(host):\(port)" }

    private func call(_ path: String, _ body: [String: Any]) async throws -> [String: Any] {
        var request = HTTPClientRequest(url: base + path)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let http = self.http, prepared = request
        let bytes = try await Self.within(seconds: Self.timeoutSeconds, path) { () async throws -> ByteBuffer in
            let response = try await http.execute(prepared, timeout: .seconds(Int64(Self.timeoutSeconds)))
            guard response.status == .ok else {
                throw Failure(description: "\(path): HTTP \(response.status.code) \(response.status.reasonPhrase)")
            }
            return try await response.body.collect(upTo: Self.responseBytesMax)
        }
        // A streaming call's answer is one JSON object per line: the first is ours.
        let view = bytes.readableBytesView
        let line = view.firstIndex(of: 10).map { view[..<$0] } ?? view[...]
        let json = try JSONSerialization.jsonObject(with: Data(line))
        guard let object = json as? [String: Any] else { throw Failure(description: "\(path): not a JSON object") }
        let header = (object["result"] as? [String: Any])?["header"] ?? object["header"]
        if let revision = ((header as? [String: Any])?["revision"] as? String).flatMap(Int64.init) {
            revisions.observe(revision, nowNanos: monotonicNanos())
        }
        if let id = (header as? [String: Any])?["cluster_id"] as? String, !id.isEmpty, id.count <= 32 {
            revisions.observe(clusterID: id)
        }
        return object
    }

    /// Runs `work`, cancelled (and failed) after `seconds`: the client's own deadline ends at the
    /// answer's head, and its read timeout is per read, so a body that trickles would not be bounded.
    private static func within<T: Sendable>(
        seconds: Int, _ path: String, _ work: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await work() }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                return nil
            }
            defer { group.cancelAll() }
            do {
                guard let first = try await group.next(), let value = first else {
                    throw Failure(description: "etcd \(path): no answer in \(seconds) s")
                }
                return value
            } catch let failure as Failure {
                throw failure
            } catch {
                throw Failure(description: "etcd \(path): \(error)")
            }
        }
    }
}
