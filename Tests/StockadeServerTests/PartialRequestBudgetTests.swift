import StockadeCore
import Testing
@testable import StockadeServer

/// ``PartialRequestBudget`` against a model of what it must do, over random sequences of shares:
/// the total is the sum of the shares; past the bound, the shares of the oldest requests are chosen
/// until the rest fit; a share's age is its request's (it starts again with each request); a share
/// that falls to 0 or starts again is no longer chosen.
@Suite struct PartialRequestBudgetTests {
    @Test func choosesTheOldestRequestsUntilTheRestFit() {
        var rng = SplitMix64(seed: 0x5EED)
        var choices = 0
        var smallChosen = 0
        for _ in 0..<300 {
            let bound = Int(rng.next() % 2000) + 1
            var budget = PartialRequestBudget<Int, Int>(bound: bound)
            var shares = [Int](repeating: 0, count: 12)
            /// When each share's request began to be held (the budget's `since`), and which were chosen.
            var since = [UInt64?](repeating: nil, count: 12)
            var chosen = Set<Int>()
            for step in 0..<400 {
                let key = Int(rng.next() % 12)
                let new: Int = switch rng.next() % 4 {
                case 0: 0
                case 1: Int(rng.next() % 64)  // a few bytes, as a request split across reads holds
                default: Int(rng.next() % UInt64(bound / 2 + 2))
                }
                let restart = rng.next() % 4 == 0
                let now = UInt64(step)
                let refused = budget.set(key, from: shares[key], to: new, restart: restart, holder: new > 0 ? key * 1000 : nil)
                shares[key] = new
                if new > 0 {
                    if since[key] == nil || restart {
                        since[key] = now
                        chosen.remove(key)
                    }
                } else {
                    since[key] = nil
                    chosen.remove(key)
                }
                #expect(budget.total == shares.reduce(0, +))
                for (k, holder) in refused {
                    #expect(holder == k * 1000)
                    #expect(shares[k] > 0, "a share of nothing was chosen")
                    #expect(!chosen.contains(k), "a share chosen twice")
                    if shares[k] < 64 { smallChosen += 1 }
                    // Nothing left unchosen is older.
                    for other in 0..<12 where other != k && shares[other] > 0 && !chosen.contains(other)
                        && !refused.contains(where: { $0.0 == other }) {
                        #expect(since[other]! >= since[k]!)
                    }
                }
                chosen.formUnion(refused.map(\.0))
                choices += refused.count
                let unchosen = (0..<12).filter { !chosen.contains($0) }.reduce(0) { $0 + shares[$1] }
                #expect(unchosen <= bound, "over the bound with a share left to choose")
                for k in 0..<12 { #expect(budget.isChosen(k) == chosen.contains(k)) }
            }
        }
        #expect(choices > 1000, "the sequences passed the bound")
        #expect(smallChosen > 0, "small shares are chosen too when they are the oldest")
    }

    /// Thousands of small shares chosen at once, and a long life of shares that come and go: each
    /// call costs what it chooses, not a scan of every share for each choice (a first form rescanned,
    /// and choosing 9,900 idle clients at once held both event loops for half a second).
    @Test func choosingManySharesAtOnceTakesThemInOrder() {
        var budget = PartialRequestBudget<Int, Int>(bound: 1 << 20)
        for key in 0..<10_000 {
            #expect(budget.set(key, from: 0, to: 100, restart: true, holder: key).isEmpty)
        }
        // One share over the bound by all the small ones: every one of them goes, oldest first,
        // and the newest (the one that pushed) stays.
        let refused = budget.set(10_000, from: 0, to: 1 << 20, restart: true, holder: 10_000)
        #expect(refused.map(\.0) == Array(0..<10_000))
        #expect(!budget.isChosen(10_000))
        for key in 0..<10_000 { _ = budget.set(key, from: 100, to: 0, restart: false, holder: nil) }
        #expect(budget.set(10_000, from: 1 << 20, to: (1 << 20) - 1000, restart: false, holder: 10_000).isEmpty)
        #expect(budget.total == (1 << 20) - 1000)
        // Shares that come and go for a long time, none chosen (their stale queue entries are dropped
        // as they pile up): the next choice still finds the oldest.
        for round in 0..<100_000 {
            let key = 20_000 + round % 50
            _ = budget.set(key, from: round < 50 ? 0 : 10, to: 10, restart: true, holder: key)
        }
        #expect(budget.total == (1 << 20) - 500)
        let next = budget.set(30_000, from: 0, to: 1000, restart: true, holder: 30_000)
        #expect(next.map(\.0) == [10_000])
    }
}
