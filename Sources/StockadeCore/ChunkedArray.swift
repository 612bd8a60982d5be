/// An append-only array stored in fixed-size chunks. Appending never copies what is already stored,
/// so a shard holding millions of orders does not stall for the tens of milliseconds a contiguous
/// array takes to double and copy itself.
///
/// Each chunk after the first is mapped ahead by ``Prefault`` when it is allocated: an array that
/// has filled one chunk is growing, and the page faults of the next would otherwise be taken by the
/// thread that appends (a shard's event loop). The first chunk is not: most arrays (a shard's SKUs,
/// the tests' small shards) never fill it, and mapping all of it would only grow the process.
struct ChunkedArray<Element>: RandomAccessCollection {
    /// 65,536 elements a chunk: 1.5 MiB of 24-byte order slots, small enough to allocate without a
    /// noticeable pause, large enough that the chunk table stays tiny.
    static var chunkShift: Int { 16 }
    static var chunkSize: Int { 1 << chunkShift }

    private var chunks: [[Element]] = []
    private(set) var count = 0

    init() {}

    var startIndex: Int { 0 }
    var endIndex: Int { count }

    subscript(position: Int) -> Element {
        get {
            precondition(position >= 0 && position < count, "index out of range")
            return chunks[position >> Self.chunkShift][position & (Self.chunkSize - 1)]
        }
        _modify {
            precondition(position >= 0 && position < count, "index out of range")
            yield &chunks[position >> Self.chunkShift][position & (Self.chunkSize - 1)]
        }
    }

    mutating func append(_ element: Element) {
        let chunk = count >> Self.chunkShift
        if chunk == chunks.count {
            var fresh: [Element] = []
            fresh.reserveCapacity(Self.chunkSize)
            chunks.append(fresh)
            chunks[chunk].append(element)
            count += 1
            if chunk > 0 {
                chunks[chunk].withUnsafeBufferPointer { stored in
                    guard let base = stored.baseAddress else { return }
                    Prefault.ahead(base, bytes: Self.chunkSize * MemoryLayout<Element>.stride)
                }
            }
            return
        }
        chunks[chunk].append(element)
        count += 1
    }

    /// Removes the last element. A chunk left empty is kept for the next ``append(_:)`` and freed when
    /// the one before it empties too: a queue that hovers at a chunk boundary (the expiry heap, pushed
    /// and popped) does not allocate and free a chunk on every step.
    mutating func removeLast() {
        precondition(count > 0, "removeLast on an empty ChunkedArray")
        count -= 1
        chunks[count >> Self.chunkShift].removeLast()
        if chunks.count > (count + Self.chunkSize - 1) >> Self.chunkShift + 1 { chunks.removeLast() }
        assert(chunks.count - ((count + Self.chunkSize - 1) >> Self.chunkShift) <= 1, "more than one empty chunk kept")
    }

    /// Reserves the chunk table only: chunks are allocated as they fill.
    mutating func reserveCapacity(_ capacity: Int) {
        chunks.reserveCapacity((capacity + Self.chunkSize - 1) >> Self.chunkShift)
    }

    /// The address and byte length of chunk `index`'s elements, for tests of the mapping ahead.
    func chunkStorage(_ index: Int) -> (address: UInt, bytes: Int) {
        chunks[index].withUnsafeBufferPointer { (UInt(bitPattern: $0.baseAddress), Self.chunkSize * MemoryLayout<Element>.stride) }
    }

}

extension ChunkedArray: Sendable where Element: Sendable {}
