import Synchronization

/// The shards and the log together: routes each command to the shard that owns its SKU or order,
/// coordinates orders that span shards, and answers only once the changes are durable.
public final class Engine: Sendable {
    public let shards: [Shard]
    private let log: any ChangeLog

    /// Starts the engine on a recovered (or empty) state.
    public init(state: EngineState, log: any ChangeLog) {
        shards = state.shards.map { Shard(state: $0, log: log) }
        self.log = log
    }

    public var shardCount: Int { shards.count }

    /// The shard that owns a SKU: FNV-1a of its UTF-8 bytes, modulo the shard count. Stable across
    /// processes and builds, so a data directory always maps SKUs the same way.
    public static func shardIndex(of sku: String, shardCount: Int) -> Int {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in sku.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return Int(hash % UInt64(shardCount))
    }

    public func shardIndex(of sku: String) -> Int { Self.shardIndex(of: sku, shardCount: shards.count) }

    /// Available stock of a SKU read from its published counter, without entering the shard.
    public func available(_ sku: String) -> Int64? {
        shards[shardIndex(of: sku)].directory.counter(sku)?.available
    }

    private enum Route {
        case shard(Int)
        /// Needs several shards: runs alone, after everything before it.
        case global
        case immediate(Reply)
    }

    private func route(_ command: Command) -> Route {
        switch command {
        case let .addSku(sku, _, _), let .restock(sku, _), let .setPaused(sku, _), let .stock(sku), let .deduct(sku, _):
            return .shard(shardIndex(of: sku))
        case let .audit(sku):
            return sku.map { .shard(shardIndex(of: $0)) } ?? .global
        case let .reserve(user, lines, requestId, ttlMillis):
            if let rejection = ShardState.validateReserve(
                user: user, lines: lines, requestId: requestId, ttlMillis: ttlMillis ?? Limits.ttlMillisDefault)
            {
                return .immediate(.rejected(rejection))
            }
            let owner = shardIndex(of: lines[0].sku)
            if lines.count == 1 {
                // Sold-out fast path: answered from the published counter, no shard hop. Not for
                // requests with an id, whose retry must find the original order.
                if requestId == nil, let counter = shards[owner].directory.counter(lines[0].sku), counter.available == 0 {
                    return .immediate(.rejected(.soldOut))
                }
                return .shard(owner)
            }
            return lines.allSatisfy({ shardIndex(of: $0.sku) == owner }) ? .shard(owner) : .global
        case let .confirm(id), let .cancel(id), let .order(id):
            guard let shard = id.shard, shard < shards.count else { return .immediate(.rejected(.noSuchOrder)) }
            return .shard(shard)
        case let .orders(user, _, _):
            return isValidName(user) ? .global : .immediate(.rejected(.badArgument("user id must be 1 to \(Limits.nameBytesMax) bytes")))
        }
    }

    /// Executes commands in order and returns their replies in the same order. Commands on one shard
    /// run in one hop; a command that needs several shards runs after all before it. Replies come
    /// back once every change they depend on is durable.
    public func execute(_ commands: [Command], now: Int64) async -> [Reply] {
        var replies = [Reply](repeating: .done, count: commands.count)
        var perShard = [[(slot: Int, command: Command)]](repeating: [], count: shards.count)
        var waitFor: UInt64 = 0
        var position = 0
        while position < commands.count {
            var pending = false
            while position < commands.count {
                let route = route(commands[position])
                if case .global = route { break }
                switch route {
                case .shard(let s):
                    perShard[s].append((position, commands[position]))
                    pending = true
                case .immediate(let reply): replies[position] = reply
                case .global: break
                }
                position += 1
            }
            if pending {
                for s in perShard.indices where !perShard[s].isEmpty {
                    let result = await shards[s].run(perShard[s], now: now)
                    for (slot, reply) in result.replies { replies[slot] = reply }
                    waitFor = max(waitFor, result.lsn)
                    await applyEffects(result.effects)
                    perShard[s].removeAll(keepingCapacity: true)
                }
            }
            if position < commands.count {
                let (reply, lsn) = await executeGlobal(commands[position], now: now)
                replies[position] = reply
                waitFor = max(waitFor, lsn)
                position += 1
            }
        }
        if waitFor > 0 {
            do {
                try await log.waitDurable(waitFor)
            } catch {
                let reason: String
                if case .unavailable(let why) = error { reason = why } else { reason = "\(error)" }
                return replies.map { _ in .rejected(.unavailable(reason)) }
            }
        }
        return replies
    }

    /// One command, for callers that have no batch.
    public func execute(_ command: Command, now: Int64) async -> Reply {
        await execute([command], now: now)[0]
    }

    private func executeGlobal(_ command: Command, now: Int64) async -> (Reply, UInt64) {
        switch command {
        case let .reserve(user, lines, requestId, ttlMillis):
            return await reserveAcrossShards(
                user: user, lines: lines, requestId: requestId, deadlineMillis: now + (ttlMillis ?? Limits.ttlMillisDefault))
        case let .orders(user, after, count):
            // Ids sort by shard, then sequence: the page is the shards' orders in shard order.
            var page: [OrderInfo] = []
            var lsn: UInt64 = 0
            for (index, shard) in shards.enumerated() where page.count < count && index >= (after?.shard ?? 0) {
                let afterSequence = index == after?.shard ? UInt32(clamping: after!.rawValue & (1 << 56 - 1)) : 0
                page += await shard.orders(ofUser: user, afterSequence: afterSequence, count: count - page.count)
                lsn = max(lsn, await shard.lastAppendedPosition)
            }
            return (.orders(page), lsn)
        case .audit:
            var all: [AuditFinding] = []
            for shard in shards { all += await shard.audit() }
            return (.audit(all), 0)
        default:
            preconditionFailure("\(command) is not a multi-shard command")
        }
    }

    /// All-or-nothing across shards: mark the request id on the owner (the first SKU's shard), hold
    /// each shard's lines in shard order, and either record the order on the owner or give every hold
    /// back. Holds are in memory only until the owner's single record makes the order durable.
    private func reserveAcrossShards(
        user: String, lines: [OrderLine], requestId: String?, deadlineMillis: Int64
    ) async -> (Reply, UInt64) {
        guard log.admitsChanges else { return (.rejected(.busy), 0) }
        let owner = shardIndex(of: lines[0].sku)
        if let reply = await shards[owner].beginRequest(user: user, requestId: requestId) {
            return (reply, await shards[owner].lastAppendedPosition)
        }
        var byShard: [Int: [OrderLine]] = [:]
        for line in lines { byShard[shardIndex(of: line.sku), default: []].append(line) }
        var held: [Int: [Record.Item]] = [:]
        for s in byShard.keys.sorted() {
            switch await shards[s].prepareHold(user: user, lines: byShard[s]!) {
            case .success(let items):
                held[s] = items
            case .failure(let rejection):
                for (h, items) in held { await shards[h].releasePrepared(user: user, items: items) }
                await shards[owner].abortRequest(user: user, requestId: requestId)
                return (.rejected(rejection), 0)
            }
        }
        // Items in the client's order, for the record and for display.
        var next: [Int: Int] = [:]
        var items: [Record.Item] = []
        for line in lines {
            let s = shardIndex(of: line.sku)
            items.append(held[s]![next[s, default: 0]])
            next[s, default: 0] += 1
        }
        switch await shards[owner].commitOrder(
            user: user, requestId: requestId, items: items, skus: lines.map(\.sku), deadlineMillis: deadlineMillis)
        {
        case .success(let (id, lsn)): return (.reserved(id, deadlineMillis: deadlineMillis, replayed: false), lsn)
        case .failure(let rejection): return (.rejected(rejection), 0)
        }
    }

    private func applyEffects(_ effects: [ShardState.ForeignEffect]) async {
        guard !effects.isEmpty else { return }
        var byShard: [Int: [ShardState.ForeignEffect]] = [:]
        for effect in effects { byShard[effect.shard, default: []].append(effect) }
        for (s, list) in byShard { await shards[s].apply(list) }
    }

    /// Expires due orders on every shard; a timer calls this so holds on idle SKUs still come back.
    public func expire(now: Int64) async {
        for shard in shards {
            let result = await shard.expire(now: now)
            await applyEffects(result.effects)
        }
    }

    /// Copies every shard's state. A consistent cut only while no commands run (tests, shutdown).
    public func captureState(lsn: UInt64) async -> EngineState {
        var states: [ShardState] = []
        for shard in shards { states.append(await shard.snapshotState()) }
        return EngineState(shards: states, lsn: lsn)
    }
}

/// A ``ChangeLog`` that keeps nothing: positions advance, everything is "durable" at once.
public final class MemoryChangeLog: ChangeLog {
    private let position = Mutex<UInt64>(0)

    public init() {}

    public func append(_ records: RecordBuffer) throws(Rejection) -> UInt64 {
        position.withLock { lsn in
            lsn += UInt64(records.count)
            return lsn
        }
    }

    public func waitDurable(_ lsn: UInt64) async throws(Rejection) {}
    public var admitsChanges: Bool { true }
}
