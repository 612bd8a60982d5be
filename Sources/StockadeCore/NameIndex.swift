/// Client-chosen ids (SKUs, users) mapped to dense indexes. The key hashes with a fast 64-bit
/// multiply-mix seeded per process, instead of SipHash: these lookups are most of a reservation's
/// cost, and the per-process seed still keeps collisions from being chosen in advance.
struct NameIndex {
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

    private var table: [Key: UInt32] = [:]

    subscript(_ name: String) -> UInt32? {
        get { table[Key(name: name)] }
        set { table[Key(name: name)] = newValue }
    }

    var count: Int { table.count }

    mutating func reserveCapacity(_ capacity: Int) { table.reserveCapacity(capacity) }
}
