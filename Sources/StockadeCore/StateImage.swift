/// The byte image of an ``EngineState`` that snapshots store (before compression), and the state hash
/// that tests compare. Layout in docs/FORMAT.md.
extension EngineState {
    /// Image layout version; bump on any change and keep reading the old ones. Version 2 adds the
    /// epoch history after the last shard; version 1 images read as a history without terms.
    /// Version 3 adds each shard's tag runs (``ShardState/tagRuns``) after the history; older
    /// images read as orders that all carry tag 0, which is what builds before tags issued.
    public static let imageVersion: UInt32 = 3

    /// Encodes every shard. Calls `flush` whenever at least `chunkBytes` are buffered, so a large
    /// state is written out in bounded pieces.
    public func encodeImage(chunkBytes: Int = 4 << 20, flush: ([UInt8]) throws -> Void) rethrows {
        var out: [UInt8] = []
        out.reserveCapacity(chunkBytes + 4096)
        func spill() throws {
            if out.count >= chunkBytes {
                try flush(out)
                out.removeAll(keepingCapacity: true)
            }
        }
        out.appendLE(Self.imageVersion)
        out.appendLE(lsn)
        out.appendLE(UInt32(shards.count))
        for state in shards {
            out.appendLE(UInt16(state.shard))
            out.appendLE(UInt32(state.skus.count))
            for s in state.skus {
                out.appendName(s.name)
                out.appendLE(s.total); out.appendLE(s.available); out.appendLE(s.reserved); out.appendLE(s.sold)
                out.appendLE(s.limit); out.append(s.paused ? 1 : 0)
            }
            try spill()
            out.appendLE(UInt32(state.users.count))
            for (i, user) in state.users.enumerated() {
                out.appendName(user)
                if i & 4095 == 0 { try spill() }
            }
            out.appendLE(UInt32(state.orders.count))
            for (i, o) in state.orders.enumerated() {
                // A multi-SKU order's two fields locate its items in memory; the image lists the items
                // apart and stores 0 there.
                out.appendLE(o.deadlineMillis); out.appendLE(o.userIndex); out.appendLE(o.isMulti ? 0 : o.skuIndex)
                out.appendLE(o.isMulti ? 0 : o.quantity); out.appendLE(o.previousOfUser); out.append(o.state.rawValue)
                out.append(o.isMulti ? 1 : 0)
                if i & 4095 == 0 { try spill() }
            }
            out.appendLE(UInt32(state.orders.reduce(0) { $0 + ($1.isMulti ? 1 : 0) }))
            for (index, o) in state.orders.enumerated() where o.isMulti {
                out.appendLE(UInt32(index + 1))
                out.appendLE(UInt16(o.multiItemRange.count))
                for position in o.multiItemRange {
                    let m = state.multiItems[position]
                    out.appendLE(UInt16(m.item.shard)); out.appendLE(m.item.skuIndex); out.appendLE(m.item.quantity)
                    out.appendName(m.sku)
                }
                try spill()
            }
            let requests = state.requests.entries.filter { $0.sequence != 0 }.sorted { ($0.sequence, $0.user) < ($1.sequence, $1.user) }
            out.appendLE(UInt32(requests.count))
            for (i, entry) in requests.enumerated() {
                out.appendLE(entry.user); out.appendLE(entry.sequence); out.appendName(entry.requestId)
                if i & 4095 == 0 { try spill() }
            }
            let held = state.heldByUserSku.pairs.sorted { $0.pair < $1.pair }
            out.appendLE(UInt32(held.count))
            for (i, (key, units)) in held.enumerated() {
                out.appendLE(key); out.appendLE(units)
                if i & 4095 == 0 { try spill() }
            }
        }
        out.append(epochs.isTruncated ? 1 : 0)
        out.appendLE(UInt32(epochs.terms.count))
        for term in epochs.terms { out.appendLE(term.epoch); out.appendLE(term.start) }
        for state in shards {
            out.appendLE(UInt32(state.tagRuns.count))
            for run in state.tagRuns { out.appendLE(run.firstSequence); out.appendLE(run.tag) }
            try spill()
        }
        if !out.isEmpty { try flush(out) }
    }

    /// The image as one array (tests and small states).
    public func encodeImage() -> [UInt8] {
        var all: [UInt8] = []
        encodeImage { all += $0 }
        return all
    }

    /// Why an image could not be read.
    public struct ImageError: Error, CustomStringConvertible, Sendable {
        public var reason: String
        public var description: String { reason }
    }

    /// Rebuilds a state from its image, checking every index it stores.
    public static func decodeImage(_ bytes: UnsafeRawBufferPointer) throws(ImageError) -> EngineState {
        var r = ByteReader(bytes)
        do {
            let version: UInt32 = try r.read()
            guard version >= 1 && version <= imageVersion else {
                throw ImageError(reason: "image version \(version), this build reads 1 to \(imageVersion)")
            }
            let lsn: UInt64 = try r.read()
            let shardCount = Int(try r.read() as UInt32)
            guard shardCount >= 1, shardCount <= Limits.shardCountMax else { throw ImageError(reason: "shard count \(shardCount)") }
            var shards: [ShardState] = []
            for expected in 0..<shardCount {
                let shard = Int(try r.read() as UInt16)
                guard shard == expected else { throw ImageError(reason: "shard \(shard) where \(expected) was expected") }
                var state = ShardState(shard: shard)
                let skuCount = Int(try r.read() as UInt32)
                try need(skuCount, r, each: 42)
                state.skus.reserveCapacity(skuCount)
                for _ in 0..<skuCount {
                    let name = try r.readName()
                    let total: Int64 = try r.read(), available: Int64 = try r.read()
                    let reserved: Int64 = try r.read(), sold: Int64 = try r.read()
                    let limit: Int64 = try r.read()
                    let paused = (try r.read() as UInt8) != 0
                    // Each count bounded first (a SKU's total is at most Limits.stockMax), so that the sum
                    // cannot overflow and later arithmetic (a restock) cannot either.
                    let bounded = 0...Limits.stockMax
                    guard bounded.contains(total), bounded.contains(available), bounded.contains(reserved),
                        bounded.contains(sold), available + reserved + sold == total, state.skuIndexByName[name] == nil
                    else { throw ImageError(reason: "SKU \(name) does not add up") }
                    guard limit >= 0, limit <= Limits.quantityMax else {
                        throw ImageError(reason: "SKU \(name) has limit \(limit), outside 0...\(Limits.quantityMax)")
                    }
                    state.skus.append(
                        ShardState.Sku(
                            name: name, total: total, available: available, reserved: reserved, sold: sold, limit: limit,
                            paused: paused, counter: StockCounter(available)))
                    state.skuIndexByName.append(name)
                }
                let userCount = Int(try r.read() as UInt32)
                try need(userCount, r, each: 2)
                state.userIndexByName.reserveCapacity(userCount)
                for _ in 0..<userCount {
                    let user = try r.readName()
                    guard state.userIndexByName[user] == nil else { throw ImageError(reason: "user \(user) listed twice") }
                    state.userIndexByName.append(user)
                }
                state.lastOrderOfUser.reserveCapacity(userCount)
                for _ in 0..<userCount { state.lastOrderOfUser.append(0) }
                let orderCount = Int(try r.read() as UInt32)
                try need(orderCount, r, each: 26)
                state.orders.reserveCapacity(orderCount)
                for index in 0..<orderCount {
                    let deadline: Int64 = try r.read()
                    let userIndex: UInt32 = try r.read(), skuIndex: UInt32 = try r.read(), quantity: UInt32 = try r.read()
                    let previous: UInt32 = try r.read()
                    let stateByte: UInt8 = try r.read()
                    let isMulti = (try r.read() as UInt8) != 0
                    // A basket's SKU and quantity fields are 0 in the image (its items are listed apart).
                    guard let orderState = OrderState(rawValue: stateByte), Int(userIndex) < userCount,
                        isMulti || (Int(skuIndex) < skuCount && quantity >= 1 && Int64(quantity) <= Limits.quantityMax),
                        Int(previous) <= index, quantity < 1 << 30
                    else { throw ImageError(reason: "order \(index + 1) of shard \(shard) is malformed") }
                    let seq = UInt32(index + 1)
                    state.orders.append(
                        ShardState.OrderSlot(
                            deadlineMillis: deadline, userIndex: userIndex, skuIndex: skuIndex, quantity: quantity,
                            previousOfUser: previous, state: orderState, isMulti: isMulti))
                    state.lastOrderOfUser[Int(userIndex)] = seq
                    if orderState == .pending { state.expiry.push(seq, state.orders) }
                }
                let multiCount = Int(try r.read() as UInt32)
                try need(multiCount, r, each: 6)
                var previousSeq: UInt32 = 0
                for _ in 0..<multiCount {
                    let seq: UInt32 = try r.read()
                    let itemCount = Int(try r.read() as UInt16)
                    // Written in ascending order, each multi-SKU order once with 1 to 64 items: a count
                    // below that of the multi-SKU orders leaves one without items.
                    guard seq > previousSeq, Int(seq) <= orderCount, state.orders[Int(seq) - 1].isMulti else {
                        throw ImageError(reason: "multi-SKU items for order \(seq) that is not multi-SKU, or out of order")
                    }
                    guard itemCount >= 1, itemCount <= Limits.itemsPerOrderMax else {
                        throw ImageError(reason: "multi-SKU order \(seq) has \(itemCount) items")
                    }
                    guard state.multiItems.count <= Int(UInt32.max) - itemCount else {
                        throw ImageError(reason: "more multi-SKU items than a shard can address")
                    }
                    previousSeq = seq
                    let start = state.multiItems.count
                    state.orders[Int(seq) - 1].setMultiItems(start: start, count: itemCount)
                    var foreign = false
                    for _ in 0..<itemCount {
                        let itemShard = Int(try r.read() as UInt16)
                        let item = Record.Item(shard: itemShard, skuIndex: try r.read(), quantity: try r.read())
                        // Other shards' SKU indexes are checked once every shard is read.
                        guard itemShard < shardCount, itemShard != shard || Int(item.skuIndex) < skuCount,
                            item.quantity >= 1, Int64(item.quantity) <= Limits.quantityMax
                        else { throw ImageError(reason: "multi-SKU order \(seq) has a malformed item") }
                        foreign = foreign || itemShard != shard
                        guard !state.multiItems[start...].contains(where: { $0.item.shard == itemShard && $0.item.skuIndex == item.skuIndex })
                        else { throw ImageError(reason: "multi-SKU order \(seq) names a SKU twice") }
                        state.multiItems.append(ShardState.MultiItem(item: item, sku: try r.readName()))
                    }
                    if state.orders[Int(seq) - 1].state == .pending, foreign {
                        state.foreignExpiry.push(seq, state.orders)
                    }
                }
                guard multiCount == state.orders.reduce(0, { $0 + ($1.isMulti ? 1 : 0) }) else {
                    throw ImageError(reason: "a multi-SKU order of shard \(shard) has no items")
                }
                let requestCount = Int(try r.read() as UInt32)
                try need(requestCount, r, each: 9)
                for _ in 0..<requestCount {
                    let user: UInt32 = try r.read(), seq: UInt32 = try r.read()
                    let requestId = try r.readName()
                    guard Int(user) < userCount, seq >= 1, Int(seq) <= orderCount else {
                        throw ImageError(reason: "request id \(requestId) names a missing order")
                    }
                    state.requests.set(seq, user: user, requestId: requestId, hash: state.requestHash(requestId, userIndex: user))
                }
                let heldCount = Int(try r.read() as UInt32)
                try need(heldCount, r, each: 12)
                var previousKey: UInt64? = nil
                for _ in 0..<heldCount {
                    let key: UInt64 = try r.read(), units: UInt32 = try r.read()
                    // Written in ascending order, each pair once; held units are counted only for SKUs with
                    // a limit and never exceed it (a reservation past it is refused).
                    guard key >> 32 < UInt64(userCount), key & 0xFFFF_FFFF < UInt64(skuCount),
                          previousKey.map({ $0 < key }) ?? true
                    else { throw ImageError(reason: "held units of a missing user or SKU, or out of order") }
                    let limit = state.skus[Int(key & 0xFFFF_FFFF)].limit
                    guard units > 0, Int64(units) <= limit else {
                        throw ImageError(reason: "held units \(units) of a SKU whose limit is \(limit)")
                    }
                    state.heldByUserSku.add(units, to: key)
                    previousKey = key
                }
                shards.append(state)
            }
            for state in shards {
                for m in state.multiItems {
                    guard Int(m.item.skuIndex) < shards[m.item.shard].skus.count else {
                        throw ImageError(reason: "a multi-SKU order of shard \(state.shard) names SKU \(m.item.skuIndex) of shard \(m.item.shard), which has \(shards[m.item.shard].skus.count)")
                    }
                    guard shards[m.item.shard].skus[Int(m.item.skuIndex)].name == m.sku else {
                        throw ImageError(reason: "a multi-SKU order of shard \(state.shard) names SKU \(m.sku) where shard \(m.item.shard) lists \(shards[m.item.shard].skus[Int(m.item.skuIndex)].name)")
                    }
                }
            }
            try checkHolds(shards)
            var epochs = EpochHistory()
            if version >= 2 {
                let truncated: UInt8 = try r.read()
                let termCount = Int(try r.read() as UInt32)
                guard truncated <= 1, termCount <= EpochHistory.termsMax else { throw ImageError(reason: "epoch history of \(termCount) terms") }
                var terms: [EpochHistory.Term] = []
                for _ in 0..<termCount { terms.append(EpochHistory.Term(epoch: try r.read(), start: try r.read())) }
                guard let history = EpochHistory(terms: terms, isTruncated: truncated == 1), history.last.map({ $0.start <= lsn }) ?? true else {
                    throw ImageError(reason: "epoch history out of order or past position \(lsn)")
                }
                epochs = history
            }
            let idTag = OrderID.tag(ofEpoch: epochs.lastEpoch)
            for shard in shards.indices {
                shards[shard].idTag = idTag
                guard version >= 3 else { continue }
                let runCount = Int(try r.read() as UInt32)
                try need(runCount, r, each: 8)
                var runs: [ShardState.TagRun] = []
                for _ in 0..<runCount {
                    let run = ShardState.TagRun(firstSequence: try r.read(), tag: try r.read())
                    // Runs start at orders that exist, in order, and each changes the tag.
                    guard run.firstSequence >= 1, Int(run.firstSequence) <= shards[shard].orders.count,
                        run.firstSequence > (runs.last?.firstSequence ?? 0), run.tag <= OrderID.tagMax,
                        run.tag != (runs.last?.tag ?? 0)
                    else { throw ImageError(reason: "tag runs of shard \(shard) are malformed") }
                    runs.append(run)
                }
                shards[shard].tagRuns = runs
            }
            guard r.isAtEnd else { throw ImageError(reason: "\(r.remaining) stray bytes after the tag runs") }
            return EngineState(shards: shards, lsn: lsn, epochs: epochs)
        } catch let error as ImageError {
            throw error
        } catch {
            throw ImageError(reason: "image is truncated: \(error)")
        }
    }

    /// Checks that every SKU's reserved units are those of the pending orders holding it (baskets'
    /// items included, whichever shard owns the basket), and that the held units of each (user, SKU
    /// with a limit) are that user's pending and paid units there, pair for pair. That is what replay
    /// leaves, and an image is always written from a replayed state (a snapshot runs recovery off to the
    /// side; holds of a basket still being placed are never in it). Counts that disagree would let a
    /// later CANCEL or expiry drive a count below zero, or a limit admit more than it allows.
    static func checkHolds(_ shards: [ShardState]) throws(ImageError) {
        var reserved = shards.map { [Int64](repeating: 0, count: $0.skus.count) }
        var held = shards.map { _ in HeldUnits() }
        func hold(_ shard: Int, _ sku: UInt32, user: UInt32?, units: UInt32, pending: Bool) throws(ImageError) {
            if pending { reserved[shard][Int(sku)] += Int64(units) }
            guard shards[shard].skus[Int(sku)].limit > 0 else { return }
            guard let user else { throw ImageError(reason: "an order holds SKU \(sku) of shard \(shard) for a user that shard does not list") }
            let key = ShardState.key(user, sku)
            guard Int64(held[shard][key]) + Int64(units) <= Int64(UInt32.max) else {
                throw ImageError(reason: "orders hold more of SKU \(sku) of shard \(shard) for one user than a limit allows")
            }
            held[shard].add(units, to: key)
        }
        for state in shards {
            for order in state.orders where order.state == .pending || order.state == .paid {
                let pending = order.state == .pending
                guard order.isMulti else {
                    try hold(state.shard, order.skuIndex, user: order.userIndex, units: order.quantity, pending: pending)
                    continue
                }
                let user = state.users[Int(order.userIndex)]
                for position in order.multiItemRange {
                    let item = state.multiItems[position].item
                    let holder = item.shard == state.shard ? order.userIndex : shards[item.shard].userIndexByName[user]
                    try hold(item.shard, item.skuIndex, user: holder, units: item.quantity, pending: pending)
                }
            }
        }
        for state in shards {
            for (index, sku) in state.skus.enumerated() where sku.reserved != reserved[state.shard][index] {
                throw ImageError(reason: "SKU \(sku.name) has \(sku.reserved) units reserved, its pending orders hold \(reserved[state.shard][index])")
            }
            let listed = state.heldByUserSku.pairs.sorted { $0.pair < $1.pair }
            let counted = held[state.shard].pairs.sorted { $0.pair < $1.pair }
            guard listed.elementsEqual(counted, by: { $0.pair == $1.pair && $0.units == $1.units }) else {
                throw ImageError(reason: "the held units of shard \(state.shard) are not those of its users' pending and paid orders")
            }
        }
    }

    /// Refuses a count whose entries cannot fit in the bytes left, before reserving memory for it.
    private static func need(_ count: Int, _ r: ByteReader, each: Int) throws(ImageError) {
        guard count <= r.remaining / each else { throw ImageError(reason: "count \(count) larger than the image") }
    }

    /// A hash of the state as clients can observe it: SKUs, orders (with user and SKU ids, not the
    /// internal indexes), per-user held units and request ids. Two states with equal hashes answer
    /// every query alike, whatever order users were first seen in.
    public func stateHash() -> UInt64 {
        var h = FNV64()
        h.add(UInt32(shards.count))
        for state in shards {
            h.add(UInt32(state.skus.count))
            for s in state.skus {
                h.add(s.name); h.add(s.total); h.add(s.available); h.add(s.reserved); h.add(s.sold); h.add(s.limit)
                h.add(UInt8(s.paused ? 1 : 0))
            }
            h.add(UInt32(state.orders.count))
            for seq in 0..<state.orders.count {
                let info = state.orderInfo(UInt32(seq + 1))
                h.add(info.id.rawValue); h.add(info.user); h.add(info.state.rawValue); h.add(info.deadlineMillis)
                for line in info.lines { h.add(line.sku); h.add(line.quantity) }
            }
            let held = state.heldByUserSku.pairs.map { (state.users[Int($0.pair >> 32)], state.skus[Int($0.pair & 0xFFFF_FFFF)].name, $0.units) }
                .sorted { ($0.0, $0.1) < ($1.0, $1.1) }
            h.add(UInt32(held.count))
            for (user, sku, units) in held { h.add(user); h.add(sku); h.add(Int64(units)) }
            let requests = state.requests.entries.filter { $0.sequence != 0 }.map { (state.users[Int($0.user)], $0.requestId, $0.sequence) }
                .sorted { ($0.0, $0.1) < ($1.0, $1.1) }
            h.add(UInt32(requests.count))
            for (user, requestId, seq) in requests { h.add(user); h.add(requestId); h.add(seq) }
        }
        // Only when there are terms: a log without any hashes as it did before epochs existed.
        if !epochs.terms.isEmpty {
            h.add(UInt32(epochs.terms.count))
            for term in epochs.terms { h.add(term.epoch); h.add(term.start) }
        }
        return h.value
    }
}

/// FNV-1a, 64-bit: stable across processes and builds (Swift's `Hasher` is seeded per process).
package struct FNV64 {
    package private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    package init() {}

    /// Adds bytes as they are, without a length.
    package mutating func add(bytes: [UInt8]) {
        for b in bytes { byte(b) }
    }

    mutating func add<T: FixedWidthInteger>(_ x: T) {
        withUnsafeBytes(of: x.littleEndian) { for b in $0 { byte(b) } }
    }

    mutating func add(_ s: Name) {
        s.withBytes { bytes in
            add(UInt8(truncatingIfNeeded: bytes.count))
            for b in bytes { byte(b) }
        }
    }

    @inline(__always) private mutating func byte(_ b: UInt8) {
        value = (value ^ UInt64(b)) &* 0x100_0000_01b3
    }
}
