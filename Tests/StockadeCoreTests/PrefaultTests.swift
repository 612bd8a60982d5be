import Glibc
import Testing
@testable import StockadeCore

/// ``Prefault`` through ``ChunkedArray``: a chunk past the first has its pages mapped by the
/// background queue before the appending thread writes them, and its contents are not disturbed.
@Suite struct PrefaultTests {
    /// The pages of `[address, address + bytes)`, whole pages only, that are not resident (`mincore`).
    static func pagesNotResident(address: UInt, bytes: Int) -> Int {
        let page = UInt(sysconf(Int32(_SC_PAGESIZE)))
        let start = (address + page - 1) & ~(page - 1)
        let end = (address + UInt(bytes)) & ~(page - 1)
        guard end > start else { return 0 }
        var residency = [UInt8](repeating: 0, count: Int((end - start) / page))
        let status = mincore(UnsafeMutableRawPointer(bitPattern: start), Int(end - start), &residency)
        precondition(status == 0, "mincore: errno \(errno)")
        return residency.filter { $0 & 1 == 0 }.count
    }

    @Test func chunksPastTheFirstAreMappedBeforeTheyAreWritten() {
        typealias Array = ChunkedArray<UInt64>
        var array = Array()
        // One whole chunk, then the first element of the second: only its first page is written.
        for i in 0...Array.chunkSize { array.append(UInt64(i) &* 0x9E37_79B9_7F4A_7C15) }
        _ = Prefault.drain()
        let (address, bytes) = array.chunkStorage(1)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        // Past the page of the written element, every page of the chunk is mapped.
        #expect(Self.pagesNotResident(address: address + UInt(page), bytes: bytes - page) == 0)
        // Mapping wrote nothing: the rest of the chunk fills as if it had not run.
        for i in (Array.chunkSize + 1)..<(2 * Array.chunkSize + 100) { array.append(UInt64(i) &* 0x9E37_79B9_7F4A_7C15) }
        #expect(array.count == 2 * Array.chunkSize + 100)
        #expect(array.indices.allSatisfy { array[$0] == UInt64($0) &* 0x9E37_79B9_7F4A_7C15 })
    }

    @Test func aChunkFreedBeforeItsTurnIsHarmless() {
        // The queue held back: the chunk's request runs only after the chunk is freed and its memory
        // is maybe another allocation's, written meanwhile. That allocation keeps what was written.
        let pattern: UInt64 = 0xA5A5_5A5A_0F0F_F0F0
        Prefault.queue.suspend()
        do {
            var array = ChunkedArray<Name>()
            for i in 0...ChunkedArray<Name>.chunkSize { array.append(Name("u\(i)")) }
        }
        let other = [UInt64](repeating: pattern, count: ChunkedArray<Name>.chunkSize * 4)
        Prefault.queue.resume()
        _ = Prefault.drain()
        #expect(other.allSatisfy { $0 == pattern })
    }
}
