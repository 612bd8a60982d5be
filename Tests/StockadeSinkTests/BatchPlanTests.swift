import Testing
@testable import StockadeSink

/// The tables as a reference model: what applying the events one at a time leaves, and (for
/// plans) what the statements of ``SinkSQL`` do, row guards included.
private struct Tables: Equatable {
    struct Sku: Equatable {
        var total: Int64, available: Int64, reserved: Int64, sold: Int64, limit: Int64, paused: Bool
        var addedPosition: UInt64 = 0, changedPosition: UInt64 = 0
    }
    struct Order: Equatable {
        var user: ID, deadlineMillis: Int64, items: [SinkEvent.Item], state: OrderState
        var createdPosition: UInt64 = 0, changedPosition: UInt64 = 0
    }
    var skus: [ID: Sku] = [:]
    var orders: [UInt64: Order] = [:]
    var events: [UInt64: String] = [:]
    var position: UInt64 = 0

    /// One event, straight from its meaning in docs/PROTOCOL.md.
    mutating func apply(_ event: SinkEvent) {
        precondition(event.position == position + 1)
        let p = event.position
        position = p
        events[p] = event.type
        switch event.change {
        case let .skuAdded(sku, total, limit):
            skus[sku] = Sku(total: total, available: total, reserved: 0, sold: 0, limit: limit, paused: false, addedPosition: p, changedPosition: p)
        case let .restocked(sku, delta):
            skus[sku]!.total += delta; skus[sku]!.available += delta; skus[sku]!.changedPosition = p
        case let .pausedChanged(sku, paused):
            skus[sku]!.paused = paused; skus[sku]!.changedPosition = p
        case let .deducted(sku, quantity):
            skus[sku]!.available -= quantity; skus[sku]!.sold += quantity; skus[sku]!.changedPosition = p
        case let .created(order, user, deadline, items):
            orders[order] = Order(user: user, deadlineMillis: deadline, items: items, state: .pending, createdPosition: p, changedPosition: p)
            for item in items {
                skus[item.sku]!.available -= item.quantity; skus[item.sku]!.reserved += item.quantity; skus[item.sku]!.changedPosition = p
            }
        case .paid(let order): end(order, .paid, at: p)
        case .cancelled(let order): end(order, .cancelled, at: p)
        case .expired(let order): end(order, .expired, at: p)
        case .epoch: break
        }
    }

    private mutating func end(_ order: UInt64, _ state: OrderState, at position: UInt64) {
        precondition(orders[order]!.state == .pending)
        orders[order]!.state = state
        orders[order]!.changedPosition = position
        for item in orders[order]!.items {
            skus[item.sku]!.reserved -= item.quantity
            if state == .paid { skus[item.sku]!.sold += item.quantity } else { skus[item.sku]!.available += item.quantity }
            skus[item.sku]!.changedPosition = max(skus[item.sku]!.changedPosition, position)
        }
    }

    /// A plan, applied as its statements do (SinkSQL), in their order: the position only if it is
    /// the one expected; SKUs inserted unless present (then added by the same event); SKU changes
    /// only after a row's changed position as it was before the statement; orders and items
    /// inserted unless present; transitions only of PENDING orders changed before them; events once.
    mutating func apply(_ plan: BatchPlan) {
        precondition(plan.previousPosition == position, "the position statement would roll this batch back")
        position = plan.lastPosition
        for row in plan.newSkus {
            if let existing = skus[row.sku] {
                precondition(existing.addedPosition == row.addedPosition, "the insert's count check would roll this batch back")
                continue
            }
            skus[row.sku] = Sku(total: row.total, available: row.total, reserved: 0, sold: 0, limit: row.limit, paused: false,
                                addedPosition: row.addedPosition, changedPosition: row.addedPosition)
        }
        let before = skus
        var paused: [ID: (UInt64, Bool)] = [:]
        for change in plan.skuChanges {
            let guardPosition = before[change.sku]!.changedPosition
            guard change.position > guardPosition else { continue }
            var sku = skus[change.sku]!
            sku.total += change.total; sku.available += change.available; sku.reserved += change.reserved; sku.sold += change.sold
            sku.changedPosition = max(sku.changedPosition, change.position)
            if let p = change.paused, change.position >= (paused[change.sku]?.0 ?? 0) { paused[change.sku] = (change.position, p) }
            skus[change.sku] = sku
        }
        for (sku, (_, value)) in paused { skus[sku]!.paused = value }
        for row in plan.newOrders {
            if let existing = orders[row.id] {
                precondition(existing.createdPosition == row.createdPosition, "the insert's count check would roll this batch back")
                continue
            }
            orders[row.id] = Order(user: row.user, deadlineMillis: row.deadlineMillis, items: row.items, state: .pending,
                                   createdPosition: row.createdPosition, changedPosition: row.createdPosition)
        }
        for transition in plan.transitions {
            let order = orders[transition.order]!
            if order.state == .pending && order.changedPosition < transition.position {
                end(transition.order, transition.state, at: transition.position)
            } else {
                precondition(order.state == transition.state && order.changedPosition == transition.position,
                             "the count check would roll this batch back")
            }
        }
        for event in plan.events where events[event.position] == nil { events[event.position] = event.type }
        for sku in skus.values { precondition(sku.available + sku.reserved + sku.sold == sku.total, "the CHECK constraint") }
    }

    /// The stored position moved back by hand, as the TRIMMED recovery has operators write it.
    mutating func movePositionBack(to stored: UInt64) { position = stored }
}

/// A seeded generator of valid event streams (what a server could log).
private struct Generator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func stream(count: Int) -> [SinkEvent] {
        var model = Tables()
        var events: [SinkEvent] = []
        var nextOrder: UInt64 = 1 << 56
        let names: [ID] = ["tv", "radio", "caf\u{E9}", "cafe\u{301}", ID([0xFF, 0x00, 0x41])]
        while events.count < count {
            let position = UInt64(events.count + 1)
            let known = names.filter { model.skus[$0] != nil }
            let pending = model.orders.filter { $0.value.state == .pending }.keys.sorted()
            let change: SinkEvent.Change
            switch Int.random(in: 0..<11, using: &self) {
            case 10:
                // A promotion: a new term, nothing in the tables changes.
                change = .epoch(UInt64(position))
            case 0 where known.count < names.count:
                change = .skuAdded(sku: names.first { model.skus[$0] == nil }!, total: Int64.random(in: 5...50, using: &self), limit: 0)
            case 1 where !known.isEmpty:
                let sku = known.randomElement(using: &self)!
                change = .restocked(sku: sku, delta: Int64.random(in: -model.skus[sku]!.available...10, using: &self))
            case 2 where !known.isEmpty:
                change = .pausedChanged(sku: known.randomElement(using: &self)!, paused: Bool.random(using: &self))
            case 3 where !known.isEmpty:
                let sku = known.randomElement(using: &self)!
                guard model.skus[sku]!.available > 0 else { continue }
                change = .deducted(sku: sku, quantity: Int64.random(in: 1...model.skus[sku]!.available, using: &self))
            case 4...6 where !known.isEmpty:
                let basket = known.shuffled(using: &self).prefix(Int.random(in: 1...min(3, known.count), using: &self))
                let items = basket.filter { model.skus[$0]!.available > 0 }.map {
                    SinkEvent.Item(sku: $0, quantity: Int64.random(in: 1...model.skus[$0]!.available, using: &self))
                }
                guard !items.isEmpty else { continue }
                nextOrder += 1
                change = .created(order: nextOrder, user: ID([UInt8.random(in: 0...255, using: &self)]), deadlineMillis: Int64(position) * 1000, items: items)
            case 7...9 where !pending.isEmpty:
                let order = pending.randomElement(using: &self)!
                change = [.paid(order: order), .cancelled(order: order), .expired(order: order)].randomElement(using: &self)!
            default:
                continue
            }
            let event = SinkEvent(position: position, change: change)
            model.apply(event)
            events.append(event)
        }
        return events
    }
}

@Suite struct BatchPlanTests {
    /// Any split of a stream into batches, each folded into a plan and applied as the statements
    /// do, leaves the tables that applying the events one at a time leaves.
    @Test(arguments: 0..<40)
    func batchesOfAnySizeEqualOneEventAtATime(seed: UInt64) throws {
        var rng = Generator(state: seed)
        let events = rng.stream(count: 300)
        var expected = Tables()
        for event in events { expected.apply(event) }
        var batched = Tables()
        var at = 0
        while at < events.count {
            let size = Int.random(in: 1...60, using: &rng)
            let batch = Array(events[at..<min(at + size, events.count)])
            let plan = try #require(try BatchPlan.fold(batch, after: batched.position, keepEvents: true))
            #expect(plan.eventCount == batch.count)
            batched.apply(plan)
            at += size
        }
        #expect(batched == expected)
    }

    /// The stored position moved back by hand (to 0, to the middle of a batch, to a batch's edge)
    /// and the events after it applied again, in batches cut anywhere: every row already holds
    /// its events, so nothing changes, not even the events table.
    @Test(arguments: 0..<30)
    func replayAfterThePositionMovedBackChangesNothing(seed: UInt64) throws {
        var rng = Generator(state: seed &+ 1000)
        let events = rng.stream(count: 200)
        var expected = Tables()
        for event in events { expected.apply(event) }
        var tables = Tables()
        func applyAll(from start: Int, _ rng: inout Generator) throws {
            var at = start
            while at < events.count {
                let size = Int.random(in: 1...50, using: &rng)
                let plan = try #require(try BatchPlan.fold(Array(events[at..<min(at + size, events.count)]), after: tables.position, keepEvents: true))
                tables.apply(plan)
                at += size
            }
        }
        try applyAll(from: 0, &rng)
        #expect(tables == expected)
        for back in [0, Int.random(in: 1..<200, using: &rng), 199] {
            tables.movePositionBack(to: UInt64(back))
            try applyAll(from: back, &rng)
            #expect(tables == expected, "moved back to \(back)")
        }
    }

    /// Amounts that would carry a counter past 64 bits or below zero (a broken or hostile server)
    /// stop the sink with a message; they used to trap the process in the fold, or be stored.
    @Test func countersPast64BitsOrBelowZeroAreAnErrorNotATrap() {
        let item = { (q: Int64) in [SinkEvent.Item(sku: "tv", quantity: q)] }
        let streams: [[SinkEvent.Change]] = [
            [.skuAdded(sku: "tv", total: Int64.max - 1, limit: 0), .restocked(sku: "tv", delta: 5)],
            [.skuAdded(sku: "tv", total: 0, limit: 0), .restocked(sku: "tv", delta: Int64.min), .restocked(sku: "tv", delta: -1)],
            [.skuAdded(sku: "tv", total: 0, limit: 0), .created(order: 1, user: "u", deadlineMillis: 1, items: item(Int64.max)),
             .created(order: 2, user: "u", deadlineMillis: 1, items: item(Int64.max))],
            [.skuAdded(sku: "tv", total: Int64.max, limit: 0), .deducted(sku: "tv", quantity: Int64.max), .deducted(sku: "tv", quantity: Int64.max),
             .deducted(sku: "tv", quantity: Int64.max)],
            [.skuAdded(sku: "tv", total: 0, limit: 0), .created(order: 1, user: "u", deadlineMillis: 1, items: item(Int64.max)),
             .paid(order: 1), .created(order: 2, user: "u", deadlineMillis: 1, items: item(2)), .paid(order: 2)],
            [.skuAdded(sku: "tv", total: 0, limit: 0), .deducted(sku: "tv", quantity: Int64.min)],
            [.skuAdded(sku: "tv", total: 10, limit: 0), .restocked(sku: "tv", delta: -11)],
            [.skuAdded(sku: "tv", total: 1, limit: 0), .created(order: 1, user: "u", deadlineMillis: 1, items: item(2))],
        ]
        for changes in streams {
            let events = changes.enumerated().map { SinkEvent(position: UInt64($0.offset + 1), change: $0.element) }
            do {
                _ = try BatchPlan.fold(events, after: 0, keepEvents: true)
                Issue.record("folded \(changes)")
            } catch {
                #expect(error.code == .badEvent && !error.isRetryable)
                #expect(error.message.contains("64 bits") || error.message.contains("below zero"), "\(error.message)")
            }
        }
        // The events table's basket total of a huge basket wraps instead of trapping.
        let huge = SinkEvent(position: 1, change: .created(order: 1, user: "u", deadlineMillis: 1,
                                                           items: [.init(sku: "a", quantity: Int64.max), .init(sku: "b", quantity: Int64.max)]))
        var plan = BatchPlan(previousPosition: 0, lastPosition: 1, lastFingerprint: huge.fingerprint)
        plan.events = [huge]
        #expect(SinkSQL.statements(for: plan).count == 2)
    }

    /// The fingerprint stored with the position names the event: any field that differs changes it.
    @Test func fingerprintsTellEventsApart() {
        let base = SinkEvent(position: 7, change: .created(order: 9, user: "u", deadlineMillis: 100, items: [.init(sku: "tv", quantity: 2)]))
        let others: [SinkEvent] = [
            SinkEvent(position: 8, change: base.change),
            SinkEvent(position: 7, change: .created(order: 10, user: "u", deadlineMillis: 100, items: [.init(sku: "tv", quantity: 2)])),
            SinkEvent(position: 7, change: .created(order: 9, user: "v", deadlineMillis: 100, items: [.init(sku: "tv", quantity: 2)])),
            SinkEvent(position: 7, change: .created(order: 9, user: "u", deadlineMillis: 101, items: [.init(sku: "tv", quantity: 2)])),
            SinkEvent(position: 7, change: .created(order: 9, user: "u", deadlineMillis: 100, items: [.init(sku: "tv", quantity: 3)])),
            SinkEvent(position: 7, change: .created(order: 9, user: "u", deadlineMillis: 100, items: [.init(sku: "tw", quantity: 2)])),
            SinkEvent(position: 7, change: .paid(order: 9)),
            SinkEvent(position: 7, change: .cancelled(order: 9)),
        ]
        #expect(base.fingerprint == SinkEvent(position: 7, change: base.change).fingerprint)
        #expect(Set(others.map(\.fingerprint) + [base.fingerprint]).count == others.count + 1)
        // Length prefixes: ids that split differently do not collide.
        #expect(SinkEvent(position: 1, change: .skuAdded(sku: "ab", total: 1, limit: 0)).fingerprint
            != SinkEvent(position: 1, change: .skuAdded(sku: "a", total: 1, limit: 0)).fingerprint)
    }

    /// A page seen again after a crash (the sink committed it, then died before asking for more):
    /// its events are at or before the stored position and change nothing.
    @Test func replayingAppliedEventsChangesNothing() throws {
        var rng = Generator(state: 99)
        let events = rng.stream(count: 50)
        #expect(try BatchPlan.fold(events, after: 50) == nil)
        #expect(try BatchPlan.fold(Array(events[0..<10]), after: 30) == nil)
        // A page that overlaps the stored position: only the new part is applied.
        let plan = try #require(try BatchPlan.fold(Array(events[20..<40]), after: 30))
        #expect(plan.previousPosition == 30 && plan.lastPosition == 40 && plan.eventCount == 10)
    }

    /// A plan carries the server's term at its last position: the term before the batch, or the
    /// last `epoch` event's (one in the part already applied counts too: it is the term after it).
    @Test func aPlanKnowsTheTermOfItsLastPosition() throws {
        let sku = SinkEvent(position: 1, change: .skuAdded(sku: "tv", total: 5, limit: 0))
        let epoch = SinkEvent(position: 2, change: .epoch(77))
        let paused = SinkEvent(position: 3, change: .pausedChanged(sku: "tv", paused: true))
        let before = LogTerm(epoch: 5, start: 1)
        #expect(try BatchPlan.fold([sku], after: 0, termBefore: .noEpoch)?.lastTerm == LogTerm.noEpoch)
        #expect(try BatchPlan.fold([sku], after: 0)?.lastTerm == nil)
        #expect(try BatchPlan.fold([paused], after: 2, termBefore: before)?.lastTerm == before)
        for (events, stored) in [([sku, epoch, paused], UInt64(0)), ([sku, epoch, paused], 2), ([epoch, paused], 1), ([epoch], 1)] {
            for termBefore in [nil, before] {
                #expect(try BatchPlan.fold(events, after: stored, termBefore: termBefore)?.lastTerm == LogTerm(epoch: 77, start: 2))
            }
        }
    }

    @Test func aGapStopsTheSink() {
        var rng = Generator(state: 5)
        let events = rng.stream(count: 20)
        for (stored, batch) in [(UInt64(3), Array(events[5..<10])), (0, Array(events[0..<3]) + Array(events[4..<8]))] {
            do {
                _ = try BatchPlan.fold(batch, after: stored)
                Issue.record("a gap was folded")
            } catch {
                #expect(error.code == .gap)
            }
        }
    }

    /// An order that ends twice in one batch is not in any log a server writes: refused, not applied twice.
    @Test func anOrderEndingTwiceIsRefused() {
        let events = [
            SinkEvent(position: 1, change: .skuAdded(sku: "tv", total: 5, limit: 0)),
            SinkEvent(position: 2, change: .created(order: 9, user: "u", deadlineMillis: 1, items: [.init(sku: "tv", quantity: 1)])),
            SinkEvent(position: 3, change: .paid(order: 9)),
            SinkEvent(position: 4, change: .cancelled(order: 9)),
        ]
        #expect(throws: SinkError.self) { try BatchPlan.fold(events, after: 0) }
        #expect(throws: SinkError.self) { try BatchPlan.fold(Array(events[2...]), after: 2) }
    }

    /// However many events a batch has, it is the same few statements (arrays bound to unnest),
    /// the position first; every array of one statement has one element per row.
    @Test func aBatchIsAFixedNumberOfStatements() throws {
        var rng = Generator(state: 11)
        let events = rng.stream(count: 2000)
        let first = try #require(try BatchPlan.fold(Array(events[0..<1000]), after: 0, keepEvents: true))
        var model = Tables()
        model.apply(first)
        let plan = try #require(try BatchPlan.fold(Array(events[1000...]), after: 1000, termBefore: LogTerm(epoch: 1, start: 1), keepEvents: true))
        var term = LogTerm(epoch: 1, start: 1)
        for event in events[1000...] { if case .epoch(let epoch) = event.change { term = LogTerm(epoch: epoch, start: event.position) } }
        for replay in [false, true] {
        let statements = SinkSQL.statements(for: plan, replay: replay)
        #expect(statements.count <= 8)
        #expect(statements.contains { $0.sql.contains("ON CONFLICT") } == replay)
        #expect(statements[0].sql.contains("stockade_sink_position"))
        #expect(statements[0].binds == [.int64(1000), .int64(2000), .int64(events[1999].fingerprint),
                                        .optionalInt64(Int64(term.epoch)), .optionalInt64(Int64(term.start))] && statements[0].expectedCount == 1)
        #expect(statements[0].mismatch?.code == .concurrentSink)
        for statement in statements {
            let lengths = statement.binds.compactMap { value -> Int? in
                switch value {
                case .int64, .optionalInt64: nil
                case .int64s(let v): v.count
                case .texts(let v): v.count
                case .byteas(let v): v.count
                case .bools(let v): v.count
                }
            }
            #expect(Set(lengths).count <= 1, "\(statement.sql)")
            let placeholders = (1...max(1, statement.binds.count)).filter { statement.sql.contains("$\($0)") }
            #expect(placeholders.count == statement.binds.count, "\(statement.sql)")
        }
        }
        #expect(!plan.transitions.isEmpty && !plan.skuChanges.isEmpty && !plan.newOrders.isEmpty && plan.events.count == 1000)
    }
}
