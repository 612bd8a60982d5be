import NIOCore
import StockadeCore
import Testing
@testable import StockadeServer

@Suite struct ReplyEncodingTests {
    /// Every rejection, with associated values that give its error text a second word.
    static let rejections: [Rejection] = [
        .soldOut, .insufficient(available: 3), .limitReached(bought: 1, limit: 1), .noSuchSku, .paused, .badQuantity,
        .badArgument("value is not an integer"), .skuExists, .belowCommitted(committed: 7), .noSuchOrder, .expired,
        .wrongState(.paid), .requestInFlight, .requestConflict(OrderID(rawValue: 42)), .busy,
        .unavailable("fdatasync failed"), .readOnly, .notReplicated(acknowledged: 0, wanted: 1), .replicatedTooLate(wanted: 1),
    ]

    /// The metrics label of a rejected reply is its error code (the first word of the error text the
    /// client gets) in lower case: the labels are fixed literals, so each must stay that code.
    @Test(arguments: rejections)
    func aRejectionsOutcomeLabelIsItsErrorCodeInLowerCase(rejection: Rejection) {
        let code = ReplyEncoding.errorText(rejection).prefix { $0 != " " }.lowercased()
        #expect(ReplyEncoding.outcome(.rejected(rejection)) == code)
        var out = ByteBuffer()
        ReplyEncoding.write(.rejected(rejection), into: &out)
        #expect(out.readString(length: out.readableBytes)?.hasPrefix("-\(code.uppercased())") == true)
    }

    @Test func everyOtherReplyIsOK() {
        #expect(ReplyEncoding.outcome(.done) == "ok")
        #expect(ReplyEncoding.outcome(.deducted(0)) == "ok")
        #expect(ReplyEncoding.outcome(.deducted(-1)) == "ok")
    }
}

/// An AUDIT of every SKU has no bound on its reply, so the server encodes a large one a slice at a
/// time with its loop's other work in between (found: an AUDIT of 200,000 SKUs kept a PING on its
/// loop waiting 40 ms, of a million 378 ms). Whatever the slices, the bytes must be those of the
/// reply encoded at once.
@Suite struct UnboundedReplyTests {
    /// Findings of `count` SKUs in slices of random sizes (the engine's slices end with each shard),
    /// names of 1 to 64 bytes (inline and long), some not adding up.
    static func findings(count: Int, seed: UInt64) -> AuditFindings {
        var random = SplitMix64(seed: seed)
        var all = AuditFindings()
        var made = 0
        while made < count {
            let size = min(count - made, 1 + Int(random.next() % 5000))
            all.append((made..<made + size).map { n in
                let length = 1 + Int(random.next() % 64)
                let name = Name(bytes: (0..<length).map { UInt8(truncatingIfNeeded: n &* 31 &+ $0 &+ 1) })
                let ok = random.next() % 50 != 0
                return AuditFinding(sku: name, ok: ok, problem: ok ? "" : "available \(n) + reserved 0 + sold 0 != total 0")
            })
            made += size
        }
        return all
    }

    @Test(arguments: [0, 1, 4096, 4097, 9000, 60_000], [false, true])
    func slicesEncodeTheSameBytesAsTheWholeReply(count: Int, resp3: Bool) async {
        let audit = Reply.audit(Self.findings(count: count, seed: UInt64(count) + 7))
        var expected = ByteBuffer()
        ReplyEncoding.write(audit, resp3: resp3, into: &expected)

        var replies: [Reply] = [.done, audit, .deducted(1)]
        var pauses: [UInt64] = []
        let (encoded, nanos) = await ReplyEncoding.encodeUnbounded(&replies, resp3: resp3, allocator: ByteBufferAllocator()) {
            pauses.append($0)
        }
        guard count > Engine.auditChunk else {
            // Small enough for one turn: left to the round's own encoding.
            #expect(encoded.isEmpty && pauses.isEmpty && nanos == 0)
            #expect(replies == [.done, audit, .deducted(1)])
            return
        }
        #expect(Array(encoded.keys) == [1])
        let buffers = encoded[1] ?? []
        var joined = ByteBuffer()
        for var buffer in buffers { joined.writeBuffer(&buffer) }
        #expect(joined == expected)
        // A pause between buffers, none after the last; the reply was taken out of the round.
        #expect(buffers.count >= 2 && pauses.count == buffers.count - 1)
        #expect(replies == [.done, .audit(AuditFindings()), .deducted(1)])
        #expect(ReplyEncoding.outcome(replies[1]) == "ok")
    }

    @Test func findingsCompareByContentNotBySlices() {
        let all = Self.findings(count: 10_000, seed: 3)
        #expect(AuditFindings(Array(all)) == all)
        #expect(AuditFindings(Array(all).dropLast().map { $0 }) != all)
        var popped = all
        var seen = 0
        while let slice = popped.popFirstSlice() {
            seen += slice.count
            #expect(!slice.isEmpty && popped.count == all.count - seen)
        }
        #expect(seen == all.count && popped.isEmpty)
    }
}
