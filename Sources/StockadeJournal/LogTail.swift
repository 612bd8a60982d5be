import StockadeCore
import Synchronization

/// The log's newest records as the journal wrote them (raw, uncompressed), kept in memory for the
/// readers at its end: a consumer that keeps up (EVENTS), and the many consumers one new event wakes
/// at once, are answered from here on their own event loop, without a file, a `pread`, a checksum,
/// a decompression or a hop to the threads that read files.
///
/// Bounded by ``bytesMax``: each batch counts its records' bytes and ``batchOverheadBytes`` (so that a
/// run of one-record batches, at pipeline 1, stays within the bound too); the oldest batches go first. Contiguous: it holds the
/// positions `first..<end` and nothing else, each batch as the journal wrote it, added after its
/// write and before its position is published as durable, so every durable position from ``first``
/// on is here. A read asks for positions up to a durable bound and gets only those; a position this
/// does not hold is read from the files (``LogReader``).
///
/// Kept true by the ``Journal``: emptied when the log starts again (``Journal/rebase(to:)``,
/// ``Journal/restart(at:)``), cut below the oldest segment kept before segments are removed (so a
/// position the files no longer hold is `TRIMMED` here too, from before its file goes), and a batch that does not follow the last one
/// (or is larger than the bound) empties it before it is added (or instead).
public final class LogTail: Sendable {
    /// One batch: its first position, its record count and its records' bytes.
    struct Batch {
        var firstLSN: UInt64
        var count: Int
        var bytes: [UInt8]
        var end: UInt64 { firstLSN + UInt64(count) }
    }

    private struct State {
        /// Batches in position order, from `start` on (those before `start` are gone, their bytes
        /// already let go).
        var batches: [Batch] = []
        var start = 0
        var bytes = 0

        /// Lets the oldest batch go, its bytes at once.
        mutating func dropFirst() {
            bytes -= LogTail.cost(batches[start].bytes)
            batches[start].bytes = []
            start += 1
        }
    }

    /// The bytes kept at most, counted as ``cost(_:)`` says.
    public let bytesMax: Int
    /// What a batch costs beyond its records' bytes: its entry and its array's allocation.
    static let batchOverheadBytes = 96
    private let state = Mutex(State())

    /// `bytesMax` 0: keeps nothing (every read goes to the files).
    public init(bytesMax: Int) {
        self.bytesMax = bytesMax
    }

    /// Adds a batch the journal has written (before it is published as durable).
    func add(firstLSN: UInt64, count: Int, bytes: [UInt8]) {
        guard count > 0 else { return }
        state.withLock { state in
            if let last = state.batches.last, state.start < state.batches.count, last.end != firstLSN {
                state = State()  // not the next batch: what is kept would have a gap
            }
            guard Self.cost(bytes) <= bytesMax else {
                state = State()
                return
            }
            state.batches.append(Batch(firstLSN: firstLSN, count: count, bytes: bytes))
            state.bytes += Self.cost(bytes)
            while state.bytes > bytesMax, state.start < state.batches.count - 1 { state.dropFirst() }
            // The array keeps the entries of the batches gone (not their bytes) until they are half of it.
            if state.start > 64, state.start * 2 > state.batches.count {
                state.batches.removeFirst(state.start)
                state.start = 0
            }
        }
    }

    /// What a batch of these records' bytes counts against ``bytesMax``: the memory its array holds
    /// (its capacity, not only its count), and its entry.
    static func cost(_ bytes: [UInt8]) -> Int { bytes.capacity + batchOverheadBytes }

    /// The bytes held, as counted against ``bytesMax``.
    var bytesHeld: Int { state.withLock { $0.bytes } }

    /// The capacity of the arrays of the batches held (for tests: what ``bytesHeld`` must bound).
    var capacityHeld: Int {
        state.withLock { state in state.batches[state.start...].reduce(0) { $0 + $1.bytes.capacity } }
    }

    /// The capacity of the arrays of every entry, those of batches gone included (for tests: the
    /// same as ``capacityHeld``, since a batch lets its bytes go as it goes).
    var capacityHeldAll: Int {
        state.withLock { state in state.batches.reduce(0) { $0 + $1.bytes.capacity } }
    }

    /// Forgets every batch (the log starts again).
    func reset() {
        state.withLock { $0 = State() }
    }

    /// Forgets the batches with positions before `lsn` (their segments were removed). A batch is
    /// never split across segments, so batches go whole.
    func drop(below lsn: UInt64) {
        state.withLock { state in
            while state.start < state.batches.count, state.batches[state.start].firstLSN < lsn { state.dropFirst() }
        }
    }

    /// The positions held: `first..<end` (empty when `first == end`).
    var range: Range<UInt64> {
        state.withLock { state in
            guard state.start < state.batches.count else { return 0..<0 }
            return state.batches[state.start].firstLSN..<state.batches[state.batches.count - 1].end
        }
    }

    /// Up to `count` records with positions `from...durable`, oldest first (as many as there are, up
    /// to `count`), when this holds them all; nil when it does not (the caller reads the files), or
    /// when a record does not decode (the files then say what is wrong).
    public func records(from: UInt64, count: Int, durable: UInt64) -> [(position: UInt64, record: Record)]? {
        guard count > 0, from >= 1, from <= durable else { return nil }
        let wanted = Int(min(UInt64(count), durable - from + 1))
        // The batches holding the positions wanted, taken under the lock; decoded outside it (their
        // bytes are never changed: arrays shared, not copied).
        let batches: [Batch]? = state.withLock { state in
            guard state.start < state.batches.count, state.batches[state.start].firstLSN <= from,
                  from < state.batches[state.batches.count - 1].end
            else { return nil }
            // The last batch starting at or before `from`.
            var low = state.start, high = state.batches.count - 1
            while low < high {
                let mid = (low + high + 1) / 2
                if state.batches[mid].firstLSN <= from { low = mid } else { high = mid - 1 }
            }
            var taken: [Batch] = []
            var held = 0
            var i = low
            while i < state.batches.count, held < wanted {
                let batch = state.batches[i]
                taken.append(batch)
                held += Int(batch.end - max(from, batch.firstLSN))
                i += 1
            }
            // All or nothing: a read this cannot answer whole goes to the files, which answer it as
            // they always have (every durable position from the first held is here, so this is rare).
            return held >= wanted ? taken : nil
        }
        guard let batches else { return nil }
        var result: [(position: UInt64, record: Record)] = []
        result.reserveCapacity(wanted)
        do {
            for batch in batches {
                let skipped = from > batch.firstLSN ? Int(from - batch.firstLSN) : 0
                var position = batch.firstLSN + UInt64(skipped)
                try batch.bytes.withUnsafeBytes { raw in
                    try Record.decode(raw, skipping: skipped, count: wanted - result.count) { record in
                        result.append((position, record))
                        position += 1
                    }
                }
                if result.count >= wanted { break }
            }
        } catch {
            return nil
        }
        return result
    }
}
