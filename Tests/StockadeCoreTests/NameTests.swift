import Testing
@testable import StockadeCore

/// Ids are byte strings: equal only when their bytes are (#7 B8). On the code before `Name`, the NFD SKU's
/// counter answered for the NFC one (a wrong SOLDOUT), two request ids shared one order, and the name
/// index crashed on duplicate keys.
@Suite struct NameTests {
    let nfc: Name = "caf\u{E9}"
    let nfd: Name = "cafe\u{301}"

    @Test func canonicallyEquivalentIdsAreDistinct() {
        #expect(nfc != nfd)
        #expect("caf\u{E9}" == "cafe\u{301}" as String)  // what String would have said
        #expect(nfc.bytes == [0x63, 0x61, 0x66, 0xC3, 0xA9])
        #expect(Set([nfc, nfd]).count == 2)
    }

    @Test func bytesRoundTripInlineAndLong() {
        for length in [0, 1, 7, 8, 14, 15, 16, 17, 22, 23, 24, 25, 63, 64, 65] {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 0x80) }
            let name = Name(bytes: bytes)
            #expect(name.bytes == bytes)
            #expect(name.count == length)
            #expect(name == Name(bytes: bytes))
            #expect(name.hashValue == Name(bytes: bytes).hashValue)
            #expect(name.isValid == (length >= 1 && length <= Limits.nameBytesMax))
            if length > 0 { #expect(name != Name(bytes: bytes.dropLast() + [bytes.last! ^ 1])) }
        }
        // A zero byte at the end is part of the id: "a" and "a\0" differ.
        #expect(Name(bytes: [0x61]) != Name(bytes: [0x61, 0]))
    }

    @Test func invalidUTF8IsKeptAndPrintedEscaped() {
        let name = Name(bytes: [0xFF, 0x0D, 0x0A, 0x41])
        #expect(name.bytes == [0xFF, 0x0D, 0x0A, 0x41])
        #expect(name.description == "\\xff\\x0d\\x0aA")
        #expect(!name.description.contains("\r"))
    }

    @Test func engineKeepsEquivalentIdsApart() async {
        let engine = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog())
        #expect(await engine.execute(.addSku(sku: nfc, total: 40, limit: 0), now: 0) == .done)
        #expect(await engine.execute(.addSku(sku: nfd, total: 0, limit: 0), now: 0) == .done)
        #expect(engine.available(nfc) == 40)
        #expect(engine.available(nfd) == 0)
        for _ in 0..<40 {
            guard case .reserved = await engine.execute(
                .reserve(user: "u", lines: [OrderLine(sku: nfc, quantity: 1)], requestId: nil, ttlMillis: nil), now: 0)
            else { Issue.record("reserve on the NFC SKU refused"); return }
        }
        // Request ids and users equal as Unicode but not as bytes are different requests and users.
        await engine.execute(.restock(sku: nfc, delta: 2), now: 0)
        let first = await engine.execute(
            .reserve(user: nfc, lines: [OrderLine(sku: nfc, quantity: 1)], requestId: nfc, ttlMillis: nil), now: 0)
        let second = await engine.execute(
            .reserve(user: nfc, lines: [OrderLine(sku: nfc, quantity: 1)], requestId: nfd, ttlMillis: nil), now: 0)
        guard case .reserved(let a, _, false) = first, case .reserved(let b, _, false) = second else {
            Issue.record("expected two new orders, got \(first) and \(second)")
            return
        }
        #expect(a != b)
        let state = await engine.captureState(lsn: 0)
        // The snapshot image keeps both apart too.
        let image = state.encodeImage()
        let decoded = try? image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(decoded?.stateHash() == state.stateHash())
    }

    /// The long-name hash before this one mixed words as `h = (h ^ w) * odd; h ^= h >> 31`: flipping
    /// a word's top bit changes the state by a fixed mask (bits 63 and 32) whatever the seed, and the
    /// next word can flip it back. These two 17-byte ids collided under every seed (long names then;
    /// inline now, whose hash folds its words in the same way), and so did the 40-byte ones below.
    @Test func namesHaveNoSeedIndependentCollisions() {
        var a = Array("user:000012345678".utf8)
        var b = a
        b[7] ^= 0x80  // top bit of the first word
        b[15] ^= 0x80  // bits 63 and 32 of the second word cancel the difference
        b[12] ^= 0x01
        #expect(Name(bytes: a) != Name(bytes: b))
        var rng = SplitMix64(seed: 7)
        for _ in 0..<8 {
            let seed = rng.next()
            #expect(Name(bytes: a).fastHash(seed: seed) != Name(bytes: b).fastHash(seed: seed))
        }
        // The same trick on any other prefix.
        a = Array(repeating: 0x41, count: 40)
        b = a
        b[23] ^= 0x80
        b[31] ^= 0x80
        b[28] ^= 0x01
        #expect(Name(bytes: a).fastHash(seed: 1) != Name(bytes: b).fastHash(seed: 1))
    }

    /// Request ids reached a `Dictionary` through `hash(into:)` (inside the shard's request key). It fed
    /// the hasher `fastHash(seed: 0)`, which anyone can compute: for inline names the first word
    /// goes through a fixed mix and is then xored with the second, so ids whose second word undoes
    /// the difference of their first all had one hash. Built here the same way, from that formula.
    @Test func requestKeysDoNotCollideByConstruction() {
        func firstStep(_ w0: UInt64) -> UInt64 {
            var h = w0 &* 0xBF58_476D_1CE4_E5B9
            h ^= h >> 31
            return h
        }
        func name(_ w0: UInt64, _ w1: UInt64) -> Name {
            Name(bytes: withUnsafeBytes(of: (w0.littleEndian, w1.littleEndian)) { Array($0[0..<15]) })
        }
        let length: UInt64 = 15 << 56
        let w0 = UInt64(0x3030_3030_3030_3030)
        let target = firstStep(w0) ^ (length | 0x0012_3456_789A_BCDE)  // what h ^ w1 must equal
        var colliding = [name(w0, length | 0x0012_3456_789A_BCDE)]
        var candidate = w0
        while colliding.count < 4 {
            candidate &+= 1
            let w1 = target ^ firstStep(candidate)
            guard w1 >> 56 == 15 else { continue }  // the top byte is the length
            colliding.append(name(candidate, w1))
        }
        #expect(Set(colliding).count == 4)
        let index = RequestIndex()
        let keys = colliding.map { index.hash(userHash: Name("u").fastHash(seed: 1), requestId: $0) }
        #expect(Set(keys).count == 4)
        #expect(Set(colliding.map(\.hashValue)).count == 4)
    }
}
