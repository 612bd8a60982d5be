import Synchronization
import Testing
@testable import StockadeServer

/// WAIT and the semi-synchronous wait count acknowledgements here.
@Suite struct ReplicationStateTests {
    final class Answers: Sendable {
        let values = Mutex<[String: Int]>([:])
        func record(_ name: String) -> @Sendable (Int) -> Void { { count in self.values.withLock { $0[name] = count } } }
        var all: [String: Int] { values.withLock { $0 } }
    }

    @Test func waitersAreAnsweredWhenEnoughReplicasAcknowledgeOrAtTheirDeadline() {
        let state = ReplicationState()
        let answers = Answers()
        let a = state.addReplica(.init(address: "a", listeningPort: 1, ackedLSN: 0, lastAckNanos: 0))!
        let b = state.addReplica(.init(address: "b", listeningPort: 2, ackedLSN: 0, lastAckNanos: 0))!
        state.whenAcknowledged(by: 1, position: 10, deadlineNanos: 1_000, answers.record("one@10"))
        state.whenAcknowledged(by: 2, position: 10, deadlineNanos: 1_000, answers.record("two@10"))
        state.whenAcknowledged(by: 1, position: 20, deadlineNanos: 1_000, answers.record("one@20"))
        state.whenAcknowledged(by: 1, position: 5, deadlineNanos: 1_000, answers.record("one@5"))  // out of order
        state.whenAcknowledged(by: 0, position: 99, deadlineNanos: 1_000, answers.record("none"))
        #expect(answers.all == ["none": 0])
        state.acknowledged(a, lsn: 12)
        #expect(answers.all == ["none": 0, "one@5": 1, "one@10": 1])
        state.acknowledged(b, lsn: 10)
        #expect(answers.all["two@10"] == 2)
        #expect(answers.all["one@20"] == nil)
        #expect(state.waiterCount == 1)
        state.expireDue(nowNanos: 999)
        #expect(answers.all["one@20"] == nil)
        state.expireDue(nowNanos: 1_000)
        #expect(answers.all["one@20"] == 0)
        #expect(state.waiterCount == 0)
        // A replica that goes away no longer counts; shutdown answers everyone at once.
        state.removeReplica(a)
        state.whenAcknowledged(by: 1, position: 11, deadlineNanos: .max, answers.record("after"))
        #expect(answers.all["after"] == nil)
        state.close()
        #expect(answers.all["after"] == 0)
        state.whenAcknowledged(by: 1, position: 11, deadlineNanos: .max, answers.record("closed"))
        #expect(answers.all["closed"] == 0)
    }

    /// EVENTS on a semi-synchronous node serves up to the confirmed position: the highest one
    /// `eventsReplicas` replicas acknowledged. It stays when a replica leaves (the replica still holds
    /// it), where it fell to 0 before; only a log that starts over takes it back.
    @Test func theConfirmedPositionRisesWithAcknowledgementsAndStaysWhenAReplicaLeaves() {
        let state = ReplicationState()
        state.eventsReplicas.store(2, ordering: .relaxed)
        let a = state.addReplica(.init(address: "a", listeningPort: 1, ackedLSN: 0, lastAckNanos: 0))!
        let b = state.addReplica(.init(address: "b", listeningPort: 2, ackedLSN: 0, lastAckNanos: 0))!
        state.acknowledged(a, lsn: 7)
        #expect(state.acknowledgedWatch.position == 0)  // one of two
        state.acknowledged(b, lsn: 5)
        #expect(state.acknowledgedWatch.position == 5)
        state.acknowledged(b, lsn: 9)
        #expect(state.acknowledgedWatch.position == 7)
        state.removeReplica(a)
        #expect(state.acknowledgedPosition(by: 2) == 0)
        #expect(state.acknowledgedWatch.position == 7)
        state.acknowledgedWatch.restarted(at: 0)
        #expect(state.acknowledgedWatch.position == 0)
    }

    /// Replicas that listen hear the confirmed position each time it rises (and only then); a node
    /// that follows a primary confirms only what the primary says, not what its own replicas
    /// acknowledged; a new link keeps it only for the records the log holds.
    @Test func listenersHearTheConfirmedPositionRiseAndAFollowerConfirmsOnlyItsPrimarysWord() {
        let state = ReplicationState()
        state.eventsReplicas.store(1, ordering: .relaxed)
        let heard = Atomic<Int>(0)
        let a = state.addReplica(.init(address: "a", listeningPort: 1, ackedLSN: 0, lastAckNanos: 0))!
        state.listenConfirmed(a) { heard.add(1, ordering: .relaxed) }
        state.acknowledged(a, lsn: 4)
        #expect(state.acknowledgedWatch.position == 4 && heard.load(ordering: .relaxed) == 1)
        state.acknowledged(a, lsn: 4)  // no rise, nothing said
        #expect(heard.load(ordering: .relaxed) == 1)
        // Following a primary: its replica's acknowledgement confirms nothing here.
        state.setLink(.init(host: "p", port: 1))
        state.acknowledged(a, lsn: 9)
        #expect(state.acknowledgedWatch.position == 4 && heard.load(ordering: .relaxed) == 1)
        #expect(state.acknowledgedWatch.publish(12))  // the primary's word
        state.confirmedRaised()
        #expect(heard.load(ordering: .relaxed) == 2)
        #expect(!state.acknowledgedWatch.publish(11))
        state.acknowledgedWatch.cap(at: 10)
        #expect(state.acknowledgedWatch.position == 10)
        state.acknowledgedWatch.cap(at: 20)
        #expect(state.acknowledgedWatch.position == 10)
        // A stream that ended takes its listener with it.
        state.removeReplica(a)
        state.confirmedRaised()
        #expect(heard.load(ordering: .relaxed) == 2)
    }

    /// Replica streams are bounded like clients: past the bound a stream is refused.
    @Test func replicaStreamsAreBounded() {
        let state = ReplicationState()
        let ids = (0..<ReplicationLimits.replicasMax).compactMap { _ in state.addReplica(.init(address: "r", listeningPort: 0, ackedLSN: 0, lastAckNanos: 0)) }
        #expect(ids.count == ReplicationLimits.replicasMax)
        #expect(state.addReplica(.init(address: "r", listeningPort: 0, ackedLSN: 0, lastAckNanos: 0)) == nil)
        state.removeReplica(ids[0])
        #expect(state.addReplica(.init(address: "r", listeningPort: 0, ackedLSN: 0, lastAckNanos: 0)) != nil)
    }
}
