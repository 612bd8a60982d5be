/// Client-chosen ids (SKUs, users) interned to dense indexes 0, 1, 2, …: the names in an array by
/// index, and a ``HashSlots`` table from name to index that stores, per slot, only the index and 32
/// bits of the name's hash.
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
/// Growth is bounded in pause: ``HashSlots`` grows one partition of 64 at a time, and never reads a name.
struct NameIndex: Sendable {
    /// The names by index: `names[Int(i)]` is the name of index `i`. Chunked, so that adding a name
    /// never copies the ones before it (a contiguous array of a million names takes tens of
    /// milliseconds to double).
    private(set) var names = ChunkedArray<Name>()
    private var slots = HashSlots()
    private let seed: UInt64

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
        slots.find(hash: hash) { names[Int($0)] == name }
    }

    /// Starts loading the slot where a lookup of the name whose ``hash(_:)`` is `hash` begins, and
    /// returns at once; changes nothing.
    ///
    /// For a caller about to look up several names: a shard's group of reservations, each from a user
    /// it may not have seen. In a table of a million users that slot is a cache miss (and in a virtual
    /// machine often a page walk too) of about 200 ns; prefetched together, the misses overlap instead
    /// of coming one after another.
    func prefetch(hash: UInt64) {
        slots.prefetch(hash: hash)
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
        slots.insert(index, hash: hash)
        return index
    }

    /// Forgets the newest name (the one of index ``count`` - 1).
    mutating func removeLast() {
        let name = names[names.count - 1]
        names.removeLast()
        slots.remove(UInt32(names.count), hash: hash(name))
    }

    mutating func reserveCapacity(_ capacity: Int) {
        names.reserveCapacity(capacity)
        slots.reserveCapacity(capacity)
    }
}
