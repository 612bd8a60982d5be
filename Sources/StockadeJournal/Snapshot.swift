import StockadeCore

/// Snapshot files: a 48-byte header, then the state image in LZ4 blocks (the log's block format).
/// Written to a temporary file, fsynced, renamed into place, and the directory fsynced, so a
/// snapshot is either whole or absent (a crash can leave the `.snap.tmp`; ``Store`` removes it at
/// start-up). Layout in docs/FORMAT.md.
///
/// The header names the log the snapshot was taken from by its last records through the snapshot's
/// position (``LogFingerprint``), so that recovery can tell a snapshot copied in from another data
/// directory, whose image the log's later records would otherwise be replayed onto, from its own.
public enum SnapshotFile {
    public static let magic: [UInt8] = Array("STOCKSNP".utf8)
    public static let version: UInt32 = 1
    public static let headerSize = 48

    /// What writing a snapshot cost.
    public struct Written: Sendable {
        public var path: String
        public var lsn: UInt64
        public var bytes: Int
        public var rawBytes: Int
    }

    /// Writes `state` as the snapshot covering log position `state.lsn`; `lastRecords` is the
    /// fingerprint of the log's last records through that position (nil when unknown: none is
    /// stored, and recovery cannot compare the snapshot with the log).
    @discardableResult
    public static func write(_ state: EngineState, lastRecords: LogFingerprint?, to directory: DataDirectory) throws(JournalError) -> Written {
        try write(lsn: state.lsn, shardCount: state.shards.count, lastRecords: lastRecords, to: directory) { emit in
            try state.encodeImage(chunkBytes: BlockHeader.rawBytesMax, flush: emit)
        }
    }

    /// Writes the snapshot covering `lsn` whose image `image` hands over, a chunk at a time, to the
    /// function it is given. Tests use it to write images of their own.
    package static func write(
        lsn: UInt64, shardCount: Int, lastRecords: LogFingerprint? = nil, to directory: DataDirectory,
        image: (_ emit: ([UInt8]) throws -> Void) throws -> Void
    ) throws(JournalError) -> Written {
        let finalPath = directory.snapshotPath(lsn: lsn)
        let tmpPath = finalPath + ".tmp"
        let storage = directory.storage
        let file = try storage.open(tmpPath, .create)
        var blockCount: UInt32 = 0
        var rawTotal = 0
        var written = headerSize
        do {
            try file.append([UInt8](repeating: 0, count: headerSize))
            var framed: [UInt8] = []
            try image { chunk in
                var start = 0
                while start < chunk.count {
                    let end = min(chunk.count, start + BlockHeader.rawBytesMax)
                    framed.removeAll(keepingCapacity: true)
                    chunk.withUnsafeBytes {
                        BlockCodec.appendBlock(
                            raw: UnsafeRawBufferPointer(rebasing: $0[start..<end]), firstLSN: lsn, recordCount: 0,
                            to: &framed)
                    }
                    try file.append(framed)
                    written += framed.count
                    blockCount += 1
                    rawTotal += end - start
                    start = end
                }
            }
            var header = magic
            header.appendLE(version); header.appendLE(UInt32(shardCount)); header.appendLE(lsn)
            header.appendLE(UInt64(rawTotal)); header.appendLE(blockCount)
            header.appendLE(CRC32C.checksum(header))
            if let lastRecords {
                // Bytes 40..<48: the fingerprints, then the low 16 bits of a CRC32C of the header before them.
                header += lastRecords.bytes
                header.appendLE(UInt16(truncatingIfNeeded: CRC32C.checksum(header)))
            } else {
                header.append(contentsOf: repeatElement(0, count: 8))
            }
            assert(header.count == headerSize)
            try file.write(header, at: 0)
            try file.sync()
            file.close()
            try storage.rename(tmpPath, to: finalPath)
            try storage.syncDirectory(directory.path)
        } catch let error as JournalError {
            file.close()
            try? storage.remove(tmpPath)
            throw error
        } catch {
            file.close()
            try? storage.remove(tmpPath)
            throw JournalError(.io, "snapshot \(finalPath): \(error)")
        }
        return Written(path: finalPath, lsn: lsn, bytes: written, rawBytes: rawTotal)
    }

    /// Reads and fully verifies a snapshot: header checksum, every block's checksum, lengths, and the
    /// image; with `lsn` (the position its name says: ``DataDirectory/snapshots()``), also that it is
    /// the snapshot of that position. A whole snapshot of another position under the name would
    /// otherwise count for the position the name says, and pruning would remove the log it needs.
    public static func read(_ path: String, lsn: UInt64? = nil, storage: any Storage = PosixStorage.shared) throws(JournalError) -> EngineState {
        try load(path, lsn: lsn, storage: storage).state
    }

    /// ``read(_:lsn:storage:)``, with the fingerprint of the log's last records through its position
    /// that its header names (nil: a snapshot written without one, by a build before it).
    public static func load(
        _ path: String, lsn: UInt64? = nil, storage: any Storage = PosixStorage.shared
    ) throws(JournalError) -> (state: EngineState, lastRecords: LogFingerprint?) {
        let bytes = try storage.readAll(path)
        let (state, lastRecords) = try typed { try bytes.withUnsafeBytes { all in try decode(all, path: path) } }
        if let lsn, state.lsn != lsn { throw JournalError(.corrupt, "\(path): its header states position \(state.lsn), not \(lsn)") }
        return (state, lastRecords)
    }

    /// Checks a snapshot exactly as start-up would load it: header, every block's checksum and length,
    /// and the image decoded (every bound and index it holds checked), the state then dropped. What
    /// pruning asks before it counts a snapshot as a fallback, and what a full copy asks before it is
    /// sent. Checksums alone are not enough: an image the decoder refuses, with every checksum valid,
    /// is as useless to recovery as a torn one, and counting it would let pruning remove the log it
    /// stands for. Throws what ``read(_:storage:)`` would.
    public static func verify(_ path: String, lsn: UInt64? = nil, storage: any Storage = PosixStorage.shared) throws(JournalError) {
        _ = try load(path, lsn: lsn, storage: storage)
    }

    /// Checks a snapshot's header and every block's checksum and length, and that its header states
    /// position `lsn`, without decoding the image: what finds a file damaged (a bit flip, a cut) or
    /// replaced on disk since it was written, when its image was already verified in full
    /// (``verify(_:storage:)``) right after it was written. Throws what ``read(_:storage:)`` would
    /// for such damage.
    public static func verifyBlocks(_ path: String, lsn: UInt64, storage: any Storage = PosixStorage.shared) throws(JournalError) {
        let bytes = try storage.readAll(path)
        let stated = try typed { try bytes.withUnsafeBytes { all in try checkBlocks(all, path: path).lsn } }
        guard stated == lsn else { throw JournalError(.corrupt, "\(path): its header states position \(stated), not \(lsn)") }
    }

    private static func decode(_ all: UnsafeRawBufferPointer, path: String) throws(JournalError) -> (EngineState, LogFingerprint?) {
        let (image, lsn, shardCount, lastRecords) = try checkBlocks(all, path: path)
        let state: EngineState
        do {
            state = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        } catch {
            throw JournalError(.corrupt, "\(path): image does not decode: \(error)")
        }
        guard state.lsn == lsn, state.shards.count == Int(shardCount) else {
            throw JournalError(.corrupt, "\(path): image disagrees with its header")
        }
        return (state, lastRecords)
    }

    /// Verifies the header and every block; returns the image, and the position, the shard count and
    /// the fingerprint of the log's last records the header states.
    private static func checkBlocks(
        _ all: UnsafeRawBufferPointer, path: String
    ) throws(JournalError) -> (image: [UInt8], lsn: UInt64, shardCount: UInt32, lastRecords: LogFingerprint?) {
        guard all.count >= headerSize, Array(all[0..<8]) == magic else {
            throw JournalError(.format, "\(path) is not a Stockade snapshot (bad magic or short file)")
        }
        var r = ByteReader(all, offset: 8)
        let version: UInt32 = (try? r.read()) ?? 0
        let shardCount: UInt32 = (try? r.read()) ?? 0
        let lsn: UInt64 = (try? r.read()) ?? 0
        let rawTotal: UInt64 = (try? r.read()) ?? 0
        let blockCount: UInt32 = (try? r.read()) ?? 0
        let crc: UInt32 = (try? r.read()) ?? 0
        guard crc == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: all[0..<36])) else {
            throw JournalError(.corrupt, "\(path): header checksum mismatch at offset 0")
        }
        guard version == Self.version else {
            throw JournalError(.format, "\(path): snapshot version \(version), this build reads \(Self.version)")
        }
        // Bytes 40..<48: eight zeros (written before fingerprints; also what `lsn` 0 gets), or the
        // fingerprints and a check of their own (the low 16 bits of a CRC32C over bytes 0..<46, so it
        // also says they belong to this header).
        var lastRecords: LogFingerprint?
        if all[40..<48].contains(where: { $0 != 0 }) {
            let check = UInt16(all[46]) | UInt16(all[47]) << 8
            guard check == UInt16(truncatingIfNeeded: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: all[0..<46]))),
                  let named = LogFingerprint(bytes: UnsafeRawBufferPointer(rebasing: all[40..<46]))
            else {
                throw JournalError(.corrupt, "\(path): the fingerprint of its last records fails its check (header offset 40)")
            }
            lastRecords = named
        }
        guard rawTotal <= UInt64(all.count) * 256 else { throw JournalError(.corrupt, "\(path): implausible image size") }
        var image: [UInt8] = []
        image.reserveCapacity(Int(rawTotal))
        var imageBytes = 0
        var offset = headerSize
        for index in 0..<blockCount {
            switch BlockCodec.read(all, at: offset) {
            case .block(let header, let payload):
                guard header.firstLSN == lsn else { throw JournalError(.corrupt, "\(path): block \(index) at offset \(offset) is of another snapshot") }
                image += payload
                imageBytes += payload.count
                offset += header.totalLength
            case .truncated:
                throw JournalError(.corrupt, "\(path): truncated at block \(index), offset \(offset)")
            case .invalid(let why):
                throw JournalError(.corrupt, "\(path): block \(index) at offset \(offset): \(why)")
            }
        }
        guard offset == all.count, imageBytes == Int(rawTotal) else {
            throw JournalError(.corrupt, "\(path): length mismatch (\(all.count - offset) stray bytes, image \(imageBytes) of \(rawTotal))")
        }
        return (image, lsn, shardCount, lastRecords)
    }
}
