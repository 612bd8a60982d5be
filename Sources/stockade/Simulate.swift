import ArgumentParser
import Foundation
import StockadeSimulator

/// `stockade simulate`: runs the deterministic simulator over many seeds, or replays one.
struct Simulate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the deterministic simulator (engine + log under faults, checked against a model).",
        discussion: """
            Each seed runs a few hundred steps: clients' pipelined batches, syncs, timer ticks, clock jumps \
            forward and back, failed appends and syncs, crashes with torn tails. A failing seed prints its \
            number; `stockade simulate --seed N` replays it exactly. Exit status 1 when any seed fails.
            """)

    @Option(help: "Replay this one seed and print its report.")
    var seed: UInt64?

    @Option(help: "First seed of the run.")
    var from: UInt64 = 1

    @Option(help: "Seeds to run (ignored with --seconds).")
    var seeds: UInt64 = 1_000

    @Option(help: "Run seeds for this many seconds instead of a fixed count.")
    var seconds: Double?

    @Option(help: "Steps per seed.")
    var steps = 400

    @Flag(help: "Run on the real journal, snapshots and recovery on a simulated faulty disk.")
    var disk = false

    func validate() throws {
        guard steps >= 1 && steps <= 1_000_000 else { throw ValidationError("--steps must be 1 to 1000000") }
        guard seeds >= 1 else { throw ValidationError("--seeds must be at least 1") }
        if let seconds, !(seconds > 0 && seconds <= 7 * 24 * 3600) { throw ValidationError("--seconds must be above 0 and at most a week") }
    }

    func run() async throws {
        var options = Simulator.Options()
        options.steps = steps
        options.disk = disk
        if let seed {
            let report = await Simulator.run(seed: seed, options: options)
            print(report)
            if report.failure != nil { throw ExitCode(1) }
            return
        }
        let started = Date()
        var total = Simulator.Report(seed: 0)
        var ran: UInt64 = 0
        var failed: [UInt64] = []
        var next = from
        while seconds.map({ Date().timeIntervalSince(started) < $0 }) ?? (ran < seeds) {
            let report = await Simulator.run(seed: next, options: options)
            ran += 1
            total.batches += report.batches
            total.commands += report.commands
            total.acknowledged += report.acknowledged
            total.crashes += report.crashes
            total.kills += report.kills
            total.tornTails += report.tornTails
            total.syncFailures += report.syncFailures
            total.appendFailures += report.appendFailures
            total.clockJumpsBack += report.clockJumpsBack
            total.durabilityChecks += report.durabilityChecks
            total.inPlaceBatches += report.inPlaceBatches
            total.quietRecoveries += report.quietRecoveries
            total.epochs += report.epochs
            total.snapshots += report.snapshots
            total.diskFaults += report.diskFaults
            total.bitFlips += report.bitFlips
            total.refusedStartUps += report.refusedStartUps
            total.eventReads += report.eventReads
            total.eventReadsRefused += report.eventReadsRefused
            total.eventReadsFromTail += report.eventReadsFromTail
            total.snapshotsMatched += report.snapshotsMatched
            total.foreignSnapshots += report.foreignSnapshots
            if report.failure != nil {
                failed.append(next)
                print(report)
                print("replay: stockade simulate --seed \(next) --steps \(steps)\(disk ? " --disk" : "")")
            }
            next &+= 1
        }
        let elapsed = Date().timeIntervalSince(started)
        print("""
            \(ran) seeds (\(from)...\(from &+ ran &- 1)) in \(String(format: "%.1f", elapsed)) s: \(failed.count) failed; \
            \(total.batches) batches (\(total.inPlaceBatches) run in place), \(total.commands) commands, \(total.acknowledged) acknowledged batches, \
            \(total.crashes) crashes (\(total.tornTails) with a torn tail, \(total.kills) of the process alone), \(total.syncFailures) sync failures, \
            \(total.appendFailures) append failures, \(total.clockJumpsBack) clock jumps back, \
            \(total.durabilityChecks) durability checks, \(total.quietRecoveries) recoveries compared by state hash, \(total.epochs) epochs started\
            \(disk ? "; \(total.snapshots) snapshots, \(total.diskFaults) disk faults, \(total.bitFlips) bit flips, \(total.refusedStartUps) refused start-ups, \(total.eventReads) log reads checked (\(total.eventReadsFromTail) from memory, \(total.eventReadsRefused) refused on damage), \(total.snapshotsMatched) snapshots matched with the log, \(total.foreignSnapshots) of another log skipped" : "")
            """)
        if !failed.isEmpty { throw ExitCode(1) }
    }
}
