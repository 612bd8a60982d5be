import StockadeCore

/// Reads durable records back from the log by position: the order event stream. Only block headers
/// are read until the block holding the first wanted position; only verified blocks are returned.
public struct LogReader: Sendable {
    public let directory: DataDirectory
    /// Where blocks start, learned by earlier reads (``Journal/blockIndex``); nil: each read walks
    /// its segments' block headers from their start.
    public let index: BlockIndex?
    /// The journal's newest records (``Journal/tail``): a read it holds whole is answered from it,
    /// without the files; nil: every read goes to the files.
    public let tail: LogTail?

    public init(directory: DataDirectory, index: BlockIndex? = nil, tail: LogTail? = nil) {
        self.directory = directory
        self.index = index
        self.tail = tail
    }

    /// Why records could not be read.
    public enum ReadError: Error, Equatable, Sendable {
        /// The segments holding `position` were deleted after a snapshot; the oldest still there is `oldest`.
        case trimmed(oldest: UInt64)
        case unreadable(String)
    }

    /// Up to `count` records with positions `from...durable`, oldest first.
    public func read(from: UInt64, count: Int, durable: UInt64) throws(ReadError) -> [(position: UInt64, record: Record)] {
        guard from <= durable, count > 0 else { return [] }
        if let tail, let held = tail.records(from: max(from, 1), count: count, durable: durable) { return held }
        let segments: [(firstLSN: UInt64, path: String)]
        do { segments = try directory.segments() } catch { throw .unreadable(error.message) }
        index?.keep(only: segments)
        guard let first = segments.first else { return [] }
        guard first.firstLSN <= max(from, 1) else { throw .trimmed(oldest: first.firstLSN) }
        var result: [(position: UInt64, record: Record)] = []
        // The last segment starting at or before `from`, then the ones after it.
        let startIndex = segments.lastIndex { $0.firstLSN <= max(from, 1) } ?? 0
        for i in startIndex..<segments.count {
            let segment = segments[i]
            if segment.firstLSN > durable || result.count >= count { break }
            let following = i + 1 < segments.count ? segments[i + 1].firstLSN : nil
            try readSegment(
                segment.path, firstLSN: segment.firstLSN, following: following, from: from, count: count, durable: durable,
                into: &result)
        }
        return result
    }

    /// One block as it lies in the log (header and compressed payload, checksummed), for a replica.
    public struct RawBlock: Sendable {
        public var firstLSN: UInt64
        public var recordCount: Int
        public var bytes: [UInt8]
        public var lastLSN: UInt64 { firstLSN + UInt64(recordCount) - 1 }
    }

    /// Whole blocks holding positions `from...durable`, oldest first, as written (each verified here
    /// first), until about `bytesMax` bytes: what the replication stream ships. The first block may
    /// start before `from` (a block is the unit); none ends after `durable` (a batch, and so its
    /// blocks, becomes durable whole).
    public func readBlocks(from: UInt64, bytesMax: Int, durable: UInt64) throws(ReadError) -> [RawBlock] {
        guard from >= 1, from <= durable else { return [] }
        let segments: [(firstLSN: UInt64, path: String)]
        do { segments = try directory.segments() } catch { throw .unreadable(error.message) }
        index?.keep(only: segments)
        guard let first = segments.first else { return [] }
        guard first.firstLSN <= from else { throw .trimmed(oldest: first.firstLSN) }
        var result: [RawBlock] = []
        var bytes = 0
        let startIndex = segments.lastIndex { $0.firstLSN <= from } ?? 0
        var next = from
        for segment in segments[startIndex...] {
            if segment.firstLSN > durable || bytes >= bytesMax { break }
            let file: any StorageFile
            let size: Int
            do {
                file = try directory.storage.open(segment.path, .read)
                size = try file.size()
            } catch {
                throw .unreadable(error.message)
            }
            defer { file.close() }
            var window = ReadWindow(file)
            var walk = SegmentWalk(index: index, path: segment.path, position: next, size: size)
            while walk.offset + BlockHeader.size <= size, bytes < bytesMax {
                let offset = walk.offset
                let header: ArraySlice<UInt8>
                do { header = try window.read(at: offset, count: BlockHeader.size) } catch { throw .unreadable(error.message) }
                let parsed = header.count == BlockHeader.size ? header.withUnsafeBytes({ BlockHeader.parse($0) }) : nil
                guard walk.accept(parsed, durable: durable) else { continue }
                guard let h = parsed else {
                    // Past the durable position this may be a block being written; before it, the
                    // log is damaged: said, not taken for the end of the log.
                    if next <= durable {
                        throw .unreadable("\(segment.path) at offset \(offset): block header fails verification")
                    }
                    break
                }
                if h.firstLSN > durable { return result }
                if h.recordCount == 0 {
                    throw .unreadable("\(segment.path) at offset \(offset): block header with no records")
                }
                let last = h.firstLSN + UInt64(h.recordCount) - 1
                if last < next {
                    walk.offset += h.totalLength
                    continue
                }
                guard h.firstLSN <= next else { throw .unreadable("\(segment.path) at offset \(offset): block starts at \(h.firstLSN), expected \(next)") }
                guard last <= durable else { return result }
                guard offset + h.totalLength <= size else { break }
                let block: ArraySlice<UInt8>
                do { block = try window.read(at: offset, count: h.totalLength) } catch { throw .unreadable(error.message) }
                guard block.count == h.totalLength else { throw .unreadable("short read in \(segment.path) at offset \(offset)") }
                guard case .block = block.withUnsafeBytes({ BlockCodec.read($0, at: 0) }) else {
                    throw .unreadable("\(segment.path) at offset \(offset): block fails verification")
                }
                result.append(RawBlock(firstLSN: h.firstLSN, recordCount: h.recordCount, bytes: Array(block)))
                bytes += block.count
                next = last + 1
                walk.offset += h.totalLength
            }
        }
        return result
    }

    /// Reads segment `path` (its name says it starts at `firstLSN`; the next one starts at
    /// `following`). A block header that does not parse where the log must go on (a position at or
    /// below `durable` that the next segment does not start with) is damage, said as such: taking
    /// it for the segment's end would answer the next segment's records in place of this one's.
    private func readSegment(
        _ path: String, firstLSN: UInt64, following: UInt64?, from: UInt64, count: Int, durable: UInt64,
        into result: inout [(position: UInt64, record: Record)]
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
        var window = ReadWindow(file)
        var walk = SegmentWalk(index: index, path: path, position: max(from, 1), size: size)
        // The position the block at the walk's offset starts at.
        var expected = walk.startLSN ?? firstLSN
        while walk.offset + BlockHeader.size <= size, result.count < count {
            let offset = walk.offset
            let header: ArraySlice<UInt8>
            do { header = try window.read(at: offset, count: BlockHeader.size) } catch { throw .unreadable(error.message) }
            let parsed = header.count == BlockHeader.size ? header.withUnsafeBytes({ BlockHeader.parse($0) }) : nil
            guard walk.accept(parsed, durable: durable) else {
                expected = firstLSN
                continue
            }
            guard let h = parsed else {
                // Past the durable position (or where the next segment goes on) this is the end of
                // the blocks written; before it, the log is damaged.
                if expected <= durable && expected != following {
                    throw .unreadable("\(path) at offset \(offset): block header fails verification")
                }
                return
            }
            if h.firstLSN > durable { return }
            if h.recordCount > 0 {
                guard h.firstLSN == expected else {
                    throw .unreadable("\(path) at offset \(offset): block starts at \(h.firstLSN), expected \(expected)")
                }
                expected = h.firstLSN + UInt64(h.recordCount)
            }
            // (A count of 0 is checked first: position 0 with no records must not underflow.)
            if h.recordCount == 0 || h.firstLSN + UInt64(h.recordCount) - 1 < from {
                walk.offset += h.totalLength
                continue
            }
            // A durable block was written whole before it was durable: cut short, it is damage.
            guard offset + h.totalLength <= size else { throw .unreadable("\(path) at offset \(offset): the segment ends inside a block") }
            let block: ArraySlice<UInt8>
            do { block = try window.read(at: offset, count: h.totalLength) } catch { throw .unreadable(error.message) }
            guard block.count == h.totalLength else { throw .unreadable("short read in \(path) at offset \(offset)") }
            switch block.withUnsafeBytes({ BlockCodec.read($0, at: 0) }) {
            case .block(_, let payload):
                // Only the records wanted are decoded: those before `from` are stepped over.
                let skipped = from > h.firstLSN ? Int(from - h.firstLSN) : 0
                var position = h.firstLSN + UInt64(skipped)
                do {
                    try payload.withUnsafeBytes { raw in
                        try Record.decode(raw, skipping: skipped, count: count - result.count) { record in
                            if position <= durable { result.append((position, record)) }
                            position += 1
                        }
                    }
                } catch {
                    throw .unreadable("\(path) at offset \(offset): \(error)")
                }
            case .truncated, .invalid:
                throw .unreadable("\(path) at offset \(offset): block fails verification")
            }
            walk.offset += h.totalLength
        }
        // The file ended (cut short on disk, or a lost tail) where the log must go on.
        if result.count < count && expected <= durable && expected != following {
            throw .unreadable("\(path) ends before position \(expected), which is durable and does not start the next segment")
        }
    }
}

/// A segment read through a window of ``bytes`` bytes: a walk over small blocks (a few dozen bytes
/// each, compressed) reads one window per ``bytes`` of headers, not one `pread` per header.
///
/// What a window holds may be older than the file by the time it is used (the open segment grows
/// behind the reader). The blocks a read returns are at or below the durable position it was given,
/// written before that position was published and so before the window was read; past them a window
/// may show zeros where a block has been written since, which the walk takes for the end of what it
/// may read, as it would a block beyond the durable position.
private struct ReadWindow {
    static let bytes = 64 << 10
    let file: any StorageFile
    private var window: [UInt8] = []
    private var start = 0

    init(_ file: any StorageFile) { self.file = file }

    /// Up to `count` bytes at `offset` (fewer at the file's end).
    mutating func read(at offset: Int, count: Int) throws(JournalError) -> ArraySlice<UInt8> {
        if offset >= start, offset + count <= start + window.count {
            return window[(offset - start)..<(offset - start + count)]
        }
        if count > Self.bytes { return try file.read(at: offset, count: count)[...] }
        window = try file.read(at: offset, count: Self.bytes)
        start = offset
        return window[0..<min(count, window.count)]
    }
}

/// A walk over one segment's blocks: from the last block the reader's ``BlockIndex`` knows at or
/// before the wanted position (or the segment's first), teaching the index blocks it passes.
private struct SegmentWalk {
    let index: BlockIndex?
    let path: String
    /// The generation of the index the walk began in: what it learns counts only in that one.
    let generation: UInt64
    /// Where the next block header is.
    var offset: Int
    /// The block the index gave, until its header is checked.
    private var jumpedTo: BlockIndex.Entry?
    /// The first position of the block the walk starts at, when the index gave it.
    let startLSN: UInt64?
    /// The offset of the last block taught to the index, or where the walk began.
    private var taughtAt: Int

    /// `size`: the segment's length now (a block the index gives past it is not this segment's).
    init(index: BlockIndex?, path: String, position: UInt64, size: Int) {
        self.index = index
        self.path = path
        generation = index?.generation ?? 0
        jumpedTo = index?.block(atOrBefore: position, in: path)
        if let jumped = jumpedTo, jumped.offset + BlockHeader.size > size {
            index?.forget(path)
            jumpedTo = nil
        }
        offset = jumpedTo?.offset ?? SegmentHeader.size
        startLSN = jumpedTo?.firstLSN
        taughtAt = offset
    }

    /// Takes the header read at ``offset`` (nil: it does not parse as a block's). False when it is
    /// the block the index gave and does not check (not a block, or not at that position): the
    /// index forgets the segment and the walk starts again from its first block.
    mutating func accept(_ header: BlockHeader?, durable: UInt64) -> Bool {
        if let expected = jumpedTo {
            jumpedTo = nil
            guard let header, header.firstLSN == expected.firstLSN, header.recordCount > 0 else {
                index?.forget(path)
                offset = SegmentHeader.size
                taughtAt = offset
                return false
            }
        }
        if let index, let header, header.recordCount > 0, header.firstLSN <= durable, offset >= taughtAt + BlockIndex.strideBytes {
            index.learn(BlockIndex.Entry(firstLSN: header.firstLSN, offset: offset), in: path, generation: generation)
            taughtAt = offset
        }
        return true
    }
}

/// What a snapshot's header keeps of the log it was taken from (docs/FORMAT.md): fingerprints of the
/// log's last records through the snapshot's position (at most ``windowMax``, fewer when the log held
/// fewer then) and of the last record alone, and how many records the first covers. Recovery compares
/// them with the log: the window where the log still holds all of it, else the last record where it
/// holds that. A snapshot copied in from another data directory does not match, where replaying this
/// log's later records onto its image would mix two stores without an error.
///
/// A window, not only one record: records carry no identity of their store, and one record alone (the
/// CONFIRM of a shard's n-th order, a SKU added under the same name and index) is often the same in
/// two stores at the same position (found by review). A run of them is the same only where two logs
/// hold the same changes there, down to the millisecond of each reservation's deadline.
public struct LogFingerprint: Hashable, Sendable, CustomStringConvertible {
    /// Records a window holds at most.
    public static let windowMax = 64
    /// How many records end at the snapshot's position: 1 to ``windowMax``.
    public let records: Int
    /// FNV-1a over the encodings of those records, oldest first, folded to 24 bits.
    public let window: UInt32
    /// FNV-1a over the encoding of the last record alone, folded to 16 bits.
    public let last: UInt16

    /// The header's six bytes: the record count, the window's 24 bits, the last record's 16 (little-endian).
    public var bytes: [UInt8] {
        [UInt8(records), UInt8(truncatingIfNeeded: window), UInt8(truncatingIfNeeded: window >> 8), UInt8(truncatingIfNeeded: window >> 16),
         UInt8(truncatingIfNeeded: last), UInt8(truncatingIfNeeded: last >> 8)]
    }

    /// Reads the header's six bytes; nil when they cannot be a fingerprint.
    init?(bytes: UnsafeRawBufferPointer) {
        guard bytes.count == 6, bytes[0] >= 1, Int(bytes[0]) <= Self.windowMax else { return nil }
        records = Int(bytes[0])
        window = UInt32(bytes[1]) | UInt32(bytes[2]) << 8 | UInt32(bytes[3]) << 16
        last = UInt16(bytes[4]) | UInt16(bytes[5]) << 8
    }

    /// The fingerprint of `records` (each with its position, oldest first, consecutive).
    init(of records: [(position: UInt64, record: Record)]) {
        precondition(!records.isEmpty && records.count <= Self.windowMax)
        var buffer = RecordBuffer(capacity: 256)
        var window = FNV64()
        var last = FNV64()
        for (_, record) in records {
            buffer.removeAll()
            buffer.append(record)
            window.add(bytes: buffer.bytes)
            last = FNV64()
            last.add(bytes: buffer.bytes)
        }
        self.records = records.count
        self.window = UInt32(truncatingIfNeeded: window.value ^ (window.value >> 32)) & 0xFF_FFFF
        self.last = Self.fold16(last.value)
    }

    private init(records: Int, window: UInt32, last: UInt16) {
        self.records = records
        self.window = window
        self.last = last
    }

    static func fold16(_ hash: UInt64) -> UInt16 {
        let folded = hash ^ (hash >> 32)
        return UInt16(truncatingIfNeeded: folded ^ (folded >> 16))
    }

    /// A fingerprint of as many records with other hashes: what another log's snapshot names (tests,
    /// the simulator).
    package func differing(by salt: UInt32) -> LogFingerprint {
        LogFingerprint(records: records, window: (window ^ (salt | 1)) & 0xFF_FFFF, last: last ^ (UInt16(truncatingIfNeeded: salt >> 16) | 1))
    }

    public var description: String {
        "\(String(window, radix: 16)) over \(records) record\(records == 1 ? "" : "s"), \(String(last, radix: 16)) for the last"
    }
}

extension LogReader {
    /// The fingerprint of the `records` records ending at `position`, or nil when the log does not
    /// hold all of them or they cannot be read.
    public func snapshotFingerprint(through position: UInt64, records: Int, durable: UInt64) -> LogFingerprint? {
        guard records >= 1, records <= LogFingerprint.windowMax, position >= UInt64(records), position <= durable else { return nil }
        let from = position - UInt64(records) + 1
        guard let found = try? read(from: from, count: records, durable: position), found.count == records,
              found.first?.position == from, found.last?.position == position
        else { return nil }
        return LogFingerprint(of: found)
    }

    /// What a snapshot of `position` stores: the fingerprints of the log's last ``LogFingerprint/windowMax``
    /// records through it, or of as many as the log still holds in a row; nil when it holds none of them.
    public func snapshotFingerprint(through position: UInt64, durable: UInt64) -> LogFingerprint? {
        guard position >= 1, position <= durable else { return nil }
        var records = Int(min(UInt64(LogFingerprint.windowMax), position))
        do {
            _ = try read(from: position - UInt64(records) + 1, count: 1, durable: position)
        } catch {
            // Segments before `oldest` are gone: the window starts there.
            guard case .trimmed(let oldest) = error, oldest <= position else { return nil }
            records = Int(position - oldest + 1)
        }
        if let whole = snapshotFingerprint(through: position, records: records, durable: durable) { return whole }
        // Records missing inside the window (`--truncate-corrupt` cut the log and it went on after the
        // position it had reached): the window starts with the segment holding `position`, written
        // after the gap.
        guard let segment = try? directory.segments().last(where: { $0.firstLSN <= position }) else { return nil }
        return snapshotFingerprint(through: position, records: min(records, Int(position - segment.firstLSN + 1)), durable: durable)
    }

    /// The 16-bit fingerprint of the record at `position` alone (``LogFingerprint/last``), or nil when
    /// the log does not hold it or it cannot be read.
    public func lastRecordFingerprint(at position: UInt64, durable: UInt64) -> UInt16? {
        fingerprint(at: position, durable: durable).map(LogFingerprint.fold16)
    }

    /// A fingerprint of the record at `position` (FNV-1a over its encoding), or nil when the log does
    /// not hold it (trimmed, or not written). Two logs whose records at a position have different
    /// fingerprints diverged at or before it: what a replica and its primary compare when they meet.
    public func fingerprint(at position: UInt64, durable: UInt64) -> UInt64? {
        guard position >= 1, position <= durable,
              let found = try? read(from: position, count: 1, durable: durable).first, found.position == position
        else { return nil }
        var buffer = RecordBuffer(capacity: 256)
        buffer.append(found.record)
        var hash = FNV64()
        hash.add(bytes: buffer.bytes)
        return hash.value
    }

    /// The records of one block as the replication stream carries it (``RawBlock/bytes``): verified
    /// (checksum, length, record count) and decoded, with the position of its first record; or why
    /// it cannot be trusted. The replica's side of ``readBlocks(from:bytesMax:durable:)``.
    public static func decodeBlock(_ bytes: [UInt8]) -> Result<(firstLSN: UInt64, records: [Record]), ReadError> {
        switch bytes.withUnsafeBytes({ BlockCodec.read($0, at: 0) }) {
        case .truncated:
            return .failure(.unreadable("block cut short (\(bytes.count) bytes)"))
        case .invalid(let why):
            return .failure(.unreadable("block fails verification: \(why)"))
        case .block(let header, let payload):
            guard header.totalLength == bytes.count else {
                return .failure(.unreadable("block of \(header.totalLength) bytes carried in \(bytes.count)"))
            }
            var records: [Record] = []
            records.reserveCapacity(header.recordCount)
            do {
                try payload.withUnsafeBytes { raw in try Record.decodeAll(raw) { records.append($0) } }
            } catch {
                return .failure(.unreadable("block at position \(header.firstLSN): \(error)"))
            }
            guard records.count == header.recordCount, header.recordCount > 0 else {
                return .failure(.unreadable("block holds \(records.count) records, its header says \(header.recordCount)"))
            }
            return .success((header.firstLSN, records))
        }
    }
}
