/// SplitMix64: a small, seeded, reproducible generator for workloads (tests, benchmarks, demos).
package struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    package init(seed: UInt64) { state = seed }
    package mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Random command sequences over a small pool of SKUs, users and request ids, so that collisions
/// (sold out, limits, repeats, cross-shard baskets, bad arguments) happen often.
package struct RandomWorkload: Sendable {
    package var rng: SplitMix64
    /// Includes ids equal as Unicode but not as bytes (NFC and NFD "café"), invalid UTF-8, a 64-byte
    /// id, and ids on both sides of ``Name/inlineBytesMax`` (23 bytes inline, 24 on the heap, the one a
    /// prefix of the other; two of 23 that differ only in their last byte): each must be its own SKU or
    /// user.
    package let skus: [Name] = [
        "apple", "pear", "plum", "fig", "kiwi", "caf\u{E9}", "cafe\u{301}", Name(bytes: [0xFF, 0x00, 0xC3]),
        Name(String(repeating: "k", count: Limits.nameBytesMax)),
        Name(String(repeating: "s", count: Name.inlineBytesMax)),
        Name(bytes: Array(repeating: UInt8(ascii: "s"), count: Name.inlineBytesMax) + [0]),
    ]
    package let users: [Name] = [
        "ann", "bob", "cy", "\u{C5}sa", "A\u{30A}sa", Name(bytes: [0xC0, 0x80]), "user:000000000017",
        Name(String(repeating: "u", count: Name.inlineBytesMax)),
        Name(String(repeating: "u", count: Name.inlineBytesMax - 1) + "v"),
        Name(bytes: Array(repeating: UInt8(ascii: "u"), count: Name.inlineBytesMax) + [0]),
    ]
    /// Order ids handed out so far (confirm and cancel pick from them).
    package var orders: [OrderID] = []

    package init(seed: UInt64) { rng = SplitMix64(seed: seed) }

    package mutating func next() -> Command {
        let sku = skus.randomElement(using: &rng)!
        let user = users.randomElement(using: &rng)!
        switch Int.random(in: 0..<100, using: &rng) {
        case 0..<8: return .addSku(sku: sku, total: Int64.random(in: 0...12, using: &rng), limit: Int64.random(in: 0...3, using: &rng))
        case 8..<12: return .restock(sku: sku, delta: Int64.random(in: -6...8, using: &rng))
        case 12..<15: return .setPaused(sku: sku, paused: Bool.random(using: &rng))
        case 15..<45:
            // Short request ids, and ids of 23 bytes (inline to the last byte).
            let requestId = Bool.random(using: &rng)
                ? Name((Bool.random(using: &rng) ? "q" : "request-000000000000-q") + "\(Int.random(in: 0..<6, using: &rng))")
                : nil
            let quantity = Int.random(in: 0..<20, using: &rng) == 0 ? 0 : Int64.random(in: 1...3, using: &rng)
            return .reserve(user: user, lines: [OrderLine(sku: sku, quantity: quantity)], requestId: requestId,
                            ttlMillis: Int64.random(in: 1...400, using: &rng))
        case 45..<55:
            let count = Int.random(in: 2...3, using: &rng)
            let lines = skus.shuffled(using: &rng).prefix(count).map { OrderLine(sku: $0, quantity: Int64.random(in: 1...2, using: &rng)) }
            let requestId = Bool.random(using: &rng) ? Name("m\(Int.random(in: 0..<4, using: &rng))") : nil
            return .reserve(user: user, lines: Array(lines), requestId: requestId, ttlMillis: Int64.random(in: 1...400, using: &rng))
        case 55..<70: return .confirm(pickOrder())
        case 70..<80: return .cancel(pickOrder())
        case 80..<86: return .deduct(sku: sku, quantity: Int64.random(in: 0...2, using: &rng))
        case 86..<90: return .order(pickOrder())
        case 90..<94: return .stock(sku: sku)
        case 94..<96: return .reserve(user: "", lines: [OrderLine(sku: sku, quantity: 1)], requestId: nil, ttlMillis: 10)
        default:
            // Pages: from the start or after a known order, of 1 to 3 orders or the default. Chosen
            // from what was drawn already (no draw of its own), so seeds keep their sequences.
            // Now and then an AUDIT of every SKU instead, chosen the same way.
            if orders.count % 5 == 4 { return .audit(sku: nil) }
            let after = orders.isEmpty || orders.count % 3 == 0 ? nil : orders[orders.count / 2]
            return .orders(user: user, after: after, count: [1, 2, 3, 100][orders.count % 4])
        }
    }

    private mutating func pickOrder() -> OrderID {
        if orders.isEmpty || Int.random(in: 0..<10, using: &rng) == 0 {
            return OrderID(rawValue: UInt64.random(in: 0...(3 << 56), using: &rng))
        }
        return orders.randomElement(using: &rng)!
    }

    /// Remembers order ids from replies.
    package mutating func observe(_ reply: Reply) {
        if case .reserved(let id, _, false) = reply { orders.append(id) }
    }
}
