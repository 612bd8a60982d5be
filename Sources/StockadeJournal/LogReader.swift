import StockadeCore

/// Reads durable records back from the log by position: the order event stream. Only block headers
/// are read until the block holding the first wanted position; only verified blocks are returned.
public struct LogReader: Sendable {
    public let directory: DataDirectory

    public init(directory: DataDirectory) { self.directory = directory }

    /// Why records could not be read.
    public enum ReadError: Error, Equatable, Sendable {
        /// The segments holding `position` were deleted after a snapshot; the oldest still there is `oldest`.
        case trimmed(oldest: UInt64)
        case unreadable(String)
    }

    /// Up to `count` records with positions `from...durable`, oldest first.
    public func read(from: UInt64, count: Int, durable: UInt64) throws(ReadError) -> [(position: UInt64, record: Record)] {
        guard from <= durable, count > 0 else { return [] }
        let segments: [(firstLSN: UInt64, path: String)]
        do { segments = try directory.segments() } catch { throw .unreadable(error.message) }
        guard let first = segments.first else { return [] }
        guard first.firstLSN <= max(from, 1) else { throw .trimmed(oldest: first.firstLSN) }
        var result: [(position: UInt64, record: Record)] = []
        // The last segment starting at or before `from`, then the ones after it.
        let startIndex = segments.lastIndex { $0.firstLSN <= max(from, 1) } ?? 0
        for segment in segments[startIndex...] {
            if segment.firstLSN > durable || result.count >= count { break }
            try readSegment(segment.path, from: from, count: count, durable: durable, into: &result)
        }
        return result
    }

    private func readSegment(
        _ path: String, from: UInt64, count: Int, durable: UInt64, into result: inout [(position: UInt64, record: Record)]
    ) throws(ReadError) {
        let file: any StorageFile
        let size: Int
        do {
            file = try directory.storage.open(path, .read)
            size = try file.size()
        } catch {
            throw .unreadable(error.message)
        }
        defer { file.close() }
        var offset = SegmentHeader.size
        while offset + BlockHeader.size <= size, result.count < count {
            let header: [UInt8]
            do { header = try file.read(at: offset, count: BlockHeader.size) } catch { throw .unreadable(error.message) }
            guard header.count == BlockHeader.size, let h = header.withUnsafeBytes({ BlockHeader.parse($0) }) else { return }
            let last = h.firstLSN + UInt64(h.recordCount) - 1
            if h.firstLSN > durable { return }
            if last < from || h.recordCount == 0 {
                offset += h.totalLength
                continue
            }
            guard offset + h.totalLength <= size else { return }
            let block: [UInt8]
            do { block = try file.read(at: offset, count: h.totalLength) } catch { throw .unreadable(error.message) }
            guard block.count == h.totalLength else { throw .unreadable("short read in \(path) at offset \(offset)") }
            switch block.withUnsafeBytes({ BlockCodec.read($0, at: 0) }) {
            case .block(_, let payload):
                var position = h.firstLSN
                do {
                    try payload.withUnsafeBytes { raw in
                        try Record.decodeAll(raw) { record in
                            if position >= from, position <= durable, result.count < count { result.append((position, record)) }
                            position += 1
                        }
                    }
                } catch {
                    throw .unreadable("\(path) at offset \(offset): \(error)")
                }
            case .truncated, .invalid:
                throw .unreadable("\(path) at offset \(offset): block fails verification")
            }
            offset += h.totalLength
        }
    }
}
