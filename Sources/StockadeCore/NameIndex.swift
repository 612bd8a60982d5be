/// Client-chosen ids (SKUs, users) mapped to dense indexes. The key hashes with a fast 64-bit
/// multiply-mix seeded per process, instead of SipHash: these lookups are most of a reservation's
/// cost, and the per-process seed still keeps collisions from being chosen in advance.
///
/// The map is split into ``partitionCount`` dictionaries by a hash of the id, so that growing it
/// rehashes one small dictionary at a time: one dictionary of 786,432 user ids takes about 90 ms to
/// double (measured), which a shard would spend with every client waiting.
struct NameIndex {
    /// 64 partitions: a resize then moves at most 1/64 of the ids (about 1.5 ms at a million).
    static let partitionCount = 64

    struct Key: Hashable {
        let name: String

        static func == (a: Key, b: Key) -> Bool { a.name == b.name }

        func hash(into hasher: inout Hasher) { hasher.combine(fastHash(seed: 0)) }

        func _rawHashValue(seed: Int) -> Int { fastHash(seed: UInt64(bitPattern: Int64(seed))) }

        @inline(__always)
        func fastHash(seed: UInt64) -> Int {
            let hash = name.utf8.withContiguousStorageIfAvailable { Self.mix($0, seed: seed) }
                ?? Self.mix(Array(name.utf8), seed: seed)
            return Int(truncatingIfNeeded: hash)
        }

        @inline(__always)
        static func mix<C: RandomAccessCollection>(_ bytes: C, seed: UInt64) -> UInt64 where C.Element == UInt8, C.Index == Int {
            var h = seed ^ (UInt64(bytes.count) &* 0x9E37_79B9_7F4A_7C15)
            var i = bytes.startIndex
            while i + 8 <= bytes.endIndex {
                var word: UInt64 = 0
                for k in 0..<8 { word |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
                h = (h ^ word) &* 0xBF58_476D_1CE4_E5B9
                h ^= h >> 31
                i += 8
            }
            var tail: UInt64 = 0
            var shift: UInt64 = 0
            while i < bytes.endIndex {
                tail |= UInt64(bytes[i]) << shift
                shift += 8
                i += 1
            }
            h = (h ^ tail) &* 0x94D0_49BB_1331_11EB
            h ^= h >> 29
            h = h &* 0xBF58_476D_1CE4_E5B9
            return h ^ (h >> 32)
        }
    }

    private var partitions = [[Key: UInt32]](repeating: [:], count: partitionCount)

    /// The partition of an id: a fixed-seed hash, independent of the dictionaries' own seeded hash.
    @inline(__always)
    private static func partition(_ key: Key) -> Int {
        Int(truncatingIfNeeded: UInt64(bitPattern: Int64(key.fastHash(seed: 0x5DEE_CE66_D1CE_4E5B))) >> 58)
    }

    subscript(_ name: String) -> UInt32? {
        get {
            let key = Key(name: name)
            return partitions[Self.partition(key)][key]
        }
        set {
            let key = Key(name: name)
            partitions[Self.partition(key)][key] = newValue
        }
    }

    var count: Int { partitions.reduce(0) { $0 + $1.count } }

    mutating func reserveCapacity(_ capacity: Int) {
        for i in partitions.indices { partitions[i].reserveCapacity(capacity / Self.partitionCount + 1) }
    }
}
