import Foundation
import StockadeCore

/// Prints what a data directory holds and verifies every checksum, without changing anything.
///
/// It takes no lock, so it can look at the directory of a running server. That server writes its last
/// segment while it is read, into space that reads as zeros: a reading can catch a batch half copied,
/// or zeros with a newer batch after them. So damage in the last segment is judged only when a second
/// reading 50 ms later finds it at the same offset with the same bytes; damage that moves or goes away
/// was a write in progress, and is said to be one.
public enum Inspector {
    /// Readings of the last segment taken to see whether damage stays put (50 ms apart).
    static let readingsMax = 6
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
                let (state, lastRecords) = try SnapshotFile.load(snapshot.path, storage: directory.storage)
                let orders = state.shards.reduce(0) { $0 + $1.orderCount }
                let skus = state.shards.reduce(0) { $0 + $1.skuCount }
                let line = "snapshot \(snapshot.path): position \(state.lsn), \(state.shards.count) shards, \(skus) SKUs, \(orders) orders, checksums OK, state hash \(String(state.stateHash(), radix: 16))"
                switch Recovery.match(lsn: state.lsn, lastRecords: lastRecords, in: directory) {
                case .same:
                    names.learn(from: state)
                    emit(line + ", its last records match the log")
                case .cannotTell:
                    names.learn(from: state)
                    emit(line + (lastRecords == nil ? ", names no last records" : ", its last records are no longer in the log"))
                case .another(let why):
                    // Recovery skips it; its SKU names are not this log's.
                    ok = false
                    emit("snapshot \(snapshot.path): ANOTHER LOG'S: \(why)")
                }
            } catch {
                ok = false
                emit("snapshot \(snapshot.path): INVALID: \(error.message)")
            }
        }
        let segments = try directory.segments()
        for (index, segment) in segments.enumerated() {
            let isLast = index == segments.count - 1
            var reading = try read(segment.path, isLast: isLast, records: records, names: names, storage: directory.storage)
            var settled = true
            if isLast, let first = reading.damage {
                settled = false
                var previous = (offset: first, bytes: reading.bytes)
                for _ in 1..<readingsMax where !settled {
                    usleep(50_000)
                    reading = try read(segment.path, isLast: true, records: records, names: names, storage: directory.storage)
                    guard let offset = reading.damage else {
                        settled = true
                        break
                    }
                    settled = offset == previous.offset && sameDamagedBlock(previous.bytes, reading.bytes, at: offset)
                    previous = (offset, reading.bytes)
                }
            }
            reading.lines.forEach(emit)
            names = reading.names
            if let outcome = reading.outcome {
                if settled {
                    report(outcome, bytes: reading.bytes.count - reading.stop, emit: emit)
                } else {
                    emit("  @\(reading.damage ?? 0): changed while it was read \(readingsMax) times: a server is writing it; not judged from here on")
                }
            }
            ok = ok && (reading.ok || !settled)
        }
        return ok
    }

    /// One reading of a segment: the lines for what verified, and where it stopped, if it did.
    struct Reading {
        var bytes: [UInt8]
        var lines: [String] = []
        var names: SkuNames
        var ok = true
        /// What the first block that failed is (torn, corrupt), or unwritten space at the end.
        var outcome: Recovery.SegmentOutcome?

        /// The offset of the first block that failed (nil when none did).
        var damage: Int? {
            switch outcome {
            case .torn(let offset, _), .corrupt(let offset, _): offset
            default: nil
            }
        }

        /// Where the reading stopped: the offset of ``outcome``, or the end of the file.
        var stop: Int {
            switch outcome {
            case .torn(let offset, _), .corrupt(let offset, _), .unwritten(let offset): offset
            default: bytes.count
            }
        }
    }

    private static func read(
        _ path: String, isLast: Bool, records: Bool, names: SkuNames, storage: any Storage
    ) throws(JournalError) -> Reading {
        var reading = Reading(bytes: try storage.readAll(path), names: names)
        let bytes = reading.bytes
        var lines: [String] = []
        var outcome: Recovery.SegmentOutcome?
        reading.ok = bytes.withUnsafeBytes { all in
            inspectSegment(all, path: path, isLast: isLast, records: records, names: &reading.names, outcome: &outcome) { lines.append($0) }
        }
        reading.lines = lines
        reading.outcome = outcome
        return reading
    }

    /// Whether two readings hold the same bytes in the damaged block at `offset`: as far as its header
    /// says when that parses in the first, else its header's length.
    private static func sameDamagedBlock(_ a: [UInt8], _ b: [UInt8], at offset: Int) -> Bool {
        let length = a.withUnsafeBytes { all in
            offset < all.count ? BlockHeader.parse(UnsafeRawBufferPointer(rebasing: all[offset...]))?.totalLength : nil
        } ?? BlockHeader.size
        let end = min(offset + length, a.count, b.count)
        return a.count > offset && b.count > offset && a[offset..<end] == b[offset..<end]
    }

    private static func inspectSegment(
        _ all: UnsafeRawBufferPointer, path: String, isLast: Bool, records: Bool, names: inout SkuNames,
        outcome: inout Recovery.SegmentOutcome?, emit: (String) -> Void
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
                outcome = .unwritten(offset: offset)
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
                outcome = Recovery.damage(all, at: offset, isLast: isLast, "block cut short")
                return false
            case .invalid(let why):
                outcome = Recovery.damage(all, at: offset, isLast: isLast, why)
                return false
            }
        }
        emit("  \(blocks) blocks, \(recordCount) records, all checksums OK")
        return true
    }

    private static func report(_ outcome: Recovery.SegmentOutcome, bytes: Int, emit: (String) -> Void) {
        switch outcome {
        case .unwritten(let offset):
            emit("  @\(offset): \(bytes) bytes of space allocated past the last block, all zeros (not yet written); recovery cuts them")
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
