/// Units a user holds or has bought (PENDING + PAID) of a SKU with a per-user limit, by the pair
/// `user index << 32 | SKU index`; pairs holding nothing are not kept.
///
/// Why not a `Dictionary`: a flash sale of a limited SKU adds a pair per new user, millions in a
/// shard, and a `Dictionary` that doubles rehashes every pair in one step on the event loop (119-267
/// ms of stall at about 3M orders of new users, redis-benchmark's max latency, one loop). Here the
/// table is split into ``partitionCount`` partitions by the top bits of the hash, each grown (doubled)
/// on its own, as ``HashSlots`` is; a slot holds the pair and its units, so a lookup reads one slot
/// run and nothing else. Open addressing with linear probing; removal shifts later slots of the run
/// back (no tombstones), so a table whose pairs come and go does not fill up with dead slots.
///
/// Hash flooding: pairs hash under two seeds drawn at random for each table, so which pairs share a
/// partition or a probe run cannot be chosen in advance by choosing users.
struct HeldUnits: Sendable {
    /// As ``HashSlots``'s: 64 partitions, each starting at 8 slots and doubled past 3/4 full.
    static var partitionCount: Int { HashSlots.partitionCount }
    static var partitionSlotsMin: Int { HashSlots.partitionSlotsMin }

    /// 12 bytes: the pair as two 32-bit halves, the user's + 1 (0 is an empty slot; a user index is
    /// below 2^32 - 2). A 64-bit key would make the slot 16 bytes, and with the array's header a
    /// partition of 2^k slots then falls just past an allocator size class (112 against 99.5 bytes an
    /// order under `stockade measure memory --limit 1`).
    struct Slot: Sendable {
        var userPlusOne: UInt32
        var sku: UInt32
        var units: UInt32

        static let empty = Slot(userPlusOne: 0, sku: 0, units: 0)
        var isEmpty: Bool { userPlusOne == 0 }
        var pair: UInt64 { UInt64(userPlusOne - 1) << 32 | UInt64(sku) }
        func holds(_ pair: UInt64) -> Bool { userPlusOne == UInt32(truncatingIfNeeded: pair >> 32) &+ 1 && sku == UInt32(truncatingIfNeeded: pair) }
    }

    struct Partition: Sendable {
        var slots: [Slot] = []
        var count = 0
    }

    private var partitions = [Partition](repeating: Partition(), count: partitionCount)
    private let seeds = (UInt64.random(in: .min ... .max), UInt64.random(in: .min ... .max))
    /// Pairs held.
    private(set) var count = 0

    @inline(__always)
    private func hash(_ pair: UInt64) -> UInt64 { Self.hash(pair, seeds) }

    @inline(__always)
    private static func hash(_ pair: UInt64, _ seeds: (UInt64, UInt64)) -> UInt64 {
        let h = Name.foldedMultiply(pair ^ seeds.0, 0xE703_7ED1_A0B4_28DB)
        return Name.foldedMultiply(h ^ seeds.1, 0x8EBC_6AF0_9C88_C6E3)
    }

    /// The partition of `pair` and the place of its slot there, or of the empty slot that ends its run.
    @inline(__always)
    private func locate(_ pair: UInt64) -> (partition: Int, place: Int, found: Bool) {
        let hash = hash(pair)
        let p = HashSlots.partition(hash)
        return partitions[p].slots.withUnsafeBufferPointer { slots in
            guard !slots.isEmpty else { return (p, -1, false) }
            let mask = slots.count - 1
            var i = Int(truncatingIfNeeded: hash) & mask
            while true {
                if slots[i].isEmpty { return (p, i, false) }
                if slots[i].holds(pair) { return (p, i, true) }
                i = (i + 1) & mask
            }
        }
    }

    /// The units of `pair`, 0 when it holds none.
    subscript(pair: UInt64) -> UInt32 {
        let (p, i, found) = locate(pair)
        return found ? partitions[p].slots[i].units : 0
    }

    /// Adds `units` to `pair` (0 adds nothing: a pair holding nothing is not kept).
    mutating func add(_ units: UInt32, to pair: UInt64) {
        precondition(pair >> 32 < UInt64(UInt32.max))
        guard units > 0 else { return }
        var (p, i, found) = locate(pair)
        if found {
            partitions[p].slots[i].units += units
            return
        }
        if (partitions[p].count + 1) * 4 > partitions[p].slots.count * 3 {
            rebuild(p, slotCount: max(Self.partitionSlotsMin, partitions[p].slots.count * 2))
            (p, i, found) = locate(pair)
        }
        partitions[p].slots[i] = Slot(
            userPlusOne: UInt32(truncatingIfNeeded: pair >> 32) + 1, sku: UInt32(truncatingIfNeeded: pair), units: units)
        partitions[p].count += 1
        count += 1
    }

    /// Sets the units of `pair`; 0 removes it.
    mutating func set(_ units: UInt32, for pair: UInt64) {
        let (p, i, found) = locate(pair)
        if found {
            if units > 0 { partitions[p].slots[i].units = units } else { remove(partition: p, at: i) }
        } else if units > 0 {
            add(units, to: pair)
        }
    }

    /// Every pair with its units, in no particular order.
    var pairs: [(pair: UInt64, units: UInt32)] {
        var out: [(pair: UInt64, units: UInt32)] = []
        out.reserveCapacity(count)
        for partition in partitions {
            for slot in partition.slots where !slot.isEmpty { out.append((slot.pair, slot.units)) }
        }
        return out
    }

    /// Empties the slot at `hole` and shifts later slots of its run back into the gap, when the gap
    /// lies between their home and where they sit, so every probe run stays unbroken.
    private mutating func remove(partition p: Int, at hole: Int) {
        partitions[p].count -= 1
        count -= 1
        let seeds = seeds
        partitions[p].slots.withUnsafeMutableBufferPointer { slots in
            let mask = slots.count - 1
            var hole = hole
            var i = (hole + 1) & mask
            while !slots[i].isEmpty {
                let home = Int(truncatingIfNeeded: Self.hash(slots[i].pair, seeds)) & mask
                if (i - home) & mask >= (i - hole) & mask {
                    slots[hole] = slots[i]
                    hole = i
                }
                i = (i + 1) & mask
            }
            slots[hole] = .empty
        }
    }

    /// Moves one partition's slots into a table of `slotCount` slots.
    private mutating func rebuild(_ p: Int, slotCount: Int) {
        var slots = [Slot](repeating: .empty, count: slotCount)
        let mask = slotCount - 1
        for slot in partitions[p].slots where !slot.isEmpty {
            var i = Int(truncatingIfNeeded: hash(slot.pair)) & mask
            while !slots[i].isEmpty { i = (i + 1) & mask }
            slots[i] = slot
        }
        partitions[p].slots = slots
    }
}
