// How long one Swift dictionary insert can stall while the table doubles (the reason the shard user index
// is partitioned). Run: swiftc -O scripts/dictionary_growth.swift -o /tmp/dictionary_growth && /tmp/dictionary_growth
import Foundation
var d: [String: UInt32] = [:]
var worst = 0.0, worstAt = 0
for i in 0..<1_200_000 {
    let k = "uabc12-\(i)"
    let t0 = DispatchTime.now().uptimeNanoseconds
    d[k] = UInt32(i)
    let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6
    if dt > worst { worst = dt; worstAt = i }
}
print(String(format: "slowest single insert: %.1f ms at entry %d (dictionary capacity %d)", worst, worstAt, d.capacity))
