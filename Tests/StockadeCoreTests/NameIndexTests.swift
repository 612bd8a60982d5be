import Testing
@testable import StockadeCore

/// ``NameIndex`` against a plain `Dictionary` model.
@Suite struct NameIndexTests {
    /// Random ids of the shapes clients send: short and long, binary, and many that share a long
    /// prefix (only the last bytes differ, so they probe the same partitions' hash bits hardest).
    static func randomName(_ rng: inout SplitMix64) -> Name {
        switch rng.next() % 4 {
        case 0:  // "user:" + 12 digits: 17 bytes, inline
            let digits = String(rng.next() % 1_000_000_000_000)
            return Name("user:" + String(repeating: "0", count: 12 - digits.count) + digits)
        case 1:  // any bytes, any valid length
            let length = 1 + Int(rng.next() % UInt64(Limits.nameBytesMax))
            return Name(bytes: (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
        case 2:  // a 48-byte shared prefix, then one to 16 binary bytes
            let tail = (0..<(1 + rng.next() % 16)).map { _ in UInt8(truncatingIfNeeded: rng.next() % 4) }
            return Name(bytes: Array(repeating: UInt8(ascii: "p"), count: 48) + tail)
        default:  // short: inline, many repeats
            return Name("u\(rng.next() % 5_000)")
        }
    }

    @Test(arguments: [1, 2, 3])
    func matchesDictionaryAcrossGrowthAndRemoval(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var index = NameIndex()
        var model: [Name: UInt32] = [:]
        var order: [Name] = []
        for step in 0..<60_000 {
            let name = Self.randomName(&rng)
            // A hint that must change nothing, on empty partitions (the first steps) as on grown ones.
            index.prefetch(hash: index.hash(name))
            #expect(index[name] == model[name], "step \(step): lookup of \(name)")
            if model[name] == nil {
                if rng.next() % 16 == 0, let last = order.last {
                    // The index only forgets its newest name (a prepared hold that was not placed).
                    index.removeLast()
                    model[last] = nil
                    order.removeLast()
                    #expect(index[last] == nil, "step \(step): \(last) still found after removeLast")
                } else {
                    let assigned = index.append(name)
                    #expect(Int(assigned) == order.count)
                    model[name] = assigned
                    order.append(name)
                }
            }
            #expect(index.count == model.count)
        }
        #expect(Array(index.names) == order)
        for (i, name) in order.enumerated() { #expect(index[name] == UInt32(i)) }
        // Names one byte off every stored name are absent.
        for name in order.prefix(2_000) {
            var bytes = name.bytes
            bytes[bytes.count - 1] ^= 0x40
            let other = Name(bytes: bytes)
            #expect(index[other] == model[other])
            #expect(index[Name(bytes: name.bytes + [0])] == model[Name(bytes: name.bytes + [0])])
        }
    }

    @Test func removeLastUntilEmptyThenRefill() {
        var index = NameIndex()
        let names = (0..<5_000).map { Name("user:\(String(repeating: "x", count: $0 % 20))\($0)") }
        for name in names { index.append(name) }
        for (i, name) in names.enumerated().reversed() {
            #expect(index[name] == UInt32(i))
            index.removeLast()
            #expect(index[name] == nil)
        }
        #expect(index.count == 0)
        for (i, name) in names.enumerated() { #expect(index.append(name) == UInt32(i)) }
        for (i, name) in names.enumerated() { #expect(index[name] == UInt32(i)) }
    }

    @Test func reserveCapacityKeepsEntries() {
        var index = NameIndex()
        for i in 0..<100 { index.append(Name("sku-\(i)")) }
        index.reserveCapacity(100_000)
        for i in 0..<100 { #expect(index[Name("sku-\(i)")] == UInt32(i)) }
        #expect(index[Name("sku-100")] == nil)
    }

    /// A copy (a snapshot's) keeps its own entries while the original changes.
    @Test func copiesAreValues() {
        var index = NameIndex()
        for i in 0..<1_000 { index.append(Name("user-\(i)")) }
        let copy = index
        for i in 1_000..<3_000 { index.append(Name("user-\(i)")) }
        index.removeLast()
        #expect(copy.count == 1_000)
        #expect(copy[Name("user-1500")] == nil)
        #expect(copy[Name("user-999")] == 999)
        #expect(index[Name("user-1500")] == 1_500)
    }

    /// A snapshot image that names one user twice is refused (it used to load, and the first index
    /// lost its name: that user's older orders could no longer be found by user).
    @Test func imageWithADuplicateUserIsRefused() throws {
        var state = EngineState(shardCount: 1)
        var log = RecordBuffer()
        _ = state.shards[0].addSku("s", total: 10, limit: 0, log: &log)
        for user in ["ua", "ub"] {
            _ = state.shards[0].reserve(
                user: Name(user), lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 1_000, now: 0, log: &log)
        }
        var image = state.encodeImage()
        #expect((try? image.withUnsafeBytes { try EngineState.decodeImage($0) }) != nil)
        let ub = Array("ub".utf8)
        let at = try #require((0..<image.count - 1).first { Array(image[$0..<$0 + 2]) == ub })
        image[at + 1] = UInt8(ascii: "a")
        #expect(throws: EngineState.ImageError.self) { try image.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }

    /// Held units of a user or SKU the image does not have, none at all, more than the SKU's limit, a
    /// pair listed twice, or a limit past the largest quantity: a corrupt image, refused, where they
    /// were taken as they stood (and a limit of 10^10 with 2^32 - 16 units held made the next RESERVE
    /// overflow and crash the server).
    /// Counts of a SKU past the largest stock that still add up: the next RESTOCK overflowed.
    @Test(arguments: ["missing user", "missing SKU", "no units", "twice", "over the limit", "huge limit", "huge stock"])
    func imageWithBadHeldUnitsIsRefused(damage: String) throws {
        var state = EngineState(shardCount: 1)
        var log = RecordBuffer()
        _ = state.shards[0].addSku("s", total: 10, limit: 5, log: &log)
        _ = state.shards[0].reserve(
            user: Name("ua"), lines: [OrderLine(sku: "s", quantity: 2)], requestId: nil, ttlMillis: 1_000, now: 0, log: &log)
        var image = state.encodeImage()
        #expect((try? image.withUnsafeBytes { try EngineState.decodeImage($0) }) != nil)
        // The held section: count 1, then the pair (user 0 << 32 | SKU 0) and its 2 units, little-endian.
        let held: [UInt8] = [1, 0, 0, 0] + [UInt8](repeating: 0, count: 8) + [2, 0, 0, 0]
        let at = try #require((0..<image.count - held.count).first { Array(image[$0..<$0 + held.count]) == held })
        switch damage {
        case "missing user": image[at + 4 + 4] = 7
        case "missing SKU": image[at + 4] = 3
        case "no units": image[at + 12] = 0
        case "over the limit": image[at + 12] = 6
        case "huge stock":
            // total (i64 10) and available (i64 8), next to each other: made 2^63 - 9 and 2^63 - 11.
            let counts: [UInt8] = withUnsafeBytes(of: (Int64(10).littleEndian, Int64(8).littleEndian)) { Array($0) }
            let field = try #require((0..<image.count - 16).first { Array(image[$0..<$0 + 16]) == counts })
            withUnsafeBytes(of: (Int64.max - 8).littleEndian) { image.replaceSubrange(field..<field + 8, with: $0) }
            withUnsafeBytes(of: (Int64.max - 10).littleEndian) { image.replaceSubrange(field + 8..<field + 16, with: $0) }
        case "huge limit":
            // The SKU's limit (i64 5 after its id and four counters) made 10^10.
            let limit: [UInt8] = withUnsafeBytes(of: Int64(5).littleEndian) { Array($0) }
            let stocked: [UInt8] = withUnsafeBytes(of: Int64(8).littleEndian) { Array($0) }
            let sku = try #require((0..<image.count - 16).first { Array(image[$0..<$0 + 8]) == stocked })
            let field = try #require((sku..<image.count - 8).first { Array(image[$0..<$0 + 8]) == limit })
            withUnsafeBytes(of: Int64(10_000_000_000).littleEndian) { image.replaceSubrange(field..<field + 8, with: $0) }
        default:
            // Two entries of the same pair: the count says 2 and the pair is repeated in place of what followed.
            image[at] = 2
            image.insert(contentsOf: image[(at + 4)..<(at + 16)], at: at + 16)
        }
        #expect(throws: EngineState.ImageError.self) { try image.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }
}
