import CPrefetch

/// The hash table under ``NameIndex`` and ``RequestIndex``: dense indexes 0, 1, 2, … of entries that
/// live elsewhere (in a ``ChunkedArray``), found by a 64-bit hash. Open addressing with linear probing;
/// a slot is `(index + 1) << 32 | low 32 bits of the hash`, 0 for empty, 8 bytes (a cache line holds
/// 8), so a probe compares the stored hash bits before the caller reads an entry, and growth moves
/// slots by their stored bits without reading an entry at all.
///
/// Growth is bounded in pause: the table is split into ``partitionCount`` partitions by the top bits
/// of the hash, each grown (doubled) on its own, so one insertion moves at most the slots of one
/// partition, about 1/64 of the entries: about 0.5 ms when a table passes 1.5M entries (measured,
/// 17-byte ids), where one table would move all of them at once. A `Dictionary` rehashes everything it
/// holds when it doubles, hashing each key again: 0.6 s at 1.5M request ids, 1.8 s at 3M, a stall of
/// the event loop and every client on it.
///
/// The slot of an index is found from the low bits of its stored hash, so a capacity of up to 2^32
/// slots (more than ``Limits/ordersPerShardMax`` entries need) is placed from the stored bits alone.
/// Hashes must come from a seeded hash whose seed clients never see (``Name/fastHash(seed:)``), so
/// which entries share a partition or a probe run cannot be chosen in advance.
struct HashSlots: Sendable {
    /// 64 partitions: a growth moves at most 1/64 of the entries. A seeded hash spreads entries evenly,
    /// so a partition's share stays near 1/64.
    static let partitionCount = 64
    /// Partitions start at 8 slots and double past 3/4 full (an absent entry costs about 8 probes at
    /// 3/4, a present one about 2.5; slots are 8 bytes, so that is a cache line or two).
    static let partitionSlotsMin = 8

    struct Partition: Sendable {
        var slots: [UInt64] = []
        var count = 0
    }

    private var partitions = [Partition](repeating: Partition(), count: partitionCount)

    /// The first index stored with `hash` for which `matches` is true, or nil. `matches` is asked only
    /// about indexes whose stored 32 bits of hash are `hash`'s.
    @inline(__always)
    func find(hash: UInt64, where matches: (UInt32) -> Bool) -> UInt32? {
        partitions[Self.partition(hash)].slots.withUnsafeBufferPointer { slots in
            guard !slots.isEmpty else { return nil }
            let mask = slots.count - 1
            let fingerprint = UInt32(truncatingIfNeeded: hash)
            var i = Int(fingerprint) & mask
            while true {
                let slot = slots[i]
                if slot == 0 { return nil }
                if UInt32(truncatingIfNeeded: slot) == fingerprint {
                    let index = UInt32(truncatingIfNeeded: slot >> 32) - 1
                    if matches(index) { return index }
                }
                i = (i + 1) & mask
            }
        }
    }

    /// Starts loading the slot where a lookup of `hash` begins, and returns at once; changes nothing.
    @inline(__always)
    func prefetch(hash: UInt64) {
        partitions[Self.partition(hash)].slots.withUnsafeBufferPointer { slots in
            guard !slots.isEmpty, let base = slots.baseAddress else { return }
            stockade_prefetch(base + (Int(UInt32(truncatingIfNeeded: hash)) & (slots.count - 1)))
        }
    }

    /// Adds `index`, stored with `hash`; the caller knows it is not there yet.
    mutating func insert(_ index: UInt32, hash: UInt64) {
        precondition(index < UInt32.max - 1, "index full")
        let p = Self.partition(hash)
        if (partitions[p].count + 1) * 4 > partitions[p].slots.count * 3 { grow(p) }
        partitions[p].count += 1
        let slot = UInt64(index + 1) << 32 | UInt64(UInt32(truncatingIfNeeded: hash))
        partitions[p].slots.withUnsafeMutableBufferPointer { Self.place(slot, in: $0) }
    }

    /// Removes `index`, stored with `hash`; it must be there.
    mutating func remove(_ index: UInt32, hash: UInt64) {
        let p = Self.partition(hash)
        let target = UInt64(index + 1) << 32 | UInt64(UInt32(truncatingIfNeeded: hash))
        partitions[p].count -= 1
        partitions[p].slots.withUnsafeMutableBufferPointer { slots in
            let mask = slots.count - 1
            var hole = Int(UInt32(truncatingIfNeeded: hash)) & mask
            while slots[hole] != target {
                precondition(slots[hole] != 0, "the entry to remove is missing from its partition")
                hole = (hole + 1) & mask
            }
            // Backward-shift deletion: pull later slots of the run into the hole when the hole lies
            // between their home and where they sit, so every probe run stays unbroken.
            var i = (hole + 1) & mask
            while slots[i] != 0 {
                let home = Int(UInt32(truncatingIfNeeded: slots[i])) & mask
                if (i - home) & mask >= (i - hole) & mask {
                    slots[hole] = slots[i]
                    hole = i
                }
                i = (i + 1) & mask
            }
            slots[hole] = 0
        }
    }

    /// Grows the partitions ahead for `capacity` entries in all.
    mutating func reserveCapacity(_ capacity: Int) {
        // Room for an eighth more than an even share, so that most partitions need not grow again.
        let share = capacity / Self.partitionCount + capacity / (8 * Self.partitionCount) + 1
        for p in partitions.indices {
            var slots = Self.partitionSlotsMin
            while share * 4 > slots * 3 { slots *= 2 }
            if slots > partitions[p].slots.count { rebuild(p, slotCount: slots) }
        }
    }

    /// The partition of a hash: its top bits (the slot comes from the low bits).
    @inline(__always)
    static func partition(_ hash: UInt64) -> Int {
        Int(truncatingIfNeeded: hash >> 58)
    }

    /// Puts a slot at the first empty place of its probe run (there is one: the load stays below 3/4).
    @inline(__always)
    private static func place(_ slot: UInt64, in slots: UnsafeMutableBufferPointer<UInt64>) {
        let mask = slots.count - 1
        var i = Int(UInt32(truncatingIfNeeded: slot)) & mask
        while slots[i] != 0 { i = (i + 1) & mask }
        slots[i] = slot
    }

    private mutating func grow(_ p: Int) {
        rebuild(p, slotCount: max(Self.partitionSlotsMin, partitions[p].slots.count * 2))
    }

    /// Moves one partition's slots into a table of `slotCount` slots, by their stored hash bits.
    private mutating func rebuild(_ p: Int, slotCount: Int) {
        var slots = [UInt64](repeating: 0, count: slotCount)
        slots.withUnsafeMutableBufferPointer { new in
            for slot in partitions[p].slots where slot != 0 { Self.place(slot, in: new) }
        }
        partitions[p].slots = slots
    }
}
