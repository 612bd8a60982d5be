import CCRC32C
import CLZ4

/// CRC32C (Castagnoli), hardware-accelerated where the CPU has it.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        stockade_crc32c(crc, bytes.baseAddress, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }
}

/// LZ4 block compression (liblz4), for log blocks and snapshot chunks.
public enum LZ4 {
    /// Appends the compressed form of `raw` to `output`; returns the compressed size, or nil when it
    /// would not be smaller (the caller then stores the bytes raw).
    public static func compress(_ raw: UnsafeRawBufferPointer, appendingTo output: inout [UInt8]) -> Int? {
        guard raw.count > 0, raw.count <= Int(LZ4_MAX_INPUT_SIZE) else { return nil }
        let bound = Int(LZ4_compressBound(Int32(raw.count)))
        let start = output.count
        output.append(contentsOf: repeatElement(0, count: bound))
        let written = output.withUnsafeMutableBytes { out in
            LZ4_compress_default(
                raw.baseAddress!.assumingMemoryBound(to: CChar.self),
                (out.baseAddress! + start).assumingMemoryBound(to: CChar.self), Int32(raw.count), Int32(bound))
        }
        guard written > 0, Int(written) < raw.count else {
            output.removeSubrange(start...)
            return nil
        }
        output.removeSubrange((start + Int(written))...)
        return Int(written)
    }

    /// Decompresses exactly `rawLength` bytes; nil when the input is not a valid LZ4 block of that size.
    public static func decompress(_ compressed: UnsafeRawBufferPointer, rawLength: Int) -> [UInt8]? {
        guard rawLength > 0, rawLength <= Int(LZ4_MAX_INPUT_SIZE), compressed.count > 0 else { return nil }
        var raw = [UInt8](repeating: 0, count: rawLength)
        let produced = raw.withUnsafeMutableBytes { out in
            LZ4_decompress_safe(
                compressed.baseAddress!.assumingMemoryBound(to: CChar.self),
                out.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(compressed.count), Int32(rawLength))
        }
        return produced == Int32(rawLength) ? raw : nil
    }
}
