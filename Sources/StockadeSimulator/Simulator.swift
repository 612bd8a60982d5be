import StockadeCore

/// A deterministic simulation of the engine and its log, driven by one seed (in the spirit of
/// TigerBeetle's VOPR): many logical clients send pipelined batches of every command (baskets across
/// shards, request-id retries, confirm and cancel races on shared order ids, expiry, restock, pause,
/// deduct) while a simulated clock jumps forward and back, syncs are slow, appends and syncs fail, and
/// the process crashes and recovers from what its log kept.
///
/// Checked after every step:
/// - every reply the engine gives is the one the sequential ``ReferenceModel`` gives for the same
///   commands in the order the engine ran them;
/// - an acknowledged reply shows only durable state: replaying the log as it was durable when the reply
///   was sent, and applying the batch to that, gives the same replies;
/// - after a log failure, every command is refused and nothing more is logged;
/// - after a crash, the log's surviving records replay without error, the state passes its audit, and
///   the run goes on from it (the model is rebuilt from the recovered state).
///
/// Clients' batches run one at a time up to the point where they wait for a sync, so the run is
/// deterministic: a failing seed replays exactly with ``Simulator/run(seed:options:)``.
package enum Simulator {
    /// How much of what a run does.
    package struct Options: Sendable {
        /// Steps (a batch sent, a sync, a timer tick, a clock change, a fault) per run.
        package var steps = 400
        package var clients = 6
        package var batchCommandsMax = 16
        /// Per-mille chance per step of each fault.
        package var crashPerMille = 15
        package var syncFailurePerMille = 6
        package var appendFailurePerMille = 6
        package init() {}
    }

    /// What one seed did, and the first check that failed (nil when all held).
    package struct Report: Sendable, CustomStringConvertible {
        package var seed: UInt64
        package var shards = 0
        package var batches = 0
        package var commands = 0
        package var acknowledged = 0
        package var syncs = 0
        package var crashes = 0
        package var syncFailures = 0
        package var appendFailures = 0
        package var clockJumpsBack = 0
        package var tornTails = 0
        package var durabilityChecks = 0
        package var failure: String?

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            let outcome = failure.map { "FAILED: \($0)" } ?? "ok"
            return "seed \(seed): \(outcome) (\(shards) shards, \(batches) batches, \(commands) commands, "
                + "\(acknowledged) acknowledged, \(syncs) syncs, \(crashes) crashes (\(tornTails) with a torn tail), "
                + "\(syncFailures) sync failures, \(appendFailures) append failures, \(clockJumpsBack) clock jumps back, "
                + "\(durabilityChecks) durability checks)"
        }
    }

    private enum Event: Sendable {
        case suspended
        case finished(client: Int, replies: [Reply])
    }

    /// A batch sent and not yet answered.
    private struct InFlight {
        var commands: [Command]
        var now: Int64
        /// What the model answered when the engine ran the batch (nil: the log had failed, or the model
        /// was no longer in step with the log).
        var expected: [Reply]?
        /// Log positions before and after the engine ran the batch.
        var appendedBefore: UInt64
        var appendedAfter: UInt64
    }

    /// Runs one seed to the end or to its first failed check.
    package static func run(seed: UInt64, options: Options = Options()) async -> Report {
        var rng = SplitMix64(seed: seed)
        var report = Report(seed: seed)
        let shardCount = Int.random(in: 1...4, using: &rng)
        report.shards = shardCount
        var workload = RandomWorkload(seed: rng.next())
        var model = ReferenceModel(shardCount: shardCount)
        var log = SimulatedLog()
        var engine = Engine(state: EngineState(shardCount: shardCount), log: log)
        var now: Int64 = 1_000_000
        /// The engine's time never goes back (``Engine``); the model's follows it. A restarted process
        /// starts from the clock as it finds it.
        var modelNow: Int64 = .min
        var inFlight = [InFlight?](repeating: nil, count: options.clients)
        /// The model is in step with the log until a failure leaves the log's content uncertain.
        var inStep = true
        /// Replay of the log's durable prefix, for the durability check; extended as positions grow.
        var replayed = EngineState(shardCount: shardCount)
        var replayedRecords: [[UInt8]] = []

        let (events, eventSink) = AsyncStream<Event>.makeStream()
        var eventIterator = events.makeAsyncIterator()
        func wire(_ log: SimulatedLog) { log.onSuspend { eventSink.yield(.suspended) } }
        // A batch answered before it waited wrote what the log gained while it ran: `appendedAfter` 0
        // marks it not yet known.
        wire(log)

        func fail(_ message: String) -> Report {
            var failed = report
            failed.failure = message
            return failed
        }

        /// Waits until every batch in flight is either answered (its replies checked, or dropped with
        /// `discard` when the process died) or waiting for a sync.
        func settle(discard: Bool = false) async -> String? {
            while inFlight.lazy.filter({ $0 != nil }).count > log.waiterCount {
                guard let event = await eventIterator.next() else { return "event stream ended" }
                guard case .finished(let client, let replies) = event else { continue }
                guard let batch = inFlight[client] else { return "replies for client \(client), which sent nothing" }
                inFlight[client] = nil
                if discard { continue }
                for reply in replies { workload.observe(reply) }
                var answered = batch
                if answered.appendedAfter == 0 { answered.appendedAfter = log.appendedPosition }
                if let problem = check(answered, replies) { return "client \(client): \(problem)" }
            }
            return nil
        }

        func check(_ batch: InFlight, _ replies: [Reply]) -> String? {
            guard replies.count == batch.commands.count else { return "\(replies.count) replies to \(batch.commands.count) commands" }
            // Refused, or refused for its arguments alone (which shows no state).
            let refused = replies.allSatisfy {
                switch $0 {
                case .rejected(.unavailable), .rejected(.badArgument), .rejected(.badQuantity), .rejected(.noSuchOrder): true
                default: false
                }
            }
            guard let expected = batch.expected else {
                return refused ? nil : "a batch run after the log failed was answered: \(replies)"
            }
            if refused, log.failureReason != nil { return nil }  // the failure came while it waited
            // When the log failed while the batch ran, commands from the failed append on are refused.
            let failedDuring = log.failureReason != nil
            for (i, reply) in replies.enumerated() where reply != expected[i] {
                if failedDuring, case .rejected(.unavailable) = reply { continue }
                return "\(batch.commands[i]) at \(batch.now): got \(reply), the model says \(expected[i]) (batch of \(replies.count), #\(i))"
            }
            report.acknowledged += 1
            let durable = log.durablePosition
            guard batch.appendedAfter == batch.appendedBefore || durable >= batch.appendedAfter else {
                return "acknowledged before its own records were durable (durable \(durable), batch wrote \(batch.appendedBefore) to "
                    + "\(batch.appendedAfter)): \(zip(batch.commands, replies).map { "\($0) -> \($1)" })"
            }
            // The batch must show only what was durable when it was answered: replaying the log up to that
            // point and applying the batch to it gives the same replies.
            let visible = min(durable, batch.appendedBefore)
            guard visible < batch.appendedBefore else { return nil }
            report.durabilityChecks += 1
            if UInt64(replayedRecords.count) < visible {
                for bytes in log.records(from: UInt64(replayedRecords.count), to: visible) {
                    replayedRecords.append(bytes)
                    do {
                        try bytes.withUnsafeBytes { raw in try Record.decodeAll(raw) { try replayed.apply($0) } }
                    } catch {
                        return "record \(replayedRecords.count) does not replay: \(error)"
                    }
                }
            }
            var durableModel = ReferenceModel(from: replayed)
            durableModel.expire(now: batch.now)
            for (i, command) in batch.commands.enumerated() {
                let want = durableModel.apply(command, now: batch.now)
                if want != replies[i] {
                    return "\(command) was answered \(replies[i]), which shows state that was not durable "
                        + "(on the durable log the reply is \(want))"
                }
            }
            return nil
        }

        for step in 0..<options.steps {
            let roll = Int.random(in: 0..<1000, using: &rng)
            let idle = inFlight.indices.filter { inFlight[$0] == nil }
            if roll < options.crashPerMille {
                // The process dies: what was not synced is lost, or a prefix of it survives.
                report.crashes += 1
                let unsynced = Int(log.appendedPosition - log.durablePosition)
                let kept = unsynced == 0 ? 0 : Int.random(in: 0...unsynced, using: &rng)
                if kept > 0 { report.tornTails += 1 }
                let surviving = log.survivingRecords(keptBeyondDurable: kept)
                log.failSync("the process crashed")
                if let problem = await settle(discard: true) { return fail("step \(step): \(problem)") }
                var recovered = EngineState(shardCount: shardCount)
                for (index, bytes) in surviving.enumerated() {
                    do {
                        try bytes.withUnsafeBytes { raw in try Record.decodeAll(raw) { try recovered.apply($0) } }
                    } catch {
                        return fail("step \(step): recovery failed at record \(index + 1) of \(surviving.count): \(error)")
                    }
                }
                for shard in recovered.shards where !(shard.audit(nil) ?? []).allSatisfy(\.ok) {
                    return fail("step \(step): recovered shard \(shard.shard) fails its audit: \(shard.audit(nil) ?? [])")
                }
                log = SimulatedLog(records: surviving)
                wire(log)
                engine = Engine(state: recovered, log: log)
                model = ReferenceModel(from: recovered)
                modelNow = .min
                inStep = true
                replayed = EngineState(shardCount: shardCount)
                replayedRecords = []
                continue
            }
            if roll < options.crashPerMille + options.syncFailurePerMille {
                if log.failureReason == nil { report.syncFailures += 1 }
                inStep = false
                log.failSync("EIO on fdatasync (injected)")
                if let problem = await settle() { return fail("step \(step): \(problem)") }
                continue
            }
            if roll < options.crashPerMille + options.syncFailurePerMille + options.appendFailurePerMille {
                if log.failureReason == nil { report.appendFailures += 1 }
                log.failNextAppend("ENOSPC on write (injected)")
                continue
            }
            switch roll % 20 {
            case 0..<11 where !idle.isEmpty:
                // A client sends a pipelined batch; the engine runs it up to its wait for a sync.
                let client = idle.randomElement(using: &rng)!
                let size = Int.random(in: 1...options.batchCommandsMax, using: &rng)
                let commands = (0..<size).map { _ in workload.next() }
                let appendedBefore = log.appendedPosition
                let failedBefore = log.failureReason != nil
                var expected: [Reply]?
                modelNow = max(modelNow, now)
                if inStep && !failedBefore {
                    model.expire(now: modelNow)
                    expected = commands.map { model.apply($0, now: modelNow) }
                }
                let batchNow = now
                let batchEngine = engine
                report.batches += 1
                report.commands += size
                Task {
                    let replies = await batchEngine.execute(commands, now: batchNow)
                    eventSink.yield(.finished(client: client, replies: replies))
                }
                inFlight[client] = InFlight(
                    commands: commands, now: modelNow, expected: expected, appendedBefore: appendedBefore, appendedAfter: 0)
                // Run until this batch waits for a sync or is answered (and so is every batch a failed
                // append answered meanwhile).
                if let problem = await settle() { return fail("step \(step): \(problem)") }
                if inFlight[client] != nil { inFlight[client]!.appendedAfter = log.appendedPosition }
                if log.failureReason != nil { inStep = false }
            case 11..<15:
                report.syncs += 1
                log.sync()
                if let problem = await settle() { return fail("step \(step): \(problem)") }
            case 15..<17:
                // The housekeeping timer: expire what is due (its records are synced with the next batch's).
                let before = log.appendedPosition
                await engine.expire(now: now)
                modelNow = max(modelNow, now)
                if inStep && log.failureReason == nil { model.expire(now: modelNow) }
                if log.appendedPosition != before && log.failureReason != nil {
                    return fail("step \(step): expiry logged after the log failed")
                }
            default:
                // The clock: mostly small steps, sometimes a jump forward past deadlines, sometimes back.
                switch Int.random(in: 0..<10, using: &rng) {
                case 0:
                    now -= Int64.random(in: 1...500, using: &rng)
                    report.clockJumpsBack += 1
                case 1: now += Int64.random(in: 300...2_000, using: &rng)
                default: now += Int64.random(in: 0...40, using: &rng)
                }
            }
        }
        // Drain: everything in flight is synced and answered.
        if log.failureReason == nil {
            report.syncs += 1
            log.sync()
        } else {
            log.failSync("end")
        }
        if let problem = await settle() { return fail("end: \(problem)") }
        eventSink.finish()
        return report
    }
}
