/// Client-chosen ids (SKUs, users) mapped to dense indexes. ``Name`` hashes with a fast 64-bit
/// multiply-mix seeded per process, instead of SipHash: these lookups are most of a reservation's
/// cost, and the per-process seed still keeps collisions from being chosen in advance. Keys compare
/// byte for byte.
///
/// The map is split into ``partitionCount`` dictionaries by a hash of the id, so that growing it
/// rehashes one small dictionary at a time: one dictionary of 786,432 user ids takes about 90 ms to
/// double (measured), which a shard would spend with every client waiting.
struct NameIndex {
    /// 64 partitions: a resize then moves at most 1/64 of the ids (about 1.5 ms at a million).
    static let partitionCount = 64

    /// A name whose dictionary hash is ``Name/fastHash(seed:)`` seeded by the dictionary.
    typealias Key = Name

    private var partitions = [[Key: UInt32]](repeating: [:], count: partitionCount)

    /// The partition of an id: a fixed-seed hash, independent of the dictionaries' own seeded hash.
    @inline(__always)
    private static func partition(_ key: Key) -> Int {
        Int(truncatingIfNeeded: key.fastHash(seed: 0x5DEE_CE66_D1CE_4E5B) >> 58)
    }

    subscript(_ name: Name) -> UInt32? {
        get {
            partitions[Self.partition(name)][name]
        }
        set {
            partitions[Self.partition(name)][name] = newValue
        }
    }

    var count: Int { partitions.reduce(0) { $0 + $1.count } }

    mutating func reserveCapacity(_ capacity: Int) {
        for i in partitions.indices { partitions[i].reserveCapacity(capacity / Self.partitionCount + 1) }
    }
}
