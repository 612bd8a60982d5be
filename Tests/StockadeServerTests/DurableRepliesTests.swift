import NIOEmbedded
import StockadeCore
import StockadeJournal
import Testing
@testable import StockadeServer

/// Records what rounds were answered with, on the loop.
private final class Answers: @unchecked Sendable {
    var got: [String: String?] = [:]
}

private func journalOnSimulatedDisk() throws -> (SimulatedStorage, Journal) {
    let disk = SimulatedStorage(seed: 7)
    var options = Journal.Options()
    options.writerThread = false
    let journal = try Journal(directory: DataDirectory("/data", storage: disk), shardCount: 1, lsn: 0, options: options)
    return (disk, journal)
}

private func oneRecord() -> RecordBuffer {
    var records = RecordBuffer()
    records.skuAdded(shard: 0, skuIndex: 0, sku: "tv", total: 0, limit: 0)
    return records
}

/// Rounds run in place wait for durability on their loop (#8): answered on the loop once the journal
/// says their position is durable, never before, and refused when it never will be.
@Suite struct DurableRepliesTests {
    @Test func roundsAreAnsweredOnTheLoopOnceTheirPositionIsDurable() throws {
        let loop = EmbeddedEventLoop()
        let (_, journal) = try journalOnSimulatedDisk()
        let replies = DurableReplies(loop: loop, journal: journal, localShards: [true])
        journal.onDurable { replies.durable($0) }
        let answers = Answers()
        let first = try journal.append(oneRecord())
        let second = try journal.append(oneRecord())
        replies.wait(for: first) { answers.got["first"] = $0 }
        replies.wait(for: second) { answers.got["second"] = $0 }
        loop.run()
        #expect(answers.got.isEmpty, "answered before the position was durable")
        #expect(replies.waitingCount == 2)

        journal.writePending()  // the writer's work: one sync, then the observer queues one drain
        #expect(answers.got.isEmpty, "answered off the loop")
        loop.run()
        let durable: [String: String?] = ["first": nil, "second": nil]
        #expect(answers.got == durable)
        #expect(replies.waitingCount == 0)

        // A position already durable is answered at once.
        replies.wait(for: second) { answers.got["again"] = $0 }
        #expect(answers.got["again"] == .some(nil))

        // One appended later waits for the next sync.
        let third = try journal.append(oneRecord())
        replies.wait(for: third) { answers.got["third"] = $0 }
        loop.run()
        #expect(answers.got["third"] == nil)
        journal.writePending()
        loop.run()
        #expect(answers.got["third"] == .some(nil))
        journal.close()
    }

    /// A pipelined round that crossed to its shard's loop waits on its own loop without writing; the
    /// shard's loop writes its records (``DurableReplies/writeSoon(through:)``), in the sync of its own
    /// rounds, and the waiting loop answers it once that sync is done.
    @Test func aRoundThatRanOnAnotherLoopIsWrittenByThatLoop() throws {
        let (own, shards) = (EmbeddedEventLoop(), EmbeddedEventLoop())
        var options = Journal.Options()
        options.writerWakesOnAppend = false  // as the server runs it: loops write what they wait for
        options.callerWriteNanosMax = .max  // a slow write (a debug build) must not hand the writing to the thread
        let journal = try Journal(
            directory: DataDirectory("/data", storage: SimulatedStorage(seed: 7)), shardCount: 1, lsn: 0, options: options)
        defer { journal.close() }
        let ownReplies = DurableReplies(loop: own, journal: journal, localShards: [false])
        let shardReplies = DurableReplies(loop: shards, journal: journal, localShards: [true])
        journal.onDurable { ownReplies.durable($0) }
        journal.onDurable { shardReplies.durable($0) }
        let answers = Answers()

        // Its own loop writes nothing for it: the record stays pending.
        let crossed = try journal.append(oneRecord())
        ownReplies.wait(for: crossed, write: false) { answers.got["crossed"] = $0 }
        own.run()
        shards.run()
        #expect(answers.got.isEmpty)
        #expect(journal.lastDurableLSN < crossed)

        // The shard's loop writes it.
        let syncs = journal.statistics.syncs
        shardReplies.writeSoon(through: crossed)
        shards.run()
        #expect(journal.lastDurableLSN == crossed)
        #expect(journal.statistics.syncs == syncs + 1)
        #expect(answers.got["crossed"] == nil, "answered off its own loop")
        own.run()
        #expect(answers.got["crossed"] == .some(nil))

        // With its own rounds' records, in one sync.
        let next = try journal.append(oneRecord())
        ownReplies.wait(for: next, write: false) { answers.got["next"] = $0 }
        let local = try journal.append(oneRecord())
        shardReplies.wait(for: local) { answers.got["local"] = $0 }
        shardReplies.writeSoon(through: next)
        own.run()
        shards.run()
        own.run()
        #expect(journal.statistics.syncs == syncs + 2)
        #expect(answers.got["next"] == .some(nil))
        #expect(answers.got["local"] == .some(nil))

        // A position already durable queues no write.
        shardReplies.writeSoon(through: crossed)
        shards.run()
        #expect(journal.statistics.syncs == syncs + 2)

        // With `write` (a round that ran on its own loop, or a single command that crossed), the
        // waiting loop writes.
        let single = try journal.append(oneRecord())
        ownReplies.wait(for: single) { answers.got["single"] = $0 }
        own.run()
        #expect(answers.got["single"] == .some(nil))
    }

    @Test func aFailedSyncRefusesEveryRoundWaiting() throws {
        let loop = EmbeddedEventLoop()
        let (disk, journal) = try journalOnSimulatedDisk()
        let replies = DurableReplies(loop: loop, journal: journal, localShards: [true])
        journal.onDurable { replies.durable($0) }
        let answers = Answers()
        let position = try journal.append(oneRecord())
        replies.wait(for: position) { answers.got["round"] = $0 }
        disk.failNext(.sync)
        journal.writePending()
        loop.run()
        let reason = try #require(answers.got["round"] ?? nil)
        #expect(reason.contains("log write failed"))
        // A round that starts waiting after the failure is refused at once.
        replies.wait(for: position + 1) { answers.got["late"] = $0 }
        #expect((answers.got["late"] ?? nil) != nil)
        journal.close()
    }
}
