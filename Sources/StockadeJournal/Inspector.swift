import Foundation
import StockadeCore

/// Prints what a data directory holds and verifies every checksum, without changing anything.
///
/// It takes no lock, so it can look at the directory of a running server; the newest block may then
/// be in the middle of being written and show as cut short.
public enum Inspector {
    /// Calls `emit` with one line per snapshot, segment and block (and record, with `records`).
    /// Returns false when anything fails verification.
    /// Throws when there is no directory at the path (a typo must not look like an empty, healthy one).
    public static func inspect(_ directory: DataDirectory, records: Bool, emit: (String) -> Void) throws(JournalError) -> Bool {
        guard directory.storage.exists(directory.path) else {
            throw JournalError(.io, "no data directory at \(directory.path)")
        }
        var ok = true
        for snapshot in try directory.snapshots() {
            do {
                let state = try SnapshotFile.read(snapshot.path, storage: directory.storage)
                let orders = state.shards.reduce(0) { $0 + $1.orderCount }
                let skus = state.shards.reduce(0) { $0 + $1.skuCount }
                emit("snapshot \(snapshot.path): position \(state.lsn), \(state.shards.count) shards, \(skus) SKUs, \(orders) orders, checksums OK, state hash \(String(state.stateHash(), radix: 16))")
            } catch {
                ok = false
                emit("snapshot \(snapshot.path): INVALID: \(error.message)")
            }
        }
        let segments = try directory.segments()
        for (index, segment) in segments.enumerated() {
            let bytes = try directory.storage.readAll(segment.path)
            let isLast = index == segments.count - 1
            let segmentOK = bytes.withUnsafeBytes { all in
                inspectSegment(all, path: segment.path, isLast: isLast, records: records, emit: emit)
            }
            ok = ok && segmentOK
        }
        return ok
    }

    private static func inspectSegment(
        _ all: UnsafeRawBufferPointer, path: String, isLast: Bool, records: Bool, emit: (String) -> Void
    ) -> Bool {
        guard case .header(let header) = SegmentHeader.parse(all) else {
            emit("segment \(path): INVALID header (\(all.count) bytes)")
            return false
        }
        emit("segment \(path): first position \(header.firstLSN), \(header.shardCount) shards, \(all.count) bytes")
        var offset = SegmentHeader.size
        var blocks = 0
        var recordCount = 0
        while offset < all.count {
            switch BlockCodec.read(all, at: offset) {
            case .block(let h, let payload):
                blocks += 1
                recordCount += h.recordCount
                let ratio = h.rawLength > 0 ? Double(h.payloadLength) / Double(h.rawLength) : 1
                emit(String(
                    format: "  block @%d: positions %llu-%llu, %d records, %d -> %d bytes (%.2f)%@, crc %08x OK", offset,
                    h.firstLSN, h.firstLSN + UInt64(h.recordCount) - 1, h.recordCount, h.rawLength, h.payloadLength, ratio,
                    h.isCompressed ? " lz4" : " raw", h.checksum))
                if records {
                    var lsn = h.firstLSN
                    do {
                        try payload.withUnsafeBytes { raw in
                            try Record.decodeAll(raw) { record in
                                emit("    \(lsn) \(record)")
                                lsn += 1
                            }
                        }
                    } catch {
                        emit("    UNDECODABLE: \(error)")
                        return false
                    }
                }
                offset += h.totalLength
            case .truncated:
                report(Recovery.damage(all, at: offset, isLast: isLast, "block cut short"), bytes: all.count - offset, emit: emit)
                return false
            case .invalid(let why):
                report(Recovery.damage(all, at: offset, isLast: isLast, why), bytes: all.count - offset, emit: emit)
                return false
            }
        }
        emit("  \(blocks) blocks, \(recordCount) records, all checksums OK")
        return true
    }

    private static func report(_ outcome: Recovery.SegmentOutcome, bytes: Int, emit: (String) -> Void) {
        switch outcome {
        case .torn(let offset, let why):
            emit("  @\(offset): torn tail, \(bytes) bytes (\(why)): nothing valid follows; recovery cuts it")
        case .corrupt(let offset, let why):
            emit("  @\(offset): CORRUPT: \(why); start-up refuses (see --truncate-corrupt)")
        case .complete, .reachedLimit:
            break
        }
    }
}
