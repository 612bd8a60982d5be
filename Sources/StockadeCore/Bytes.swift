extension Array where Element == UInt8 {
    /// Appends a fixed-width integer, little-endian.
    @inlinable @inline(__always)
    package mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    /// Appends a name of at most 255 bytes as `[length u8][bytes]`.
    @inlinable
    package mutating func appendName(_ name: Name) {
        name.withBytes { bytes in
            precondition(bytes.count <= 255)
            append(UInt8(bytes.count))
            append(contentsOf: bytes)
        }
    }
}

/// Reads little-endian integers and short strings from a byte range, refusing to read past its end.
package struct ByteReader {
    /// Reading past the end, or a value that cannot be valid.
    package struct Underflow: Error { package var reason: String }

    package let base: UnsafeRawBufferPointer
    package private(set) var offset: Int
    private let end: Int

    package init(_ base: UnsafeRawBufferPointer, offset: Int = 0, end: Int? = nil) {
        self.base = base
        self.offset = offset
        self.end = end ?? base.count
    }

    package var isAtEnd: Bool { offset >= end }
    package var remaining: Int { end - offset }

    @inline(__always)
    package mutating func read<T: FixedWidthInteger>() throws -> T {
        let size = MemoryLayout<T>.size
        guard end - offset >= size else { throw Underflow(reason: "truncated: need \(size) bytes at offset \(offset)") }
        let value = base.loadUnaligned(fromByteOffset: offset, as: T.self)
        offset += size
        return T(littleEndian: value)
    }

    /// Reads a `[length u8][bytes]` name, byte for byte.
    package mutating func readName() throws -> Name {
        let length = Int(try read() as UInt8)
        guard end - offset >= length else { throw Underflow(reason: "truncated string at offset \(offset)") }
        let name = Name(UnsafeRawBufferPointer(rebasing: base[offset..<offset + length]))
        offset += length
        return name
    }

    /// A reader over the next `length` bytes; this reader moves past them.
    package mutating func sub(_ length: Int) throws -> ByteReader {
        guard length >= 0, end - offset >= length else { throw Underflow(reason: "length \(length) past end at offset \(offset)") }
        let reader = ByteReader(base, offset: offset, end: offset + length)
        offset += length
        return reader
    }
}
