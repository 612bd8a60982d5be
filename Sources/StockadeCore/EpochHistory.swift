/// The primary terms a log holds, oldest first: each term's epoch and the position of its first
/// record (the ``Record/epochStarted(epoch:)`` record a node writes when it becomes primary, before
/// any change of its term). Replay rebuilds it, snapshots store it, and replication compares it.
///
/// One writer per epoch (the coordinator's key and fencing make it so) means two logs that hold the
/// same term starting at the same position agree on that term's records up to where either ends. So
/// whether a replica's log is a prefix of a primary's follows from the replica's last term and last
/// position alone (``divergence(ofLogEndingAt:lastTerm:)``), the way Raft compares the last entry's
/// term and Kafka truncates to a leader epoch's end offset.
public struct EpochHistory: Equatable, Sendable {
    public struct Term: Equatable, Sendable {
        public var epoch: UInt64
        /// The position of the term's `epochStarted` record.
        public var start: UInt64

        public init(epoch: UInt64, start: UInt64) {
            self.epoch = epoch
            self.start = start
        }
    }

    /// Terms kept: 16 bytes each, and a node fails over far less often than this many times within
    /// what a replica could lag behind. Past the bound the oldest term is dropped (``isTruncated``):
    /// a replica whose last term is older than every kept one cannot be compared by terms.
    public static let termsMax = 1024
    /// The largest epoch a log takes: epochs travel as RESP integers (signed 64-bit), and a new one is
    /// computed above the last (``next(after:using:)``), which must not overflow.
    public static let epochMax = UInt64(Int64.max)
    /// The random part of an epoch a node picks for itself (without a coordinator): two nodes promoted
    /// from the same history pick different epochs but for a chance of 1 in 2^32.
    public static let randomSpan: UInt64 = 1 << 32

    public private(set) var terms: [Term] = []
    /// Terms were dropped from the front (``termsMax``): positions before the first kept term are of
    /// some older term, not of none.
    public private(set) var isTruncated = false

    public init() {}

    /// A history read back from a snapshot; nil unless epochs and starts strictly increase.
    public init?(terms: [Term], isTruncated: Bool) {
        guard terms.count <= Self.termsMax, zip(terms, terms.dropFirst()).allSatisfy({ $0.epoch < $1.epoch && $0.start < $1.start }),
              terms.allSatisfy({ $0.epoch > 0 && $0.start > 0 })
        else { return nil }
        self.terms = terms
        self.isTruncated = isTruncated
    }

    /// The newest term, or nil when the log holds none (no primary of this log ever had an epoch).
    public var last: Term? { terms.last }
    /// The newest epoch, 0 when there is none.
    public var lastEpoch: UInt64 { terms.last?.epoch ?? 0 }

    /// An epoch for a term a node starts by itself (no coordinator issues one): above `seen` by one plus
    /// a random part, so two nodes promoted from the same history do not both write "the same" term
    /// (the rule ``divergence(ofLogEndingAt:lastTerm:)`` rests on). nil when it would pass ``epochMax``.
    public static func next<R: RandomNumberGenerator>(after seen: UInt64, using rng: inout R) -> UInt64? {
        guard seen < epochMax - randomSpan else { return nil }
        return seen + 1 + UInt64.random(in: 0..<randomSpan, using: &rng)
    }

    /// Records a term that starts at `start`. Epochs and starts only grow.
    public mutating func append(_ term: Term) {
        precondition(term.epoch > lastEpoch && term.start > (last?.start ?? 0), "terms only grow")
        terms.append(term)
        if terms.count > Self.termsMax {
            terms.removeFirst()
            isTruncated = true
        }
    }

    /// The history as it stood at position `lsn`: the terms started at or before it.
    public func through(_ lsn: UInt64) -> EpochHistory {
        var copy = self
        copy.terms.removeAll { $0.start > lsn }
        return copy
    }

    /// The term in force at `position`: the newest term started at or before it; `.none` (nil term)
    /// when no term had started by then. `undecided` is true when the terms that would tell were
    /// dropped (``isTruncated``). A consumer that stored the term of its last position compares it
    /// with this: two logs that agree on the term at a position agree on every record up to it.
    public func term(at position: UInt64) -> (term: Term?, undecided: Bool) {
        guard let index = terms.lastIndex(where: { $0.start <= position }) else { return (nil, isTruncated) }
        return (terms[index], false)
    }

    /// Why a log that ends at `position` with `lastTerm` as its newest term (nil: none) is not a
    /// prefix of the log this history belongs to, or nil when it is one as far as terms tell. (A
    /// position beyond this log's end is the caller's to refuse; records are compared by the caller
    /// where the logs meet, too.) `undecided` is true when this history no longer keeps the terms it
    /// would take to tell.
    public func divergence(ofLogEndingAt position: UInt64, lastTerm: Term?) -> (reason: String?, undecided: Bool) {
        guard let lastTerm else {
            // Every record of that log is of no term: so must this log's be, up to `position`.
            guard !isTruncated else { return (nil, true) }
            if let first = terms.first, first.start <= position {
                return ("its records up to position \(position) are of no epoch, where this log began epoch \(first.epoch) at \(first.start)", false)
            }
            return (nil, false)
        }
        guard let index = terms.firstIndex(where: { $0.epoch == lastTerm.epoch }) else {
            if isTruncated, let first = terms.first, lastTerm.epoch < first.epoch { return (nil, true) }
            return ("its last records are of epoch \(lastTerm.epoch), which this log never had", false)
        }
        guard terms[index].start == lastTerm.start else {
            return ("its epoch \(lastTerm.epoch) began at position \(lastTerm.start), this log's at \(terms[index].start)", false)
        }
        if index + 1 < terms.count, terms[index + 1].start <= position {
            return ("it holds records of epoch \(lastTerm.epoch) up to position \(position), where this log's epoch \(lastTerm.epoch) ended at \(terms[index + 1].start - 1)", false)
        }
        return (nil, false)
    }
}
