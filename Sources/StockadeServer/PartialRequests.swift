/// The bytes all connections hold for requests begun and not finished, and which connections to
/// close when those pass a bound (``ServerConfiguration/partialRequestBytesMax``).
///
/// A request's bytes wait in memory until its last byte arrives, so idle clients that send most of
/// a large request could make the server hold `--maxclients` times `--max-request-bytes`. Past the
/// bound, the connections whose unfinished request is the oldest are closed, oldest first, until the
/// rest fit: a client that stalls midway (or trickles) has held its bytes longest, while a real
/// client's request, large or split across reads, finishes within moments. The age is the request's,
/// not the connection's: a share starts again with each request (``set(_:from:to:restart:holder:)``).
///
/// Pure bookkeeping: the connections call it under a lock when their share changes (not on a read
/// that ends between requests, the common case) and close the holders it returns. The shares are
/// queued in the order their requests began, so choosing takes from the front: a call costs the
/// shares it chooses and the stale queue entries it passes, however many shares there are.
struct PartialRequestBudget<Key: Hashable, Holder> {
    let bound: Int
    /// Bytes held by all connections.
    private(set) var total = 0
    /// Every connection holding part of a request.
    private var shares: [Key: Entry] = [:]
    /// Bytes of the shares already chosen and not yet let go.
    private var chosenBytes = 0
    /// Shares in the order their requests began (``Entry/start``), from ``head`` on. An entry whose
    /// share has gone, started again or been chosen since is stale and skipped.
    private var order: [(start: UInt64, key: Key)] = []
    private var head = 0
    /// Numbers the requests in the order they began.
    private var started: UInt64 = 0

    private struct Entry {
        var bytes: Int
        /// When the request began to be held, as a place in ``order``.
        var start: UInt64
        var chosen: Bool
        let holder: Holder
    }

    init(bound: Int) {
        precondition(bound >= 0)
        self.bound = bound
    }

    /// Sets the share of `key` from `old` (what it set last, 0 at first) to `new`; returns the
    /// holders to close, oldest first (empty nearly always). `restart`: the share is of a request
    /// begun since the last call (its age starts now). `holder` is needed for a share over 0. A share
    /// that falls to 0 or starts again is no longer chosen, even if it was: its request finished
    /// before it was closed.
    mutating func set(_ key: Key, from old: Int, to new: Int, restart: Bool, holder: Holder?) -> [(Key, Holder)] {
        precondition(old >= 0 && new >= 0)
        total += new - old
        assert(total >= 0, "a share let go that was never counted")
        if var entry = shares[key] {
            if entry.chosen { chosenBytes -= entry.bytes }
            if new > 0 {
                entry.bytes = new
                if restart {
                    entry.start = begin(key)
                    entry.chosen = false
                }
                if entry.chosen { chosenBytes += new }
                shares[key] = entry
            } else {
                shares[key] = nil
            }
        } else if new > 0 {
            guard let holder else { preconditionFailure("a share needs its holder") }
            shares[key] = Entry(bytes: new, start: begin(key), chosen: false, holder: holder)
        }
        var chosen: [(Key, Holder)] = []
        while total - chosenBytes > bound, head < order.count {
            let (start, k) = order[head]
            head += 1
            guard var entry = shares[k], entry.start == start, !entry.chosen else { continue }  // stale
            entry.chosen = true
            shares[k] = entry
            chosenBytes += entry.bytes
            chosen.append((k, entry.holder))
        }
        compact()
        assert(chosenBytes == shares.values.reduce(0) { $0 + ($1.chosen ? $1.bytes : 0) })
        assert(total - chosenBytes <= bound || !shares.values.contains { !$0.chosen }, "a share left to choose")
        return chosen
    }

    /// Whether `key` was chosen to be closed and has not let its share go (or started again) since.
    func isChosen(_ key: Key) -> Bool { shares[key]?.chosen ?? false }

    /// Queues `key`'s new request; returns its place.
    private mutating func begin(_ key: Key) -> UInt64 {
        started += 1
        order.append((started, key))
        return started
    }

    /// Drops the queue's stale entries once they outnumber the live ones: the queue stays within a
    /// few times the shares, and the work is paid for by the entries that went stale.
    private mutating func compact() {
        guard order.count - head > 2 * shares.count + 64 else {
            if head > 64 && head * 2 > order.count {
                order.removeFirst(head)
                head = 0
            }
            return
        }
        order = order[head...].filter { queued in
            guard let entry = shares[queued.key] else { return false }
            return entry.start == queued.start && !entry.chosen
        }
        head = 0
    }
}
