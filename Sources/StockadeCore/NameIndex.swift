import CPrefetch

/// Client-chosen ids (SKUs, users) interned to dense indexes 0, 1, 2, …: the names in an array by
/// index, and an open-addressing hash table from name to index that stores, per slot, only the
/// index and 32 bits of the name's hash.
///
/// Why this shape: a reservation from a new user looks the user up, then adds it. With a `Dictionary`
/// keyed by ``Name``, every lookup hashed the name and compared keys inside the table, and every
/// growth rehashed every name, following the pointer of each id over 15 bytes. Here a slot is 8
/// bytes (a cache line holds 8), a probe compares the stored hash bits before it reads a name, and
/// growth moves slots by their stored hash without reading a name at all.
///
/// Hash flooding: names hash with ``Name/fastHash(seed:)`` under a seed drawn at random for each
/// index, so which names share a partition or a probe run cannot be chosen in advance. The seed
/// changes nothing a client can see: lookups answer the same, and ``names`` is in index order.
///
/// Growth is bounded in pause: the table is split into ``partitionCount`` partitions by the top bits
/// of the hash, each grown (doubled) on its own, so one insertion moves at most the slots of one
/// partition, about 1/64 of the ids: about 0.5 ms when a shard passes 1.5M ids (measured, 17-byte
/// ids), where one table would move all of them at once. Growth never reads a name.
struct NameIndex: Sendable {
    /// 64 partitions: a growth moves at most 1/64 of the ids. The seeded hash spreads ids evenly, so
    /// a partition's share stays near 1/64.
    static let partitionCount = 64
    /// Partitions start at 8 slots and double past 3/4 full (linear probing: an absent name costs
    /// about 8 probes at 3/4, a present one about 2.5; slots are 8 bytes, so that is a cache line or two).
    static let partitionSlotsMin = 8

    /// The names by index: `names[Int(i)]` is the name of index `i`. Chunked, so that adding a name
    /// never copies the ones before it (a contiguous array of a million names takes tens of
    /// milliseconds to double).
    private(set) var names = ChunkedArray<Name>()
    private var partitions = [Partition](repeating: Partition(), count: partitionCount)
    private let seed: UInt64

    /// One open-addressing table. A slot is `(index + 1) << 32 | low 32 bits of the hash`; 0 is empty.
    /// The slot of a name is found from the low bits of its stored hash, so a capacity of up to 2^32
    /// slots (more than ``Limits/ordersPerShardMax`` ids need) is placed from the stored bits alone.
    struct Partition: Sendable {
        var slots: [UInt64] = []
        var count = 0
    }

    init() {
        seed = UInt64.random(in: .min ... .max)
    }

    /// Ids held.
    var count: Int { names.count }

    /// The index of `name`, or nil.
    subscript(_ name: Name) -> UInt32? { index(of: name, hash: hash(name)) }

    /// The hash of `name` in this index: a caller that looks a name up and then adds it hashes once.
    @inline(__always)
    func hash(_ name: Name) -> UInt64 { name.fastHash(seed: seed) }

    /// The index of `name`, whose ``hash(_:)`` is `hash`, or nil.
    func index(of name: Name, hash: UInt64) -> UInt32? {
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
                    if names[Int(index)] == name { return index }
                }
                i = (i + 1) & mask
            }
        }
    }

    /// Starts loading the slot where a lookup of `name` begins, and returns at once; changes nothing.
    ///
    /// For a caller about to look up several names: a shard's group of reservations, each from a user
    /// it may not have seen. In a table of a million users that slot is a cache miss (and in a virtual
    /// machine often a page walk too) of about 200 ns; prefetched together, the misses overlap instead
    /// of coming one after another.
    func prefetch(_ name: Name) {
        let hash = hash(name)
        partitions[Self.partition(hash)].slots.withUnsafeBufferPointer { slots in
            guard !slots.isEmpty, let base = slots.baseAddress else { return }
            stockade_prefetch(base + (Int(UInt32(truncatingIfNeeded: hash)) & (slots.count - 1)))
        }
    }

    /// Adds a name that is not in the index; returns its index, ``count`` before the call.
    @discardableResult
    mutating func append(_ name: Name) -> UInt32 { append(name, hash: hash(name)) }

    /// Adds a name that is not in the index, whose ``hash(_:)`` is `hash`; returns its index.
    @discardableResult
    mutating func append(_ name: Name, hash: UInt64) -> UInt32 {
        assert(hash == self.hash(name) && index(of: name, hash: hash) == nil, "\(name) is already in the index")
        precondition(names.count < Int(UInt32.max - 1), "index full")
        let index = UInt32(names.count)
        names.append(name)
        let p = Self.partition(hash)
        if (partitions[p].count + 1) * 4 > partitions[p].slots.count * 3 { grow(p) }
        partitions[p].count += 1
        let slot = UInt64(index + 1) << 32 | UInt64(UInt32(truncatingIfNeeded: hash))
        partitions[p].slots.withUnsafeMutableBufferPointer { Self.place(slot, in: $0) }
        return index
    }

    /// Forgets the newest name (the one of index ``count`` - 1).
    mutating func removeLast() {
        let name = names[names.count - 1]
        names.removeLast()
        let hash = name.fastHash(seed: seed)
        let p = Self.partition(hash)
        let target = UInt64(names.count + 1) << 32 | UInt64(UInt32(truncatingIfNeeded: hash))
        partitions[p].count -= 1
        partitions[p].slots.withUnsafeMutableBufferPointer { slots in
            let mask = slots.count - 1
            var hole = Int(UInt32(truncatingIfNeeded: hash)) & mask
            while slots[hole] != target {
                precondition(slots[hole] != 0, "the newest name is missing from its partition")
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

    mutating func reserveCapacity(_ capacity: Int) {
        names.reserveCapacity(capacity)
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
    private static func partition(_ hash: UInt64) -> Int {
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
