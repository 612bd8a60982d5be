import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// Primary terms recorded in the log (``Record/epochStarted(epoch:)``, ``EpochHistory``): logged
/// before a term's changes, replayed, kept in snapshots, carried to replicas, and compared to tell
/// whether one log is a prefix of another.
@Suite struct EpochTests {
    typealias Term = EpochHistory.Term

    /// A history of terms 3 (from 11), 7 (from 40) and 9 (from 90), over a log of 120 records.
    static let history: EpochHistory = {
        var h = EpochHistory()
        h.append(Term(epoch: 3, start: 11))
        h.append(Term(epoch: 7, start: 40))
        h.append(Term(epoch: 9, start: 90))
        return h
    }()

    @Test(arguments: [
        // (replica's last position, its newest term, diverged?)
        (10 as UInt64, nil as Term?, false),  // before any term: a prefix
        (11, nil, true),  // a record of no term where this log began epoch 3
        (39, Term(epoch: 3, start: 11), false),  // the whole of epoch 3
        (40, Term(epoch: 3, start: 11), true),  // epoch 3 past where it ended here (a former primary's writes)
        (60, Term(epoch: 7, start: 40), false),
        (95, Term(epoch: 7, start: 40), true),
        (39, Term(epoch: 3, start: 12), true),  // the same epoch begun elsewhere
        (50, Term(epoch: 5, start: 45), true),  // an epoch this log never had
        (120, Term(epoch: 9, start: 90), false),  // the newest term: any length (the caller refuses a replica ahead)
    ])
    func aReplicasLogIsAPrefixByItsLastTerm(position: UInt64, lastTerm: Term?, diverged: Bool) {
        let (reason, undecided) = Self.history.divergence(ofLogEndingAt: position, lastTerm: lastTerm)
        #expect((reason != nil) == diverged, "\(reason ?? "prefix")")
        #expect(!undecided)
    }

    /// Past ``EpochHistory/termsMax`` the oldest terms go; a replica whose newest term is older than
    /// every kept one is undecided (compared by its last record alone), never called diverged.
    @Test func aBoundedHistorySaysWhenItCannotTell() {
        var h = EpochHistory()
        for i in 1...(EpochHistory.termsMax + 5) { h.append(Term(epoch: UInt64(i) * 2, start: UInt64(i) * 10)) }
        #expect(h.terms.count == EpochHistory.termsMax && h.isTruncated)
        #expect(h.terms.first == Term(epoch: 12, start: 60))
        let old = h.divergence(ofLogEndingAt: 25, lastTerm: Term(epoch: 4, start: 20))
        #expect(old.reason == nil && old.undecided)
        let none = h.divergence(ofLogEndingAt: 5, lastTerm: nil)
        #expect(none.reason == nil && none.undecided)
        // An epoch between kept ones was never this log's, truncated or not.
        #expect(h.divergence(ofLogEndingAt: 65, lastTerm: Term(epoch: 13, start: 62)).reason != nil)
    }

    /// The term in force at a position (LOG.TERM): the newest begun at or before it; none before
    /// the first; undecided before the first kept one once the history dropped terms.
    @Test func theTermInForceAtAPosition() {
        let h = Self.history
        for (position, expected) in [(0 as UInt64, nil as Term?), (10, nil), (11, Term(epoch: 3, start: 11)), (39, Term(epoch: 3, start: 11)),
                                     (40, Term(epoch: 7, start: 40)), (89, Term(epoch: 7, start: 40)), (90, Term(epoch: 9, start: 90)),
                                     (1_000_000, Term(epoch: 9, start: 90))] {
            let (term, undecided) = h.term(at: position)
            #expect(term == expected && !undecided, "\(position)")
        }
        var truncated = EpochHistory()
        for i in 1...(EpochHistory.termsMax + 1) { truncated.append(Term(epoch: UInt64(i), start: UInt64(i) * 10)) }
        #expect(truncated.term(at: 15).undecided && truncated.term(at: 15).term == nil)
        #expect(truncated.term(at: 25) == (Term(epoch: 2, start: 20), false))
    }

    /// A node's own epoch is above what it saw, random in its low part (two nodes promoted from one
    /// history differ), and never past ``EpochHistory/epochMax``; replay refuses an epoch past it.
    @Test func ownEpochsGrowDifferAndStayBounded() throws {
        var rng = SplitMix64(seed: 7)
        let picks = (0..<64).map { _ in EpochHistory.next(after: 41, using: &rng)! }
        #expect(picks.allSatisfy { $0 > 41 && $0 <= 41 + EpochHistory.randomSpan })
        #expect(Set(picks).count == picks.count)
        #expect(EpochHistory.next(after: EpochHistory.epochMax - EpochHistory.randomSpan, using: &rng) == nil)
        #expect(EpochHistory.next(after: EpochHistory.epochMax - EpochHistory.randomSpan - 1, using: &rng)! <= EpochHistory.epochMax)
        var state = EngineState(shardCount: 1)
        #expect(throws: EngineState.ReplayError.self) { try state.apply(.epochStarted(epoch: UInt64.max)) }
        #expect(state.epochs.terms.isEmpty && state.lsn == 0)
    }

    /// Two terms started at once on one engine: one is logged, the other refused (nothing logged).
    @Test func oneTermStartsAtATime() async throws {
        let engine = Engine(state: EngineState(shardCount: 1), log: MemoryChangeLog(), readOnly: true)
        @Sendable func attempt() async -> Bool {
            do { _ = try await engine.startEpoch(5); return true } catch { return false }
        }
        async let first = attempt()
        async let second = attempt()
        let outcomes = await [first, second]
        #expect(outcomes.filter { $0 }.count == 1)
        #expect(engine.epochs.terms.count == 1)
        await #expect(throws: Rejection.self) { try await engine.startEpoch(4) }
    }

    /// Terms started on a store are logged, replayed after a restart, kept in snapshots (also when
    /// the log before them is removed), and refused by replay when they do not grow.
    @Test func epochsSurviveRestartsAndSnapshots() async throws {
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = Store.Options(shardCount: 3)
        options.snapshotsKept = 1
        options.coveredSegmentsKept = 0
        options.journal.segmentBytesMax = 4096
        var now: Int64 = 1_000
        var expected = EpochHistory()
        do {
            let store = try Store(path: path, options: options)
            _ = await store.engine.execute(["apple", "pear", "plum", "fig"].map { .addSku(sku: $0, total: 40, limit: 3) }, now: now)
            _ = await runWorkload(store, seed: 5, count: 400, now: &now)
            for epoch in [4, 11] as [UInt64] {
                store.engine.role.setReadOnly(true)
                let start = try await store.engine.startEpoch(epoch)
                store.engine.role.setReadOnly(false)
                #expect(start == store.journal.lastDurableLSN)
                expected.append(Term(epoch: epoch, start: start))
                _ = await runWorkload(store, seed: epoch, count: 400, now: &now)
            }
            #expect(store.engine.epochs == expected)
            // The snapshot covers both terms and the log before it goes.
            let report = try await store.snapshot()
            #expect(!report.removedSegments.isEmpty)
            let live = await liveState(store)
            store.close()
            let reopened = try Store(path: path, options: options)
            #expect(reopened.engine.epochs == expected)
            #expect(await liveState(reopened).stateHash() == live.stateHash())
            reopened.close()
        }
        // The snapshot alone holds the history.
        let (state, _) = try Recovery.recover(DataDirectory(path), options: .init(shardCount: 3, repair: false))
        #expect(state.epochs == expected)
        var replay = state
        #expect(throws: EngineState.ReplayError.self) { try replay.apply(.epochStarted(epoch: 11)) }
        #expect(throws: EngineState.ReplayError.self) { try replay.apply(.epochStarted(epoch: 3)) }
        try replay.apply(.epochStarted(epoch: 12))
        #expect(replay.epochs.last == Term(epoch: 12, start: state.lsn + 1))
    }

    /// A version 1 image (no history) still reads, as a state with no terms; an image whose history
    /// does not grow is refused.
    @Test func imagesOfBothVersionsRead() throws {
        var state = EngineState(shardCount: 2)
        // A name the hash places on shard 0 (replay refuses a SKU on another shard than its name's).
        let sku = (0..<64).map { Name("tv\($0)") }.first { Engine.shardIndex(of: $0, shardCount: 2) == 0 }!
        try state.apply(.skuAdded(shard: 0, skuIndex: 0, sku: sku, total: 5, limit: 0))
        var v1 = state.encodeImage()
        v1.removeLast(5 + 4 * 2)  // the history (truncated flag, zero count) and each shard's zero tag runs
        v1.replaceSubrange(0..<4, with: [1, 0, 0, 0])
        let read = try v1.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(read.stateHash() == state.stateHash() && read.epochs == EpochHistory())

        try state.apply(.epochStarted(epoch: 8))
        try state.apply(.epochStarted(epoch: 9))
        let image = state.encodeImage()
        let back = try image.withUnsafeBytes { try EngineState.decodeImage($0) }
        #expect(back.epochs == state.epochs && back.stateHash() == state.stateHash())
        var swapped = image
        // The second term's epoch (9) written as 8, before each shard's tag runs: the history no longer grows.
        swapped[swapped.count - 4 * 2 - 16] = 8
        #expect(throws: EngineState.ImageError.self) { try swapped.withUnsafeBytes { try EngineState.decodeImage($0) } }
    }

    /// A replica applying a primary's records takes its terms with them, and refuses an epoch that
    /// does not grow as it refuses any record that does not fit.
    @Test func aReplicaTakesThePrimarysTerms() async {
        let replica = Engine(state: EngineState(shardCount: 2), log: MemoryChangeLog(), executors: [QueueExecutor(label: "replica")], readOnly: true)
        let shard = Engine.shardIndex(of: "tv", shardCount: 2)
        let records: [Record] = [
            .skuAdded(shard: shard, skuIndex: 0, sku: "tv", total: 5, limit: 0),
            .epochStarted(epoch: 6),
            .deducted(shard: shard, skuIndex: 0, quantity: 1),
            .epochStarted(epoch: 6),
            .deducted(shard: shard, skuIndex: 0, quantity: 1),
        ]
        let (reached, failure) = await replica.applyReplicated(records, at: 0)
        #expect(reached == 3 && failure != nil)
        #expect(replica.epochs.terms == [Term(epoch: 6, start: 2)])
        #expect(replica.available("tv") == 4)
    }
}
