import StockadeCore
import StockadeJournal

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
///   the run goes on from it (the model is rebuilt from the recovered state);
/// - on the disk, now and then, reads of the durable log as EVENTS and a replica's stream make them
///   give what its files hold (``SimulationTarget/readEvents(rng:report:)``).
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
        /// Run on the real journal, snapshots and recovery on a simulated disk (torn writes, lost unsynced
        /// bytes, bit flips, EIO/ENOSPC on write, fsync and rename) instead of the in-memory log.
        package var disk = false
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
        /// Crashes that killed the process only: the page cache kept what it had not synced, and the
        /// next process recovered it (``SimulatedStorage/processKilled()``).
        package var kills = 0
        package var syncFailures = 0
        package var appendFailures = 0
        package var clockJumpsBack = 0
        package var tornTails = 0
        package var durabilityChecks = 0
        /// Batches run in place (``Engine/executeLocally(_:now:localShards:)`` answered them).
        package var inPlaceBatches = 0
        package var snapshots = 0
        package var bitFlips = 0
        package var refusedStartUps = 0
        package var diskFaults = 0
        package var quietRecoveries = 0
        /// Terms started (``Engine/startEpoch(_:)``), as a promotion does.
        package var epochs = 0
        /// Reads of the durable log checked against its files (``SimulationTarget/readEvents(rng:report:)``),
        /// and how many of them were refused as unreadable where the files themselves were damaged.
        package var eventReads = 0
        package var eventReadsRefused = 0
        /// Of the reads, those the journal's newest records in memory answered (``LogTail``).
        package var eventReadsFromTail = 0
        /// Recoveries from a snapshot whose fingerprints of the log's last records were compared with
        /// the log (and matched: a mismatch fails the seed).
        package var snapshotsMatched = 0
        /// Snapshots of another log copied into the directory before a restart (and skipped by recovery).
        package var foreignSnapshots = 0
        package var failure: String?

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            let outcome = failure.map { "FAILED: \($0)" } ?? "ok"
            return "seed \(seed): \(outcome) (\(shards) shards, \(batches) batches (\(inPlaceBatches) in place), \(commands) commands, "
                + "\(acknowledged) acknowledged, \(syncs) syncs, \(crashes) crashes (\(tornTails) with a torn tail, \(kills) of the process alone), "
                + "\(syncFailures) sync failures, \(appendFailures) append failures, \(clockJumpsBack) clock jumps back, "
                + "\(durabilityChecks) durability checks, \(quietRecoveries) recoveries compared by state hash, \(epochs) epochs started"
                + (snapshots + bitFlips + diskFaults > 0
                    ? ", \(snapshots) snapshots, \(diskFaults) disk faults, \(bitFlips) bit flips, \(refusedStartUps) refused start-ups, "
                        + "\(eventReads) log reads checked (\(eventReadsFromTail) from memory, \(eventReadsRefused) refused on damage), \(snapshotsMatched) snapshots matched with the log, \(foreignSnapshots) of another log skipped)" : ")")
        }
    }

    private enum Event: Sendable {
        case suspended
        case finished(client: Int, replies: [Reply], inPlace: Bool)
    }

    /// A batch sent and not yet answered.
    private struct InFlight {
        /// Order of sending, and who sent it.
        var sequence: Int
        var client: Int
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
        let target: any SimulationTarget
        if options.disk {
            do {
                target = try DiskTarget(shardCount: shardCount, seed: rng.next())
            } catch {
                report.failure = "the store did not open on an empty disk: \(error)"
                return report
            }
        } else {
            target = MemoryTarget(shardCount: shardCount, seed: seed)
        }
        /// The highest position an acknowledged batch wrote: recovery must reach it.
        var acknowledgedPosition: UInt64 = 0
        var now: Int64 = 1_000_000
        /// The engine's time never goes back (``Engine``); the model's follows it. A restarted process
        /// starts from the clock as it finds it.
        var modelNow: Int64 = .min
        var inFlight = [InFlight?](repeating: nil, count: options.clients)
        /// The model is in step with the log until a failure leaves the log's content uncertain.
        var inStep = true

        let (events, eventSink) = AsyncStream<Event>.makeStream()
        var eventIterator = events.makeAsyncIterator()
        target.onSuspend { eventSink.yield(.suspended) }
        // A batch answered before it waited wrote what the log gained while it ran: `appendedAfter` 0
        // marks it not yet known.

        func fail(_ message: String) -> Report {
            var failed = report
            failed.failure = message
            return failed
        }

        /// Waits until every batch in flight is either answered (its replies checked, or dropped with
        /// `discard` when the process died) or waiting for a sync.
        func settle(discard: Bool = false) async -> String? {
            // Batches released together finish in whatever order their tasks run: collect them, then
            // check them (and learn their order ids) in the order they were sent, so the run stays
            // deterministic.
            var answered: [(batch: InFlight, replies: [Reply])] = []
            while inFlight.lazy.filter({ $0 != nil }).count > target.waiterCount {
                guard let event = await eventIterator.next() else { return "event stream ended" }
                guard case .finished(let client, let replies, let inPlace) = event else { continue }
                if inPlace { report.inPlaceBatches += 1 }
                guard var batch = inFlight[client] else { return "replies for client \(client), which sent nothing" }
                inFlight[client] = nil
                if batch.appendedAfter == 0 { batch.appendedAfter = target.appendedPosition }
                answered.append((batch, replies))
            }
            if discard { return nil }
            for (batch, replies) in answered.sorted(by: { $0.batch.sequence < $1.batch.sequence }) {
                for reply in replies { workload.observe(reply) }
                if let problem = check(batch, replies) { return "client \(batch.client): \(problem)" }
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
            if refused, target.failureReason != nil { return nil }  // the failure came while it waited
            // When the log failed while the batch ran, commands from the failed append on are refused.
            let failedDuring = target.failureReason != nil
            for (i, reply) in replies.enumerated() where !sameReply(reply, expected[i]) {
                if failedDuring, case .rejected(.unavailable) = reply { continue }
                return "\(batch.commands[i]) at \(batch.now): got \(reply), the model says \(expected[i]) (batch of \(replies.count), #\(i))"
            }
            report.acknowledged += 1
            let durable = target.durablePosition
            if batch.appendedAfter > batch.appendedBefore { acknowledgedPosition = max(acknowledgedPosition, batch.appendedAfter) }
            guard batch.appendedAfter == batch.appendedBefore || durable >= batch.appendedAfter else {
                return "acknowledged before its own records were durable (durable \(durable), batch wrote \(batch.appendedBefore) to "
                    + "\(batch.appendedAfter)): \(zip(batch.commands, replies).map { "\($0) -> \($1)" })"
            }
            // The batch must show only what was durable when it was answered: replaying the log up to that
            // point and applying the batch to it gives the same replies.
            let visible = min(durable, batch.appendedBefore)
            guard visible < batch.appendedBefore else { return nil }
            report.durabilityChecks += 1
            let replayed: EngineState
            do {
                replayed = try target.durableState(through: visible)
            } catch {
                return "the durable log up to \(visible) does not replay: \(error)"
            }
            var durableModel = ReferenceModel(from: replayed)
            durableModel.expire(now: batch.now)
            for (i, command) in batch.commands.enumerated() {
                let want = durableModel.apply(command, now: batch.now)
                // A refusal shows no state (the log failed while the batch ran).
                if case .rejected(.unavailable) = replies[i] { continue }
                if !sameReply(want, replies[i]) {
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
                let quiet = target.failureReason == nil && target.durablePosition == target.appendedPosition
                let liveHash = quiet ? await target.engine.captureState(lsn: 0).stateHash() : nil
                let flipsBefore = report.bitFlips
                let outcome = await target.crashAndRecover(rng: &rng, report: &report)
                // Replies of the dead process are never delivered.
                if let problem = await settle(discard: true) { return fail("step \(step): \(problem)") }
                inFlight = inFlight.map { _ in nil }
                let recovered: EngineState
                switch outcome {
                case .failure(let failure): return fail("step \(step): \(failure)")
                case .success(let state): recovered = state
                }
                guard recovered.lsn >= acknowledgedPosition else {
                    return fail("step \(step): recovered to position \(recovered.lsn), but position \(acknowledgedPosition) was acknowledged"
                        + (target.damage.map { " (\($0))" } ?? ""))
                }
                if let liveHash, report.bitFlips == flipsBefore {
                    report.quietRecoveries += 1
                    guard recovered.stateHash() == liveHash else {
                        return fail("step \(step): the state recovered at a quiet point differs from the live state")
                    }
                }
                for shard in recovered.shards where !(shard.audit(nil) ?? []).allSatisfy(\.ok) {
                    return fail("step \(step): recovered shard \(shard.shard) fails its audit: \(shard.audit(nil) ?? [])")
                }
                // The restarted process shows the recovered state at once: no later crash may take
                // any of it back (a process killed before its sync leaves records that recovery reads
                // from the page cache; they must be made durable before they are shown).
                acknowledgedPosition = max(acknowledgedPosition, recovered.lsn)
                model = ReferenceModel(from: recovered)
                modelNow = .min
                inStep = true
                continue
            }
            if roll < options.crashPerMille + options.syncFailurePerMille {
                let failedBefore = target.failureReason != nil
                target.failSync()
                if target.failureReason != nil {
                    if !failedBefore { report.syncFailures += 1 }
                    inStep = false
                }
                if let problem = await settle() { return fail("step \(step): \(problem)") }
                continue
            }
            if roll < options.crashPerMille + options.syncFailurePerMille + options.appendFailurePerMille {
                if target.failureReason == nil { report.appendFailures += 1 }
                target.failNextAppend()
                continue
            }
            switch roll % 20 {
            case 0..<11 where !idle.isEmpty:
                // A client sends a pipelined batch; the engine runs it up to its wait for a sync.
                let client = idle.randomElement(using: &rng)!
                let size = Int.random(in: 1...options.batchCommandsMax, using: &rng)
                let commands = (0..<size).map { _ in workload.next() }
                let appendedBefore = target.appendedPosition
                let failedBefore = target.failureReason != nil
                var expected: [Reply]?
                modelNow = max(modelNow, now)
                if inStep && !failedBefore {
                    model.expire(now: modelNow)
                    expected = commands.map { model.apply($0, now: modelNow) }
                }
                let batchNow = now
                let batchEngine = target.engine
                report.batches += 1
                report.commands += size
                // Most batches go the way a server runs a connection's batch: in place on the loop its
                // shards run on (here, with some shards taken as another loop's), falling back to
                // `execute` when it declines; the rest go straight to `execute`.
                let local: [Bool]? = Int.random(in: 0..<3, using: &rng) == 0
                    ? nil : (0..<shardCount).map { _ in Int.random(in: 0..<8, using: &rng) != 0 }
                let loop = target.loop
                Task {
                    var replies: [Reply]?
                    if let local {
                        switch await loop.runLocally(batchEngine, commands, now: batchNow, local: local) {
                        case .answered(let answered, let waitFor):
                            replies = await batchEngine.repliesWhenDurable(answered, waitFor: waitFor)
                        case .partlyRan(let partial):
                            replies = await batchEngine.executeRest(commands, partial)
                        case .needsAsync, .needsShard:
                            break
                        }
                    }
                    let inPlace = replies != nil
                    if replies == nil { replies = await batchEngine.execute(commands, now: batchNow) }
                    eventSink.yield(.finished(client: client, replies: replies!, inPlace: inPlace))
                }
                inFlight[client] = InFlight(
                    sequence: report.batches, client: client, commands: commands, now: modelNow, expected: expected, appendedBefore: appendedBefore, appendedAfter: 0)
                // Run until this batch waits for a sync or is answered (and so is every batch a failed
                // append answered meanwhile).
                if let problem = await settle() { return fail("step \(step): \(problem)") }
                if inFlight[client] != nil { inFlight[client]!.appendedAfter = target.appendedPosition }
                if target.failureReason != nil { inStep = false }
            case 11..<15:
                report.syncs += 1
                target.sync()
                if target.failureReason != nil { inStep = false }
                if let problem = await settle() { return fail("step \(step): \(problem)") }
            case 15..<17:
                // The housekeeping timer: expire what is due (its records are synced with the next batch's).
                let before = target.appendedPosition
                await target.engine.expire(now: now)
                modelNow = max(modelNow, now)
                if inStep && target.failureReason == nil { model.expire(now: modelNow) }
                if target.appendedPosition != before && target.failureReason != nil {
                    return fail("step \(step): expiry logged after the log failed")
                }
            case 18 where idle.count == inFlight.count && target.failureReason == nil && Int.random(in: 0..<8, using: &rng) == 0:
                // A promotion: with no change in flight, the engine stops taking changes, logs a new
                // term and takes changes again once it is durable. Crashes after it recover the term
                // (the state hash covers the epoch history); replay refuses an epoch that does not grow.
                let engine = target.engine
                let epoch = engine.epochs.lastEpoch + UInt64.random(in: 1...3, using: &rng)
                let before = target.appendedPosition
                engine.role.setReadOnly(true)
                let started = Task { () throws(Rejection) -> UInt64 in try await engine.startEpoch(epoch) }
                while target.appendedPosition == before && target.failureReason == nil { await Task.yield() }
                report.syncs += 1
                target.sync()
                let result = await started.result
                engine.role.setReadOnly(false)
                if case .success(let position) = result {
                    report.epochs += 1
                    model.startTerm(epoch: epoch)
                    guard position == before + 1, engine.epochs.last == EpochHistory.Term(epoch: epoch, start: position) else {
                        return fail("step \(step): epoch \(epoch) logged at \(position) after \(before), history \(engine.epochs.terms)")
                    }
                }
                if target.failureReason != nil { inStep = false }
            case 19 where options.disk && Int.random(in: 0..<2, using: &rng) == 0:
                // A consumer reads the durable log (EVENTS, a replica's stream) while batches wait.
                if let problem = target.readEvents(rng: &rng, report: &report) { return fail("step \(step): \(problem)") }
            case 17 where options.disk && Int.random(in: 0..<4, using: &rng) == 0:
                // A snapshot of what is durable, and pruning behind it (while batches wait for syncs).
                report.snapshots += 1
                if let problem = await target.snapshot() { return fail("step \(step): \(problem)") }
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
        report.syncs += 1
        target.sync()
        if target.failureReason != nil { target.failSync() }
        if let problem = await settle() { return fail("end: \(problem)") }
        if let disk = target as? DiskTarget { report.diskFaults = disk.disk.counters.injectedFaults }
        eventSink.finish()
        return report
    }
}

/// Whether two replies are the same, the ids in them compared by their bytes too: `Reply`'s `==`
/// compares them with `Name`'s own equality, which the simulator checks rather than trusts.
func sameReply(_ a: Reply, _ b: Reply) -> Bool { a == b && idBytes(a) == idBytes(b) }

/// The bytes of every id in a reply, in order (none for most replies).
func idBytes(_ reply: Reply) -> [[UInt8]] {
    func order(_ info: OrderInfo) -> [[UInt8]] { [info.user.bytes] + info.lines.map(\.sku.bytes) }
    switch reply {
    case .stock(let info): return [info.sku.bytes]
    case .order(let info): return order(info)
    case .orders(let infos): return infos.flatMap(order)
    case .audit(let findings): return findings.map(\.sku.bytes)
    case .done, .reserved, .orderState, .deducted, .rejected: return []
    }
}
