import StockadeCore

/// The framed unit of the log and of snapshots: a header, then the payload (LZ4-compressed when
/// that is smaller), then (version 3) a trailer byte. Layout in docs/FORMAT.md.
///
/// Version 3 (written since log segments are preallocated) ends every block in ``trailer``, a byte
/// that is never zero. A segment's space is allocated ahead of its writes and reads as zeros, so a
/// write that stopped partway leaves its block followed by zeros up to the end of the file; the
/// trailer tells that apart from a block written whole and damaged since: a block whose trailer is
/// there was written to its end, a block whose last byte is still zero was not (docs/FORMAT.md,
/// Recovery).
///
/// Version 2 (written since issue #7) gives the header a CRC32C of its own (bytes 28..<32, over bytes
/// 0..<28), so a reader can trust a header's lengths before it trusts the payload: a flipped bit in a
/// length is then a bad header, not a "block cut short" that looks like a torn tail. Version 1 (that
/// field zero) is still read: its lengths are only confirmed by the block's CRC. In both, the block CRC
/// (bytes 32..<36) covers header bytes 0..<32, then the stored payload.
public struct BlockHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x4B4C_4253  // "SBLK" little-endian
    /// The version this build writes.
    public static let version: UInt16 = 3
    /// Versions this build reads: 1 (no header checksum), 2, and 3 (a trailer).
    public static let versionsRead: ClosedRange<UInt16> = 1...3
    /// The last byte of a version 3 block, after its payload: never zero.
    public static let trailer: UInt8 = 0xA5
    public static let size = 36
    /// Largest raw payload of one block: bounds the memory a reader allocates for a block it has not
    /// yet verified, and keeps one block's loss on a torn write small.
    public static let rawBytesMax = 4 << 20
    /// Largest stored payload: LZ4's worst case for ``rawBytesMax`` (raw storage is never larger).
    static let payloadBytesMax = rawBytesMax + rawBytesMax / 255 + 16

    public static let flagCompressed: UInt16 = 1

    public var version: UInt16 = Self.version
    public var flags: UInt16
    public var payloadLength: Int
    public var rawLength: Int
    /// Log position of the first record (log blocks); the covered position (snapshot blocks).
    public var firstLSN: UInt64
    public var recordCount: Int
    public var checksum: UInt32

    public var isCompressed: Bool { flags & Self.flagCompressed != 0 }
    /// The block's bytes: header, payload, and the trailer byte from version 3 on.
    public var totalLength: Int { Self.size + payloadLength + (version >= 3 ? 1 : 0) }
    /// Whether the header checked its own checksum (version 2), so its lengths can be trusted
    /// before the payload is read.
    public var headerVerified: Bool { version >= 2 }

    /// Writes the header bytes (with `checksum` as given; the header checksum computed for version 2).
    func encode(into out: inout [UInt8]) {
        let start = out.count
        out.appendLE(Self.magic); out.appendLE(version); out.appendLE(flags)
        out.appendLE(UInt32(payloadLength)); out.appendLE(UInt32(rawLength)); out.appendLE(firstLSN)
        out.appendLE(UInt32(recordCount))
        let headerCRC = version >= 2 ? out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[start..<start + 28])) } : 0
        out.appendLE(headerCRC); out.appendLE(checksum)
    }

    /// Parses a header; nil when the magic, version, header checksum (version 2) or lengths cannot
    /// be a block's.
    static func parse(_ bytes: UnsafeRawBufferPointer) -> BlockHeader? {
        guard bytes.count >= size else { return nil }
        // Loaded in place (this module's code, specialized): a walk over a segment parses a header
        // per block, and the generic reader of another module costs a metadata lookup per field.
        func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
        }
        let magic = field(0, UInt32.self), version = field(4, UInt16.self), flags = field(6, UInt16.self)
        let payload = field(8, UInt32.self), raw = field(12, UInt32.self), lsn = field(16, UInt64.self)
        let count = field(24, UInt32.self), headerCRC = field(28, UInt32.self), crc = field(32, UInt32.self)
        guard magic == Self.magic, versionsRead.contains(version) else { return nil }
        if version >= 2 {
            guard headerCRC == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<28])) else { return nil }
        }
        guard Int(raw) <= rawBytesMax, Int(payload) <= payloadBytesMax else { return nil }
        return BlockHeader(
            version: version, flags: flags, payloadLength: Int(payload), rawLength: Int(raw), firstLSN: lsn,
            recordCount: Int(count), checksum: crc)
    }
}

/// Frames raw payloads into blocks.
public enum BlockCodec {
    /// Appends one framed block holding `raw` (compressed when that helps) to `out`.
    public static func appendBlock(raw: UnsafeRawBufferPointer, firstLSN: UInt64, recordCount: Int, to out: inout [UInt8]) {
        precondition(raw.count <= BlockHeader.rawBytesMax)
        let headerStart = out.count
        out.append(contentsOf: repeatElement(0, count: BlockHeader.size))
        let payloadStart = out.count
        var flags: UInt16 = 0
        if LZ4.compress(raw, appendingTo: &out) != nil {
            flags = BlockHeader.flagCompressed
        } else {
            out.append(contentsOf: raw)
        }
        var header = BlockHeader(
            flags: flags, payloadLength: out.count - payloadStart, rawLength: raw.count, firstLSN: firstLSN,
            recordCount: recordCount, checksum: 0)
        var headerBytes: [UInt8] = []
        headerBytes.reserveCapacity(BlockHeader.size)
        header.encode(into: &headerBytes)
        let headerCRC = headerBytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<32])) }
        header.checksum = out.withUnsafeBytes { all in
            CRC32C.checksum(UnsafeRawBufferPointer(rebasing: all[payloadStart...]), continuing: headerCRC)
        }
        headerBytes.removeAll(keepingCapacity: true)
        header.encode(into: &headerBytes)
        out.replaceSubrange(headerStart..<payloadStart, with: headerBytes)
        out.append(BlockHeader.trailer)
    }

    /// What reading one block found.
    public enum ReadResult {
        case block(BlockHeader, payload: [UInt8])
        /// Fewer bytes than a header, or than the header's declared length: a write cut short, or a
        /// length that a flipped bit made too large (version 1 headers cannot tell these apart;
        /// ``Recovery`` scans on to decide).
        case truncated
        /// Complete, but the magic, version, a checksum or the trailer is wrong, or the payload does not
        /// decompress.
        case invalid(String)
    }

    /// Reads the block that starts at `offset` of `bytes` and checks it.
    public static func read(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> ReadResult {
        let available = bytes.count - offset
        guard available >= BlockHeader.size else { return .truncated }
        let headerBytes = UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + BlockHeader.size])
        guard let header = BlockHeader.parse(headerBytes) else { return .invalid("bad block header") }
        guard available >= header.totalLength else { return .truncated }
        let payloadEnd = offset + BlockHeader.size + header.payloadLength
        let payload = UnsafeRawBufferPointer(rebasing: bytes[offset + BlockHeader.size..<payloadEnd])
        let crc = CRC32C.checksum(payload, continuing: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: headerBytes[0..<32])))
        guard crc == header.checksum else { return .invalid("checksum mismatch") }
        if header.version >= 3, bytes[payloadEnd] != BlockHeader.trailer { return .invalid("trailer byte is \(bytes[payloadEnd])") }
        if header.isCompressed {
            guard let raw = LZ4.decompress(payload, rawLength: header.rawLength) else {
                return .invalid("payload does not decompress to \(header.rawLength) bytes")
            }
            return .block(header, payload: raw)
        }
        guard header.payloadLength == header.rawLength else { return .invalid("raw payload length mismatch") }
        return .block(header, payload: Array(payload))
    }

    /// The offset of the first block at or after `start` that verifies completely, or nil when none
    /// does. A reader that met damage at some offset asks this from just past it: a valid block after
    /// the damage means the damage is corruption in the middle of the log, not a torn tail.
    ///
    /// Cost: a byte scan for the magic; every candidate's header is checked, and its payload only when
    /// the header passes.
    public static func nextValidBlock(_ bytes: UnsafeRawBufferPointer, from start: Int) -> Int? {
        guard start >= 0 else { return nil }
        var offset = start
        let magic0 = UInt8(truncatingIfNeeded: BlockHeader.magic)
        while offset + BlockHeader.size <= bytes.count {
            if bytes[offset] == magic0, case .block = read(bytes, at: offset) { return offset }
            offset += 1
        }
        return nil
    }
}
