import Testing
@testable import StockadeCore

/// ``ChunkedArray``, ``ExpiryHeap``, ``RequestIndex`` and ``HeldUnits`` against plain models, across chunk
/// boundaries and partition growth.
@Suite struct ChunkedTablesTests {
    @Test(arguments: [1, 2, 3])
    func chunkedArrayMatchesAnArray(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var array = ChunkedArray<UInt32>()
        var model: [UInt32] = []
        let size = ChunkedArray<UInt32>.chunkSize
        // Walks up past two chunk boundaries and hovers around them: runs of appends and removals.
        for _ in 0..<400 {
            let run = Int(rng.next() % 2_000)
            let grow = model.count < size / 2 || (model.count < 3 * size && rng.next() % 3 != 0)
            for _ in 0..<run {
                if grow || model.isEmpty {
                    let value = UInt32(truncatingIfNeeded: rng.next())
                    array.append(value)
                    model.append(value)
                } else {
                    array.removeLast()
                    model.removeLast()
                }
            }
            #expect(array.count == model.count)
            if let i = model.indices.randomElement(using: &rng) { #expect(array[i] == model[i]) }
        }
        #expect(Array(array) == model)
        while !model.isEmpty { array.removeLast(); model.removeLast() }
        #expect(array.isEmpty)
        array.append(7)
        #expect(Array(array) == [7])
    }

    /// Pushes and pops hovering around the heap's first chunk boundary: after every run the heap
    /// property holds over all entries and the entries are the live orders; at the end everything
    /// pops in deadline order.
    @Test(arguments: [4, 5])
    func expiryHeapKeepsItsOrderAcrossChunks(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var orders = ChunkedArray<ShardState.OrderSlot>()
        var heap = ExpiryHeap()
        var live = Set<UInt32>()
        func push() {
            orders.append(
                ShardState.OrderSlot(
                    deadlineMillis: Int64(rng.next() % 1_000_000), userIndex: 0, skuIndex: 0, quantity: 1,
                    previousOfUser: 0, state: .pending, isMulti: false))
            heap.push(UInt32(orders.count), orders)
            live.insert(UInt32(orders.count))
        }
        func key(_ sequence: UInt32) -> (Int64, UInt32) { (orders[Int(sequence) - 1].deadlineMillis, sequence) }
        for _ in 0..<(ChunkedArray<UInt32>.chunkSize - 50) { push() }
        for _ in 0..<120 {
            for _ in 0..<(rng.next() % 100) { push() }
            for _ in 0..<(rng.next() % 100) {
                guard let top = heap.top else { break }
                heap.pop(orders)
                #expect(live.remove(top) != nil)
            }
            let entries = heap.entries
            #expect(entries.count == live.count && Set(entries) == live)
            #expect(entries.indices.dropFirst().allSatisfy { !(key(entries[$0]) < key(entries[($0 - 1) / 2])) })
        }
        var last: (Int64, UInt32)? = nil
        while let top = heap.top {
            if let last { #expect(!(key(top) < last)) }
            last = key(top)
            heap.pop(orders)
            #expect(live.remove(top) != nil)
        }
        #expect(live.isEmpty && heap.count == 0)
    }

    /// A user's hash as a shard's user index would give it: any seeded hash of the user.
    static func userHash(_ user: UInt32) -> UInt64 { Name("user:\(user)").fastHash(seed: 0x5EED) }

    /// Many users share each request id (the random names repeat), as clients that number their
    /// requests do.
    @Test(arguments: [6, 7])
    func requestIndexMatchesADictionary(seed: UInt64) {
        struct Key: Hashable {
            var user: UInt32
            var requestId: Name
        }
        var rng = SplitMix64(seed: seed)
        var index = RequestIndex()
        var model: [Key: UInt32] = [:]
        for step in 0..<200_000 {
            let user = UInt32(rng.next() % 5_000)
            let requestId = NameIndexTests.randomName(&rng)
            let key = Key(user: user, requestId: requestId)
            let hash = index.hash(userHash: Self.userHash(user), requestId: requestId)
            #expect(index[user: user, requestId: requestId, hash: hash] == model[key])
            if rng.next() % 3 != 0 {
                let sequence = UInt32(step + 1)
                index.set(sequence, user: user, requestId: requestId, hash: hash)
                model[key] = sequence
            }
        }
        #expect(index.count == model.count)
        for (key, sequence) in model {
            let hash = index.hash(userHash: Self.userHash(key.user), requestId: key.requestId)
            #expect(index[user: key.user, requestId: key.requestId, hash: hash] == sequence)
        }
        #expect(index.entries.allSatisfy { model[Key(user: $0.user, requestId: $0.requestId)] == $0.sequence })
    }

    /// Pairs added, grown and emptied at random (removal shifts runs back), past several doublings of
    /// every partition, then all emptied.
    @Test(arguments: [8, 9])
    func heldUnitsMatchADictionary(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var table = HeldUnits()
        var model: [UInt64: UInt32] = [:]
        for step in 0..<120_000 {
            // Few SKUs, many users: pairs that share their low bits, as a shard's do.
            let pair = (rng.next() % 30_000) << 32 | rng.next() % 3
            #expect(table[pair] == model[pair] ?? 0, "step \(step)")
            if rng.next() % 3 != 0 {
                let units = UInt32(1 + rng.next() % 4)
                table.add(units, to: pair)
                model[pair, default: 0] += units
            } else {
                let left = UInt32(rng.next() % 2) * (model[pair] ?? 0) / 2
                table.set(left, for: pair)
                model[pair] = left > 0 ? left : nil
            }
            #expect(table.count == model.count)
        }
        #expect(Dictionary(uniqueKeysWithValues: table.pairs.map { ($0.pair, $0.units) }) == model)
        for pair in model.keys { table.set(0, for: pair) }
        #expect(table.count == 0 && table.pairs.isEmpty)
        for pair in model.keys { #expect(table[pair] == 0) }
    }
}
