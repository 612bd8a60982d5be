/// A client-chosen id (SKU, user, request id): a byte string, binary-safe like a Redis key.
///
/// Two names are the same only when their bytes are the same. Swift's `String` compares by Unicode
/// canonical equivalence (`"caf\u{E9}" == "cafe\u{301}"`), so ids kept as `String` in one table and
/// hashed as bytes in another silently disagree; a `Name` is hashed, compared, routed, logged and
/// returned byte for byte, and invalid UTF-8 is kept as sent.
///
/// Up to ``inlineBytesMax`` bytes live inline in the value (no allocation, nothing to count
/// references of: most ids are short, and `user:` with twelve digits is 17 bytes); longer ones, up
/// to ``Limits/nameBytesMax``, in a shared immutable buffer. 32 bytes either way.
public struct Name: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// Bytes kept inline: three words, less the length byte.
    public static let inlineBytesMax = 23

    /// Inline: bytes 0..<8. Long: unused (0).
    @usableFromInline let word0: UInt64
    /// Inline: bytes 8..<16. Long: unused (0).
    @usableFromInline let word1: UInt64
    /// Inline: bytes 16..<23 in the low 7 bytes, the length in the top byte. Long: the length in the top byte.
    @usableFromInline let word2: UInt64
    /// The bytes of a name longer than ``inlineBytesMax``; nil for inline names.
    @usableFromInline let long: LongBytes?

    /// The bytes of a long name, in one allocation (a `ManagedBuffer` whose header is their count).
    /// Written once when made, never after, so sharing it across threads is safe.
    @usableFromInline struct LongBytes: @unchecked Sendable {
        @usableFromInline let buffer: ManagedBuffer<Int, UInt8>

        @usableFromInline
        init(_ bytes: UnsafeRawBufferPointer) {
            buffer = ManagedBuffer<Int, UInt8>.create(minimumCapacity: bytes.count) { _ in bytes.count }
            buffer.withUnsafeMutablePointerToElements { elements in
                if let base = bytes.baseAddress { elements.initialize(from: base.assumingMemoryBound(to: UInt8.self), count: bytes.count) }
            }
        }

        @inlinable var count: Int { buffer.header }

        /// Calls `body` with the bytes, without copying.
        @inlinable
        func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
            try buffer.withUnsafeMutablePointers { count, elements in try body(UnsafeRawBufferPointer(start: elements, count: count.pointee)) }
        }
    }

    /// The empty name (never a valid id; used where a record stores "none").
    public static let empty = Name(UnsafeRawBufferPointer(start: nil, count: 0))

    /// A name of the given bytes. Any length; ``isValid`` says whether it may be an id.
    @inlinable
    public init(_ bytes: UnsafeRawBufferPointer) {
        let count = bytes.count
        if count <= Self.inlineBytesMax {
            var words: (UInt64, UInt64, UInt64) = (0, 0, 0)
            if let base = bytes.baseAddress {
                withUnsafeMutableBytes(of: &words) { $0.baseAddress!.copyMemory(from: base, byteCount: count) }
            }
            word0 = UInt64(littleEndian: words.0)
            word1 = UInt64(littleEndian: words.1)
            word2 = UInt64(littleEndian: words.2) | UInt64(count) << 56
            long = nil
        } else {
            word0 = 0
            word1 = 0
            word2 = UInt64(min(count, 255)) << 56
            long = LongBytes(bytes)
        }
    }

    /// A name of the given bytes.
    @inlinable
    public init<C: Collection>(bytes: C) where C.Element == UInt8 {
        if let done = bytes.withContiguousStorageIfAvailable({ Name(UnsafeRawBufferPointer($0)) }) {
            self = done
        } else {
            let array = Array(bytes)
            self = array.withUnsafeBytes { Name($0) }
        }
    }

    /// The UTF-8 bytes of `text` (for tests, tools and literals; clients' ids arrive as bytes).
    @inlinable
    public init(_ text: String) {
        var text = text
        self = text.withUTF8 { Name(UnsafeRawBufferPointer($0)) }
    }

    /// Length in bytes.
    @inlinable public var count: Int { Int(word2 >> 56) }
    @inlinable public var isEmpty: Bool { count == 0 }

    /// 1 to ``Limits/nameBytesMax`` bytes: what an id may be.
    @inlinable public var isValid: Bool { count >= 1 && count <= Limits.nameBytesMax && (long == nil || long!.count <= Limits.nameBytesMax) }

    /// Calls `body` with the bytes, without copying.
    @inlinable
    public func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if let long { return try long.withBytes(body) }
        return try withUnsafeBytes(of: (word0.littleEndian, word1.littleEndian, word2.littleEndian)) {
            try body(UnsafeRawBufferPointer(rebasing: $0[0..<count]))
        }
    }

    /// The bytes, copied.
    public var bytes: [UInt8] { withBytes { Array($0) } }

    @inlinable
    public static func == (a: Name, b: Name) -> Bool {
        if a.long == nil && b.long == nil { return a.word0 == b.word0 && a.word1 == b.word1 && a.word2 == b.word2 }
        guard a.count == b.count, let x = a.long, let y = b.long else { return false }
        return x.buffer === y.buffer || x.withBytes { a in y.withBytes { b in a.elementsEqual(b) } }
    }

    /// Byte order (shorter first on a common prefix), as Redis orders keys.
    public static func < (a: Name, b: Name) -> Bool {
        a.withBytes { x in b.withBytes { y in x.lexicographicallyPrecedes(y) } }
    }

    /// The bytes themselves go into the (randomly seeded) hasher, so keys that hold a name (request
    /// ids) hash as well as `Hasher` does. Feeding it a fixed-seed ``fastHash(seed:)`` instead let a
    /// client compute, offline, any number of request ids with one hash.
    public func hash(into hasher: inout Hasher) {
        if let long {
            hasher.combine(word2)
            long.withBytes { hasher.combine(bytes: $0) }
        } else {
            hasher.combine(word0)
            hasher.combine(word1)
            hasher.combine(word2)
        }
    }

    /// `Dictionary` and `Set` pass a seed that is the table's address (see the standard library's
    /// `_HashTable.hashSeed`), which is not secret; the process seed makes it so.
    public func _rawHashValue(seed: Int) -> Int {
        Int(truncatingIfNeeded: fastHash(seed: Self.processSeed ^ UInt64(bitPattern: Int64(seed))))
    }

    /// Drawn at random once per process, for ``_rawHashValue(seed:)``.
    static let processSeed = UInt64.random(in: .min ... .max)

    /// A fast 64-bit hash of the bytes, for tables that draw `seed` at random (``NameIndex``), so
    /// that collisions cannot be chosen in advance; ``Engine/shardIndex(of:shardCount:)`` uses
    /// FNV-1a instead, which is stable. Names over ``inlineBytesMax`` bytes fold each 8-byte word in
    /// with a 64x64->128-bit multiply of data and state, each side mixed with the seed (as wyhash
    /// does), so how a change in one word spreads depends on the seed: the multiply-xorshift used
    /// before let a flipped top bit in one word be cancelled by the next word, whatever the seed
    /// (seed-independent collisions). Not a cryptographic hash: it keeps chosen collisions out of
    /// reach for clients who never see the seed.
    @inlinable
    public func fastHash(seed: UInt64) -> UInt64 {
        if long == nil {
            // Inline: the three words are the bytes, zero-padded, with the length in the top byte of
            // the last; folded in as a long name's words are (a word of data is free in all 64 bits,
            // so a multiply-xorshift would let one word cancel a flipped top bit of the one before).
            let key = seed ^ 0xA076_1D64_78BD_642F
            var h = Self.foldedMultiply(word0 ^ key, seed ^ 0xE703_7ED1_A0B4_28DB)
            h = Self.foldedMultiply(word1 ^ key, h ^ 0xE703_7ED1_A0B4_28DB)
            h = Self.foldedMultiply(word2 ^ key, h ^ 0x8EBC_6AF0_9C88_C6E3)
            return Self.foldedMultiply(h, 0x5899_65CC_7537_4CC3 ^ seed)
        }
        return withBytes { bytes in
            let key = seed ^ 0xA076_1D64_78BD_642F
            var h = seed ^ (UInt64(bytes.count) &* 0x9E37_79B9_7F4A_7C15)
            var i = 0
            while i + 8 <= bytes.count {
                h = Self.foldedMultiply(bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self) ^ key, h ^ 0xE703_7ED1_A0B4_28DB)
                i += 8
            }
            var tail: UInt64 = 0
            var shift: UInt64 = 0
            while i < bytes.count {
                tail |= UInt64(bytes[i]) << shift
                shift += 8
                i += 1
            }
            h = Self.foldedMultiply(tail ^ key, h ^ 0x8EBC_6AF0_9C88_C6E3)
            return Self.foldedMultiply(h, 0x5899_65CC_7537_4CC3 ^ seed)
        }
    }

    /// The high and low halves of the 128-bit product, xored.
    @inlinable @inline(__always)
    static func foldedMultiply(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (high, low) = a.multipliedFullWidth(by: b)
        return high ^ low
    }

    /// The bytes as text for people: printable UTF-8 as is; control characters and bytes that are
    /// not valid UTF-8 as `\xHH`, so the text never breaks a line (logs, error replies, `inspect`).
    /// Only for display; never compare or look up by it.
    public var description: String {
        withBytes { bytes in
            let printable = !bytes.contains { $0 < 0x20 || $0 == 0x7F || $0 == UInt8(ascii: "\\") }
            if printable, let text = String(validating: bytes, as: UTF8.self) { return text }
            var out = ""
            for byte in bytes {
                if byte >= 0x20 && byte < 0x7F && byte != UInt8(ascii: "\\") {
                    out.unicodeScalars.append(Unicode.Scalar(byte))
                } else {
                    out += "\\x" + (byte < 16 ? "0" : "") + String(byte, radix: 16)
                }
            }
            return out
        }
    }
}

extension Name: ExpressibleByStringLiteral {
    public init(stringLiteral value: String) { self.init(value) }
}
