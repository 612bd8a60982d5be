import Testing
@testable import StockadeCore

/// The items of multi-SKU orders (baskets) live in one chunked array per shard, each basket's slot
/// pointing at its run of items; images list them apart. These tests check the store against a model
/// across chunk boundaries, through an image and back, and that an image whose basket items do not
/// hold together is refused rather than loaded (a local item naming a SKU past the shard's end was
/// loaded, and the order's CANCEL then stopped the server).
@Suite struct BasketStoreTests {
    /// Baskets of one to three SKUs, local and across two shards, enough to fill more than one chunk of
    /// items: each order's lines read back as placed, before and after an image round trip, and
    /// cancelling every other one returns exactly its units.
    @Test func basketsReadBackAcrossChunksAndImages() throws {
        var state = EngineState(shardCount: 2)
        var log = RecordBuffer()
        let local: [Name] = ["a", "b", "c"], remote: [Name] = ["x", "y"]
        for sku in local { _ = state.shards[0].addSku(sku, total: 1_000_000, limit: 0, log: &log) }
        for sku in remote { _ = state.shards[1].addSku(sku, total: 1_000_000, limit: 0, log: &log) }
        var placed: [(OrderID, [OrderLine])] = []
        let baskets = ChunkedArray<ShardState.MultiItem>.chunkSize / 2 + 1_000
        for n in 0..<baskets {
            let user = Name("u\(n % 977)")
            let quantity = Int64(n % 5 + 1)
            var lines = [OrderLine(sku: local[n % 3], quantity: quantity)]
            if n % 2 == 0 { lines.append(OrderLine(sku: local[(n + 1) % 3], quantity: 1)) }
            var remoteLines: [OrderLine] = []
            if n % 3 != 0 { remoteLines.append(OrderLine(sku: remote[n % 2], quantity: 2)) }
            if lines.count + remoteLines.count == 1 { lines.append(OrderLine(sku: local[(n + 2) % 3], quantity: 3)) }
            var interned = false
            guard case .success(let here) = state.shards[0].prepareHold(user: user, lines: lines, internedUser: &interned)
            else { Issue.record("refused"); return }
            var items = here
            if !remoteLines.isEmpty {
                guard case .success(let there) = state.shards[1].prepareHold(user: user, lines: remoteLines, internedUser: &interned)
                else { Issue.record("refused"); return }
                items += there
            }
            let all = lines + remoteLines
            let id = state.shards[0].commitOrder(
                user: user, requestId: nil, items: items, skus: all.map(\.sku), deadlineMillis: 1_000_000, log: &log)
            placed.append((id, all))
        }
        #expect(state.shards[0].multiItems.count > ChunkedArray<ShardState.MultiItem>.chunkSize)
        let image = state.encodeImage()
        var loaded = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(loaded.stateHash() == state.stateHash())
        for (id, lines) in placed {
            #expect(state.shards[0].orderLines(id.sequence) == lines)
            #expect(loaded.shards[0].orderLines(id.sequence) == lines)
        }
        func available(_ sku: Name) -> Int64 { loaded.shards.lazy.compactMap { $0.stock(sku) }.first!.available }
        for (id, lines) in placed.enumerated().filter({ $0.offset % 2 == 0 }).map(\.element) {
            let before = lines.map { available($0.sku) }
            let (reply, effects) = loaded.shards[0].cancel(id, now: 0, log: &log)
            guard case .orderState(_, .cancelled) = reply else { Issue.record("cancel of \(id): \(reply)"); return }
            for effect in effects { loaded.shards[effect.shard].apply(effect) }
            for (line, was) in zip(lines, before) {
                #expect(available(line.sku) == was + line.quantity)
            }
        }
        #expect(loaded.shards.allSatisfy { $0.audit(nil)?.allSatisfy(\.ok) == true })
    }

    /// A basket's items that do not hold together: the image is corrupt and refused. Before the items
    /// were checked, all of these loaded (a basket without items, or listed twice, or an item of
    /// quantity 0, or one naming a SKU past its shard's end, which stopped the server at the order's CANCEL).
    /// An item whose SKU id is not the one its shard lists loaded too (ORDER showed the stored id).
    @Test(arguments: ["local SKU", "remote SKU", "no units", "no items", "no entry", "twice", "renamed SKU", "SKU twice"])
    func imageWithBadBasketItemsIsRefused(damage: String) throws {
        var state = EngineState(shardCount: 2)
        var log = RecordBuffer()
        _ = state.shards[0].addSku("s", total: 10, limit: 0, log: &log)
        _ = state.shards[1].addSku("t", total: 10, limit: 0, log: &log)
        var interned = false
        guard case .success(let here) = state.shards[0].prepareHold(user: "u", lines: [OrderLine(sku: "s", quantity: 1)], internedUser: &interned),
              case .success(let there) = state.shards[1].prepareHold(user: "u", lines: [OrderLine(sku: "t", quantity: 1)], internedUser: &interned)
        else { Issue.record("refused"); return }
        _ = state.shards[0].commitOrder(user: "u", requestId: nil, items: here + there, skus: ["s", "t"], deadlineMillis: 1_000, log: &log)
        var image = state.encodeImage()
        #expect((try? image.withUnsafeBytes { try EngineState.decodeImage($0) }) != nil)
        // The basket section of shard 0: count 1, sequence 1, two items (shard u16, SKU index u32,
        // quantity u32, id), after the order's state (pending) and multi-SKU bytes.
        let item0: [UInt8] = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1] + Array("s".utf8)
        let item1: [UInt8] = [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1] + Array("t".utf8)
        let entry: [UInt8] = [1, 0, 0, 0, 2, 0] + item0 + item1
        let section: [UInt8] = [1, 1, 1, 0, 0, 0] + entry
        let found = try #require((0..<image.count - section.count).first { Array(image[$0..<$0 + section.count]) == section })
        let at = found + 2
        let items = at + 4 + 6
        switch damage {
        case "local SKU": image[items + 2] = 5
        case "remote SKU": image[items + item0.count + 2] = 5
        case "no units": image[items + 6] = 0
        case "renamed SKU": image[items + item0.count - 1] = UInt8(ascii: "z")
        case "SKU twice": image.replaceSubrange(items + item0.count..<items + item0.count + item1.count, with: item0)
        case "no items":
            image[at + 4 + 4] = 0
            image.removeSubrange(items..<items + item0.count + item1.count)
        case "no entry":
            image[at] = 0
            image.removeSubrange(at + 4..<at + 4 + entry.count)
        default:
            image[at] = 2
            image.insert(contentsOf: entry, at: at + 4 + entry.count)
        }
        #expect(throws: EngineState.ImageError.self) { try image.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }

    /// A logged order that no reservation could have made (checksums valid: a damaged or hand-made
    /// log, or a primary's stream) is refused by replay and changes nothing. Before, a basket of 65
    /// items and a single item of 2^31 units stopped the process at start-up (a precondition of the
    /// order's slot), and the same SKU twice in one basket held past its available stock.
    @Test(arguments: ["65 items", "huge quantity", "same SKU twice"])
    func replayRefusesOrdersNoReservationMakes(damage: String) throws {
        var state = EngineState(shardCount: 1)
        for index in 0..<66 {
            try state.apply(.skuAdded(shard: 0, skuIndex: UInt32(index), sku: Name("k\(index)"), total: 1 << 40, limit: 0))
        }
        try state.apply(.skuAdded(shard: 0, skuIndex: 66, sku: "few", total: 3, limit: 0))
        let items: [Record.Item]
        switch damage {
        case "65 items": items = (0..<65).map { Record.Item(shard: 0, skuIndex: UInt32($0), quantity: 1) }
        case "huge quantity": items = [Record.Item(shard: 0, skuIndex: 0, quantity: 1 << 31)]
        default: items = [Record.Item(shard: 0, skuIndex: 66, quantity: 2), Record.Item(shard: 0, skuIndex: 66, quantity: 2)]
        }
        let before = state.stateHash()
        let created = Record.OrderCreated(
            id: OrderID(shard: 0, tag: 0, sequence: 1), deadlineMillis: 1_000, user: "u", requestId: "", items: items)
        #expect(throws: EngineState.ReplayError.self) { try state.apply(.orderCreated(created)) }
        #expect(state.stateHash() == before && state.shards[0].orderCount == 0)
    }

    /// A single-SKU order of 0 units (a cancelled one, so that the reserved units still agree) loaded.
    @Test func imageWithAnOrderOfNoUnitsIsRefused() throws {
        var state = EngineState(shardCount: 1)
        var log = RecordBuffer()
        _ = state.shards[0].addSku("s", total: 10, limit: 0, log: &log)
        guard case .reserved(let id, _, _) = state.shards[0].reserve(
            user: "u", lines: [OrderLine(sku: "s", quantity: 1)], requestId: nil, ttlMillis: 1_000, now: 0, log: &log)
        else { Issue.record("refused"); return }
        _ = state.shards[0].cancel(id, now: 0, log: &log)
        var image = state.encodeImage()
        #expect((try? image.withUnsafeBytes { try EngineState.decodeImage($0) }) != nil)
        // The order after its deadline: user 0, SKU 0, quantity 1, no previous order, cancelled, single.
        let order: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0]
        let at = try #require((0..<image.count - order.count).first { Array(image[$0..<$0 + order.count]) == order })
        image[at + 8] = 0
        #expect(throws: EngineState.ImageError.self) { try image.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }
}
