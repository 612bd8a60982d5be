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
        for (id, lines) in placed.enumerated().filter({ $0.offset % 2 == 0 }).map(\.element) {
            let before = lines.map { loaded.shards[loaded.shards[0].stock($0.sku) != nil ? 0 : 1].stock($0.sku)!.available }
            let (reply, effects) = loaded.shards[0].cancel(id, now: 0, log: &log)
            guard case .orderState(_, .cancelled) = reply else { Issue.record("cancel of \(id): \(reply)"); return }
            for effect in effects { loaded.shards[effect.shard].apply(effect) }
            for (line, was) in zip(lines, before) {
                let owner = loaded.shards[0].stock(line.sku) != nil ? 0 : 1
                #expect(loaded.shards[owner].stock(line.sku)!.available == was + line.quantity)
            }
        }
        #expect(loaded.shards.allSatisfy { $0.audit(nil)?.allSatisfy(\.ok) == true })
    }

    /// A basket's items that do not hold together: the image is corrupt and refused. Before the items
    /// were checked, all of these loaded (a basket without items, or listed twice, or an item of
    /// quantity 0, or one naming a SKU past its shard's end, which stopped the server at the order's CANCEL).
    @Test(arguments: ["local SKU", "remote SKU", "no units", "no items", "no entry", "twice"])
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
}
