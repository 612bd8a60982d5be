/// The bytes all connections hold for requests begun and not finished, and which connections to
/// close when those pass a bound (``ServerConfiguration/partialRequestBytesMax``).
///
/// A request's bytes wait in memory until its last byte arrives, so idle clients that send most of
/// a large request could make the server hold `--maxclients` times `--max-request-bytes`. Past the
/// bound, the connections whose unfinished request is the oldest are closed, oldest first, until the
/// rest fit: a client that stalls midway (or trickles) has held its bytes longest, while a real
/// client's large request finishes in moments. A connection holding at most ``floor`` is never
/// chosen: any command of ours, and a request split across reads, stays far below it.
///
/// Pure bookkeeping: the connections call it under a lock when their share changes (not on a read
/// that ends between requests, the common case) and close the holders it returns.
struct PartialRequestBudget<Key: Hashable, Holder> {
    let bound: Int
    let floor: Int
    /// Bytes held by all connections (large and small shares).
    private(set) var total = 0
    /// Connections holding more than ``floor``: the ones that may be chosen.
    private var large: [Key: Entry] = [:]
    /// Bytes of the large shares already chosen and not yet let go.
    private var chosenBytes = 0

    private struct Entry {
        var bytes: Int
        /// When the share first passed ``floor`` (monotonic nanoseconds).
        let since: UInt64
        var chosen: Bool
        let holder: Holder
    }

    init(bound: Int, floor: Int) {
        precondition(bound >= floor && floor >= 0)
        self.bound = bound
        self.floor = floor
    }

    /// Sets the share of `key` from `old` (what it set last, 0 at first) to `new`; returns the
    /// holders to close, oldest first (empty nearly always). `holder` is needed only for a share
    /// over ``floor``. A share that falls to ``floor`` or below is no longer chosen, even if it was:
    /// it finished its request before it was closed.
    mutating func set(_ key: Key, from old: Int, to new: Int, now: UInt64, holder: Holder?) -> [(Key, Holder)] {
        precondition(old >= 0 && new >= 0)
        total += new - old
        assert(total >= 0, "a share let go that was never counted")
        if var entry = large[key] {
            if entry.chosen { chosenBytes -= entry.bytes }
            if new > floor {
                entry.bytes = new
                if entry.chosen { chosenBytes += new }
                large[key] = entry
            } else {
                large[key] = nil
            }
        } else if new > floor {
            guard let holder else { preconditionFailure("a share over the floor needs its holder") }
            large[key] = Entry(bytes: new, since: now, chosen: false, holder: holder)
        }
        var chosen: [(Key, Holder)] = []
        while total - chosenBytes > bound {
            var oldest: (key: Key, entry: Entry)?
            for (k, e) in large where !e.chosen && (oldest == nil || e.since < oldest!.entry.since) { oldest = (k, e) }
            guard let (k, e) = oldest else { break }  // only small shares left: they stay
            large[k]!.chosen = true
            chosenBytes += e.bytes
            chosen.append((k, e.holder))
        }
        assert(chosenBytes == large.values.reduce(0) { $0 + ($1.chosen ? $1.bytes : 0) })
        return chosen
    }

    /// Whether `key` was chosen to be closed and has not let its share go since.
    func isChosen(_ key: Key) -> Bool { large[key]?.chosen ?? false }
}
