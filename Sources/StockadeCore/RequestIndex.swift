/// A shard's request ids: (user index, request id) -> the sequence of the order placed under them,
/// for idempotent reservations. Entries are only added (a request id answers for its order for as
/// long as the order is kept).
///
/// Why not a `Dictionary`: a flash sale whose clients send request ids adds one per order, millions
/// in a shard, and a `Dictionary` that doubles rehashes every key it holds in one step, on the event
/// loop: 516 ms of stall at about 3M orders under RESERVE ... REQ (redis-benchmark's max latency, one
/// loop; 19 ms without request ids). Here the entries live in a ``ChunkedArray`` (never copied) and
/// the table is ``HashSlots`` (64 partitions, each grown on its own, never reading an entry).
///
/// An entry's hash is its request id's ``Name/fastHash(seed:)`` under a seed drawn at random for
/// each index, folded with its user's hash in the shard's user index (``NameIndex/hash(_:)``, seeded
/// too): so which entries share a partition or a probe run cannot be chosen in advance, clients
/// that number their requests 1, 2, 3 each do not all share one hash per number, and a shard can
/// start loading an entry's slot (``prefetch(hash:)``) before it knows the user's index.
struct RequestIndex: Sendable {
    struct Entry: Sendable {
        var user: UInt32
        var sequence: UInt32
        var requestId: Name
    }

    /// Every entry, in the order added.
    private(set) var entries = ChunkedArray<Entry>()
    private var slots = HashSlots()
    private let seed: UInt64

    init() {
        seed = UInt64.random(in: .min ... .max)
    }

    var count: Int { entries.count }
    var isEmpty: Bool { entries.isEmpty }

    /// The hash an entry is stored with: `userHash` is the user's ``NameIndex/hash(_:)``.
    @inline(__always)
    func hash(userHash: UInt64, requestId: Name) -> UInt64 {
        Name.foldedMultiply(requestId.fastHash(seed: seed) ^ 0xA076_1D64_78BD_642F, userHash ^ 0xE703_7ED1_A0B4_28DB)
    }

    /// Starts loading the slot where a lookup of `hash` begins, and returns at once; changes nothing.
    func prefetch(hash: UInt64) { slots.prefetch(hash: hash) }

    private func position(user: UInt32, requestId: Name, hash: UInt64) -> UInt32? {
        slots.find(hash: hash) { i in
            let entry = entries[Int(i)]
            return entry.user == user && entry.requestId == requestId
        }
    }

    /// The order sequence stored for `requestId` of user `user`, whose ``hash(userHash:requestId:)`` is `hash`, or nil.
    subscript(user user: UInt32, requestId requestId: Name, hash hash: UInt64) -> UInt32? {
        position(user: user, requestId: requestId, hash: hash).map { entries[Int($0)].sequence }
    }

    /// Stores `sequence` for `requestId` of user `user`, replacing what was stored for them.
    mutating func set(_ sequence: UInt32, user: UInt32, requestId: Name, hash: UInt64) {
        if let i = position(user: user, requestId: requestId, hash: hash) {
            entries[Int(i)].sequence = sequence
            return
        }
        precondition(entries.count < Int(UInt32.max - 1), "request index full")
        slots.insert(UInt32(entries.count), hash: hash)
        entries.append(Entry(user: user, sequence: sequence, requestId: requestId))
    }
}
