import Testing
@testable import StockadeServer

/// ``PartialRequestBudget`` against a model of what it must do, over random sequences of shares:
/// the total is the sum of the shares; past the bound, the oldest large shares are chosen until the
/// rest fit (or only small ones are left); a small share is never chosen; a share that falls to the
/// floor is no longer chosen.
@Suite struct PartialRequestBudgetTests {
    @Test func choosesTheOldestLargeSharesUntilTheRestFit() {
        var rng = SplitMix(seed: 0x5EED)
        var choices = 0
        for _ in 0..<300 {
            let floor = Int(rng.next() % 64) + 1
            let bound = floor + Int(rng.next() % 2000)
            var budget = PartialRequestBudget<Int, Int>(bound: bound, floor: floor)
            var shares = [Int](repeating: 0, count: 12)
            /// When each share last went over the floor (the budget's `since`), and which were chosen.
            var since = [UInt64?](repeating: nil, count: 12)
            var chosen = Set<Int>()
            for step in 0..<400 {
                let key = Int(rng.next() % 12)
                let new: Int
                switch rng.next() % 4 {
                case 0: new = 0
                case 1: new = Int(rng.next() % UInt64(floor + 1))  // small
                default: new = Int(rng.next() % UInt64(bound / 2 + floor + 2))
                }
                let now = UInt64(step)
                let refused = budget.set(key, from: shares[key], to: new, now: now, holder: new > floor ? key * 1000 : nil)
                shares[key] = new
                if new > floor {
                    if since[key] == nil { since[key] = now }
                } else {
                    since[key] = nil
                    chosen.remove(key)
                }
                #expect(budget.total == shares.reduce(0, +))
                for (k, holder) in refused {
                    #expect(holder == k * 1000)
                    #expect(shares[k] > floor, "a small share was chosen")
                    #expect(!chosen.contains(k), "a share chosen twice")
                    // Nothing left unchosen is older.
                    for other in 0..<12 where other != k && shares[other] > floor && !chosen.contains(other)
                        && !refused.contains(where: { $0.0 == other }) {
                        #expect(since[other]! >= since[k]!)
                    }
                }
                chosen.formUnion(refused.map(\.0))
                choices += refused.count
                let unchosen = (0..<12).filter { !chosen.contains($0) }.reduce(0) { $0 + shares[$1] }
                let largeUnchosen = (0..<12).contains { !chosen.contains($0) && shares[$0] > floor }
                #expect(unchosen <= bound || !largeUnchosen, "over the bound with a share left to choose")
                for k in 0..<12 { #expect(budget.isChosen(k) == chosen.contains(k)) }
            }
        }
        #expect(choices > 1000, "the sequences passed the bound")
    }
}

/// A small deterministic generator (the tests' sequences repeat run to run).
private struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
