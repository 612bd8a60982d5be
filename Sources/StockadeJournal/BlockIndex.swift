import Synchronization

/// Where blocks start in the log's segments, learned by ``LogReader`` as it passes them: a read from
/// a position starts at the last known block at or before it instead of walking every block header
/// from the segment's start. Without it a consumer at the end of the log (EVENTS, a replica's
/// stream) read one header per block of the open segment for each request: tens of milliseconds
/// after a few hundred thousand orders, and more as the segment grows to its 64 MiB.
///
/// Sparse (one block per ``strideBytes`` of a segment, so at most about a thousand per segment)
/// and learned only from blocks a sequential walk reached at or below the durable position, which
/// stay where they are until the log starts again. A reader still checks the block it jumps to
/// (its header's checksum and position) and walks from the segment's start when it does not match.
/// ``Journal`` forgets everything when the log starts again (``Journal/restart(at:)``,
/// ``Journal/rebase(to:)``), since a segment of the same name may then hold other blocks; a read
/// that began before that learns nothing from what it read (``generation``).
public final class BlockIndex: Sendable {
    /// A block's start: its first position and its offset in the segment.
    public struct Entry: Equatable, Sendable {
        public var firstLSN: UInt64
        public var offset: Int
    }

    /// A segment keeps one block per this many bytes.
    public static let strideBytes = 64 << 10

    private struct State {
        var generation: UInt64 = 0
        var bySegment: [String: [Entry]] = [:]
    }

    private let state = Mutex(State())

    public init() {}

    /// Changes whenever the index forgets a log that started again.
    public var generation: UInt64 { state.withLock { $0.generation } }

    /// The last known block of segment `path` whose first position is at or before `position`.
    public func block(atOrBefore position: UInt64, in path: String) -> Entry? {
        state.withLock { state in
            guard let entries = state.bySegment[path] else { return nil }
            // The first entry past `position` (entries are in order of offset, so of position).
            var low = 0
            var high = entries.count
            while low < high {
                let middle = (low + high) / 2
                if entries[middle].firstLSN <= position { low = middle + 1 } else { high = middle }
            }
            return low > 0 ? entries[low - 1] : nil
        }
    }

    /// A walk of segment `path` that began at `generation` reached a verified block `entry`, at or
    /// below the durable position: kept if it lies ``strideBytes`` past the segment's last one.
    public func learn(_ entry: Entry, in path: String, generation: UInt64) {
        state.withLock { state in
            guard state.generation == generation else { return }
            let last = state.bySegment[path]?.last
            guard last.map({ entry.offset >= $0.offset + Self.strideBytes && entry.firstLSN > $0.firstLSN }) ?? true else { return }
            state.bySegment[path, default: []].append(entry)
        }
    }

    /// A block learned in `path` did not check: the segment is walked from its start again.
    public func forget(_ path: String) {
        state.withLock { _ = $0.bySegment.removeValue(forKey: path) }
    }

    /// Segments no longer in the directory (removed after a snapshot) are dropped, once the index
    /// names more segments than `segments` holds (a removed segment's name does not come back
    /// until the log starts again, which forgets everything, so until then its entries only wait).
    public func keep(only segments: [(firstLSN: UInt64, path: String)]) {
        state.withLock { state in
            guard state.bySegment.count > segments.count else { return }
            let kept = Set(segments.lazy.map(\.path))
            state.bySegment = state.bySegment.filter { kept.contains($0.key) }
        }
    }

    /// The log started again: every block learned is forgotten.
    public func reset() {
        state.withLock { state in
            state.generation &+= 1
            state.bySegment = [:]
        }
    }
}
