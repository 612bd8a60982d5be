import StockadeCore
import Testing
@testable import StockadeServer

/// A primary's refusal of a replica's log names its epoch and where the logs part; the replica starts
/// over on it (docs/REPLICATION.md, "Rejoining").
@Suite struct RefusalTests {
    @Test func theTailIsReadBackAndAnythingElseIsNot() {
        let tail = RefusalTail(epoch: 41, from: 1_205)
        let line = "-DIVERGED the replica's log went another way: its last records are of epoch 3\(tail)"
        #expect(RefusalTail.parse(line) == tail)
        #expect(RefusalTail.parse("-DIVERGED the replica's log went another way: its last records are of epoch 3") == nil)
        #expect(RefusalTail.parse("-DIVERGED x [primary-epoch 41 diverged-from]") == nil)
        #expect(RefusalTail.parse("-DIVERGED x [primary-epoch -1 diverged-from 3]") == nil)
        #expect(RefusalTail.parse("-DIVERGED x [primary-epoch 4 since 3]") == nil)
    }

    /// Where a refused log parts from the primary's, by the terms: the first position it may differ.
    @Test func divergedFromFollowsTheTerms() {
        let ours = EpochHistory(terms: [.init(epoch: 5, start: 10), .init(epoch: 9, start: 50)], isTruncated: false)!
        // No term in the replica's log, where ours began one at 10.
        #expect(ReplicaFeed.divergedFrom(ours, position: 60, lastTerm: nil) == 10)
        // A term we never had: its own records from its start.
        #expect(ReplicaFeed.divergedFrom(ours, position: 60, lastTerm: .init(epoch: 7, start: 40)) == 40)
        // Our term 5, but it went on past where ours ended (term 9 began at 50).
        #expect(ReplicaFeed.divergedFrom(ours, position: 60, lastTerm: .init(epoch: 5, start: 10)) == 50)
        // The same term begun elsewhere.
        #expect(ReplicaFeed.divergedFrom(ours, position: 60, lastTerm: .init(epoch: 5, start: 12)) == 10)
        // Only the last record tells: at or before it.
        #expect(ReplicaFeed.divergedFrom(ours, position: 70, lastTerm: .init(epoch: 9, start: 50)) == 70)
    }
}
