import CPrefetch
import Dispatch
import Glibc
import Synchronization

/// Takes the page faults of memory that a shard is about to fill, on a background thread, so that the
/// event loop running the shard does not.
///
/// Why: every new order and every new user is appended to a ``ChunkedArray``, and the first write to
/// each 4 KiB page of a fresh chunk is a page fault in which the kernel zeroes the page. Under a flash
/// sale of new users that is about 80 bytes a reservation, and `perf` put 12.6% of the one loop's CPU
/// in the kernel's `clear_page_erms` under `ChunkedArray.append` (RESERVE -P16, one loop, no sync).
/// The loop fills a chunk in a fifth of a second at that rate; the background thread maps its pages
/// in about a millisecond, so the loop finds them mapped.
///
/// A hint only: it writes nothing a program can see (``stockade_populate_write``), so nothing changes
/// when it runs late, never runs (a kernel older than 5.14), or runs on a chunk already freed.
enum Prefault {
    /// One serial queue: requests are rare (one per 65,536 appends to a chunked array past its first
    /// chunk) and each is a single system call. Internal so that a test can hold it back.
    static let queue = DispatchQueue(label: "stockade.prefault", qos: .utility)
    /// Cleared when the kernel answers EINVAL (no MADV_POPULATE_WRITE): no further requests are queued.
    private static let supported = Atomic<Bool>(true)
    /// Ranges mapped ahead, for tests and the curious.
    private static let populated = Atomic<Int>(0)

    /// Maps the whole pages of `[address, address + bytes)` from the background queue, and returns at once.
    static func ahead(_ address: UnsafeRawPointer, bytes: Int) {
        guard bytes > 0, supported.load(ordering: .relaxed) else { return }
        // A pointer is not Sendable; the address is all the request needs.
        let start = UInt(bitPattern: address)
        queue.async {
            switch stockade_populate_write(UnsafeRawPointer(bitPattern: start), bytes) {
            case 0: populated.add(1, ordering: .relaxed)
            case EINVAL: supported.store(false, ordering: .relaxed)
            default: break
            }
        }
    }

    /// Waits until every request queued so far has run; returns how many ranges were mapped in all.
    static func drain() -> Int {
        queue.sync {}
        return populated.load(ordering: .relaxed)
    }
}
