import NIOCore
import Synchronization

/// One client connection as CLIENT LIST, CLIENT INFO and CLIENT KILL see it. Written by its own
/// connection (names, the time of its last round, its protocol), read by any connection's CLIENT.
final class ClientRecord: Sendable {
    let id: Int64
    /// `ip:port` of the client, and of the server's side of the connection.
    let address: String
    let localAddress: String
    let createdNanos: UInt64
    let channel: any Channel
    /// When its last round began (CLIENT LIST's `idle`): one store a round.
    let lastActiveNanos: Atomic<UInt64>
    /// 2 or 3 (HELLO).
    let protocolVersion = Atomic<Int>(2)
    /// The connection became a replica's log stream (REPLICATE): flag `S`, TYPE replica.
    let isReplica = Atomic<Bool>(false)
    private let names = Mutex<Names>(Names())

    struct Names {
        var name = ""
        var libraryName = ""
        var libraryVersion = ""
    }

    init(id: Int64, channel: any Channel, nowNanos: UInt64) {
        self.id = id
        self.channel = channel
        address = channel.remoteAddress.map(Self.key) ?? "?:0"
        localAddress = channel.localAddress.map(Self.key) ?? "?:0"
        createdNanos = nowNanos
        lastActiveNanos = Atomic(nowNanos)
    }

    /// An address as Redis shows it: `ip:port`.
    static func key(_ address: SocketAddress) -> String {
        "\(address.ipAddress ?? "?"):\(address.port ?? 0)"
    }

    var name: String { names.withLock { $0.name } }

    func set(_ field: ClientField, _ value: String) {
        names.withLock {
            switch field {
            case .name: $0.name = value
            case .libraryName: $0.libraryName = value
            case .libraryVersion: $0.libraryVersion = value
            }
        }
    }

    /// Its line of CLIENT LIST (without the newline), with Redis's field names for what Stockade
    /// knows of a connection: no figures it does not measure (query buffers, output lists, memory).
    func line(nowNanos: UInt64) -> String {
        let names = self.names.withLock { $0 }
        let age = (nowNanos &- createdNanos) / 1_000_000_000
        let idle = (nowNanos &- min(nowNanos, lastActiveNanos.load(ordering: .relaxed))) / 1_000_000_000
        let flags = isReplica.load(ordering: .relaxed) ? "S" : "N"
        return "id=\(id) addr=\(address) laddr=\(localAddress) name=\(names.name) age=\(age) idle=\(idle) flags=\(flags) db=0 "
            + "user=default resp=\(protocolVersion.load(ordering: .relaxed)) lib-name=\(names.libraryName) lib-ver=\(names.libraryVersion)"
    }
}

/// What CLIENT SETNAME and CLIENT SETINFO set.
enum ClientField: Sendable, Equatable {
    case name, libraryName, libraryVersion
}

/// Which connections CLIENT KILL closes: every condition given must hold.
struct ClientKillFilter: Sendable, Equatable {
    var id: Int64?
    var address: String?
    var localAddress: String?
    /// TYPE normal / replica (master and pubsub match none here).
    var replica: Bool?
    var matchesNone = false
    /// SKIPME yes (the default): the connection sending it is spared.
    var skipMe = true
    /// The old form, `CLIENT KILL ip:port`: `+OK` or an error, not a count.
    var oldForm = false
}

/// Every client connection, by id (CLIENT LIST, CLIENT KILL). Connections enter when admitted and
/// leave when they close; a lock taken then and by CLIENT's subcommands, never per command.
final class ClientRegistry: Sendable {
    private let clients = Mutex<[Int64: ClientRecord]>([:])

    func add(_ record: ClientRecord) { clients.withLock { $0[record.id] = record } }
    func remove(_ id: Int64) { _ = clients.withLock { $0.removeValue(forKey: id) } }
    func record(_ id: Int64) -> ClientRecord? { clients.withLock { $0[id] } }

    /// All of them, by id.
    var all: [ClientRecord] { clients.withLock { Array($0.values) }.sorted { $0.id < $1.id } }

    /// Those every given condition holds for, by id (CLIENT LIST; CLIENT KILL's filters).
    func matching(ids: [Int64]? = nil, address: String? = nil, localAddress: String? = nil, replica: Bool? = nil) -> [ClientRecord] {
        all.filter { record in
            (ids.map { $0.contains(record.id) } ?? true)
                && (address.map { $0 == record.address } ?? true)
                && (localAddress.map { $0 == record.localAddress } ?? true)
                && (replica.map { $0 == record.isReplica.load(ordering: .relaxed) } ?? true)
        }
    }

    /// The connections `filter` names (for the client `me`), closed; returns how many.
    func kill(_ filter: ClientKillFilter, me: Int64) -> Int {
        guard !filter.matchesNone else { return 0 }
        let chosen = matching(ids: filter.id.map { [$0] }, address: filter.address, localAddress: filter.localAddress, replica: filter.replica)
            .filter { !(filter.skipMe && $0.id == me) }
        for record in chosen { record.channel.close(promise: nil) }
        return chosen.count
    }
}
