import Testing
@testable import StockadeServer

/// Who takes the primary key when it is free (the second hostile review found a node with a refused
/// or foreign history elected for its higher position, and acknowledged changes lost).
@Suite struct CoordinatorTests {
    typealias C = Coordinator.Candidate

    @Test func theNewestHistoryWinsBeforeTheMostLog() {
        // A node of another data set (never followed this cluster: epoch 0) with far more log loses.
        #expect(Coordinator.elected([C(address: "a:1", epoch: 7, position: 100), C(address: "z:1", epoch: 0, position: 9_000)]) == "a:1")
        // A former primary of an older term with more log (changes it never shipped) loses.
        #expect(Coordinator.elected([C(address: "old:1", epoch: 3, position: 56), C(address: "new:1", epoch: 9, position: 16)]) == "new:1")
        // Within one term, the most log; then the smallest address.
        #expect(Coordinator.elected([C(address: "b:1", epoch: 9, position: 20), C(address: "a:1", epoch: 9, position: 16)]) == "b:1")
        #expect(Coordinator.elected([C(address: "b:1", epoch: 9, position: 20), C(address: "a:1", epoch: 9, position: 20)]) == "a:1")
        #expect(Coordinator.elected([]) == nil)
    }
}
