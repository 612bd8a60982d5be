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
        var names = SkuNames()
        for snapshot in try directory.snapshots() {
            do {
                let state = try SnapshotFile.read(snapshot.path, storage: directory.storage)
                names.learn(from: state)
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
                inspectSegment(all, path: segment.path, isLast: isLast, records: records, names: &names, emit: emit)
            }
            ok = ok && segmentOK
        }
        return ok
    }

    private static func inspectSegment(
        _ all: UnsafeRawBufferPointer, path: String, isLast: Bool, records: Bool, names: inout SkuNames, emit: (String) -> Void
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
            if isLast && all[offset...].allSatisfy({ $0 == 0 }) {
                report(.unwritten(offset: offset), bytes: all.count - offset, emit: emit)
                break
            }
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
                                names.learn(from: record)
                                emit("    " + describe(record, position: lsn, skuName: names.name))
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
        case .unwritten(let offset):
            emit("  @\(offset): \(bytes) bytes of space allocated past the last block, all zeros (not damage); recovery cuts them")
        case .torn(let offset, let why):
            emit("  @\(offset): torn tail, \(bytes) bytes (\(why)): nothing valid follows; recovery cuts it")
        case .corrupt(let offset, let why):
            emit("  @\(offset): CORRUPT: \(why); start-up refuses (see --truncate-corrupt)")
        case .complete, .reachedLimit:
            break
        }
    }

    /// One record in the words of docs/PROTOCOL.md's EVENTS, on one line:
    /// `#12 created 144115188075855873 user alice REQ k1 deadline 1712345678901 items phone x1`.
    /// `skuName` names a SKU by (shard, index), as records refer to them.
    public static func describe(_ record: Record, position: UInt64, skuName: (Int, UInt32) -> String) -> String {
        switch record {
        case let .skuAdded(_, _, sku, total, limit):
            return "#\(position) sku-added \(sku) total \(total) limit \(limit)"
        case let .restocked(shard, index, delta):
            return "#\(position) restocked \(skuName(shard, index)) delta \(delta)"
        case let .pausedChanged(shard, index, paused):
            return "#\(position) \(paused ? "paused" : "resumed") \(skuName(shard, index))"
        case let .deducted(shard, index, quantity):
            return "#\(position) deducted \(skuName(shard, index)) qty \(quantity)"
        case let .orderCreated(order):
            var line = "#\(position) created \(order.id) user \(order.user)"
            let requestId = "\(order.requestId)"
            if !requestId.isEmpty { line += " REQ \(requestId)" }
            line += " deadline \(order.deadlineMillis) items"
            for item in order.items { line += " \(skuName(item.shard, item.skuIndex)) x\(item.quantity)" }
            return line
        case let .orderPaid(id): return "#\(position) paid \(id)"
        case let .orderCancelled(id): return "#\(position) cancelled \(id)"
        case let .orderExpired(id): return "#\(position) expired \(id)"
        case let .epochStarted(epoch): return "#\(position) epoch \(epoch)"
        }
    }
}

/// SKU names by (shard, index), learnt from a snapshot and the `sku-added` records that follow it.
struct SkuNames {
    private var byShard: [Int: [UInt32: String]] = [:]

    mutating func learn(from state: EngineState) {
        for (shard, shardState) in state.shards.enumerated() {
            for (index, counter) in shardState.counters.enumerated() { byShard[shard, default: [:]][UInt32(index)] = "\(counter.0)" }
        }
    }

    mutating func learn(from record: Record) {
        if case let .skuAdded(shard, index, sku, _, _) = record { byShard[shard, default: [:]][index] = "\(sku)" }
    }

    /// The name, or `shard<s>#<index>` for a SKU added before the oldest snapshot and log kept.
    func name(_ shard: Int, _ index: UInt32) -> String { byShard[shard]?[index] ?? "shard\(shard)#\(index)" }
}
