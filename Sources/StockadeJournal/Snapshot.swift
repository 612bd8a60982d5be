import StockadeCore

/// Snapshot files: a 48-byte header, then the state image in LZ4 blocks (the log's block format).
/// Written to a temporary file, fsynced, renamed into place, and the directory fsynced, so a
/// snapshot is either whole or absent. Layout in docs/FORMAT.md.
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

    /// Writes `state` as the snapshot covering log position `state.lsn`.
    @discardableResult
    public static func write(_ state: EngineState, to directory: DataDirectory) throws(JournalError) -> Written {
        let finalPath = directory.snapshotPath(lsn: state.lsn)
        let tmpPath = finalPath + ".tmp"
        let file = try File.open(tmpPath, create: true, truncate: true)
        var blockCount: UInt32 = 0
        var rawTotal = 0
        var written = headerSize
        do {
            try file.write([UInt8](repeating: 0, count: headerSize))
            var framed: [UInt8] = []
            try state.encodeImage(chunkBytes: BlockHeader.rawBytesMax) { chunk in
                var start = 0
                while start < chunk.count {
                    let end = min(chunk.count, start + BlockHeader.rawBytesMax)
                    framed.removeAll(keepingCapacity: true)
                    chunk.withUnsafeBytes {
                        BlockCodec.appendBlock(
                            raw: UnsafeRawBufferPointer(rebasing: $0[start..<end]), firstLSN: state.lsn, recordCount: 0,
                            to: &framed)
                    }
                    try file.write(framed)
                    written += framed.count
                    blockCount += 1
                    rawTotal += end - start
                    start = end
                }
            }
            var header = magic
            header.appendLE(version); header.appendLE(UInt32(state.shards.count)); header.appendLE(state.lsn)
            header.appendLE(UInt64(rawTotal)); header.appendLE(blockCount)
            header.appendLE(CRC32C.checksum(header))
            header.append(contentsOf: repeatElement(0, count: headerSize - header.count))
            try file.pwrite(header, at: 0)
            try file.sync()
            file.close()
            try File.rename(tmpPath, finalPath)
            try File.syncDirectory(directory.path)
        } catch let error as JournalError {
            file.close()
            try? File.remove(tmpPath)
            throw error
        } catch {
            file.close()
            try? File.remove(tmpPath)
            throw JournalError(.io, "snapshot \(finalPath): \(error)")
        }
        return Written(path: finalPath, lsn: state.lsn, bytes: written, rawBytes: rawTotal)
    }

    /// Reads and fully verifies a snapshot: header checksum, every block's checksum, lengths, and the image.
    public static func read(_ path: String) throws(JournalError) -> EngineState {
        let bytes = try File.readAll(path)
        return try typed { try bytes.withUnsafeBytes { all in try decode(all, path: path) } }
    }

    private static func decode(_ all: UnsafeRawBufferPointer, path: String) throws(JournalError) -> EngineState {
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
        guard rawTotal <= UInt64(all.count) * 256 else { throw JournalError(.corrupt, "\(path): implausible image size") }
        var image: [UInt8] = []
        image.reserveCapacity(Int(rawTotal))
        var offset = headerSize
        for index in 0..<blockCount {
            switch BlockCodec.read(all, at: offset) {
            case .block(let header, let payload):
                guard header.firstLSN == lsn else { throw JournalError(.corrupt, "\(path): block \(index) at offset \(offset) is of another snapshot") }
                image += payload
                offset += header.totalLength
            case .truncated:
                throw JournalError(.corrupt, "\(path): truncated at block \(index), offset \(offset)")
            case .invalid(let why):
                throw JournalError(.corrupt, "\(path): block \(index) at offset \(offset): \(why)")
            }
        }
        guard offset == all.count, image.count == Int(rawTotal) else {
            throw JournalError(.corrupt, "\(path): length mismatch (\(all.count - offset) stray bytes, image \(image.count) of \(rawTotal))")
        }
        let state: EngineState
        do {
            state = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        } catch {
            throw JournalError(.corrupt, "\(path): image does not decode: \(error)")
        }
        guard state.lsn == lsn, state.shards.count == Int(shardCount) else {
            throw JournalError(.corrupt, "\(path): image disagrees with its header")
        }
        return state
    }
}
