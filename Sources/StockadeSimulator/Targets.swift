import StockadeCore
import StockadeJournal

#if canImport(Glibc)
import Glibc
#endif

/// What the simulator runs the engine on: an in-memory log (fast, many seeds) or the real journal,
/// store, snapshots and recovery on a ``SimulatedStorage`` disk (torn writes, lost unsynced bytes, bit
/// flips, EIO and ENOSPC on write, fsync and rename).
protocol SimulationTarget: AnyObject {
    var engine: Engine { get }
    /// The one executor every shard runs on: the stand-in for a server's event loop, on which
    /// ``Engine/executeLocally(_:now:localShards:)`` enters them in place.
    var loop: SimulatedLoop { get }
    var appendedPosition: UInt64 { get }
    var durablePosition: UInt64 { get }
    var waiterCount: Int { get }
    var failureReason: String? { get }
    /// Called each time a reply starts waiting for durability.
    func onSuspend(_ body: @escaping @Sendable () -> Void)
    /// Makes everything appended durable (or fails trying, on a faulty disk).
    func sync()
    /// The next sync fails (EIO).
    func failSync()
    /// The next write of records fails (ENOSPC).
    func failNextAppend()
    /// Writes a snapshot and prunes (the disk target); nil when it went through or was refused cleanly.
    func snapshot() async -> String?
    /// The state the log held durably at `position`, for the durability oracle.
    func durableState(through position: UInt64) throws -> EngineState
    /// What the last crash damaged at rest, for a failure's message.
    var damage: String? { get }
    /// A power cut (or, on a disk, sometimes the process killed alone) and a restart. Returns the
    /// recovered state, or a description of what went wrong.
    /// `flipped` reports whether the disk was damaged at rest on the way (a refusal is then allowed once).
    func crashAndRecover(rng: inout SplitMix64, report: inout Simulator.Report) async -> Result<EngineState, SimulationFailure>
}

struct SimulationFailure: Error, CustomStringConvertible {
    var description: String
}

/// The engine on ``SimulatedLog``: records kept in memory, replayed on restart.
final class MemoryTarget: SimulationTarget {
    private(set) var log: SimulatedLog
    private(set) var engine: Engine
    let shardCount: Int
    let loop = SimulatedLoop()

    init(shardCount: Int) {
        self.shardCount = shardCount
        log = SimulatedLog()
        engine = Engine(state: EngineState(shardCount: shardCount), log: log, executors: [loop.executor])
    }

    var appendedPosition: UInt64 { log.appendedPosition }
    var durablePosition: UInt64 { log.durablePosition }
    var waiterCount: Int { log.waiterCount }
    var failureReason: String? { log.failureReason }
    private var suspend: (@Sendable () -> Void)?
    func onSuspend(_ body: @escaping @Sendable () -> Void) {
        suspend = body
        log.onSuspend(body)
    }
    func sync() { log.sync() }
    func failSync() { log.failSync("EIO on fdatasync (injected)") }
    func failNextAppend() { log.failNextAppend("ENOSPC on write (injected)") }
    func snapshot() async -> String? { nil }
    var damage: String? { nil }

    func durableState(through position: UInt64) throws -> EngineState {
        var state = EngineState(shardCount: shardCount)
        for bytes in log.records(from: 0, to: position) {
            try bytes.withUnsafeBytes { raw in try Record.decodeAll(raw) { try state.apply($0) } }
        }
        return state
    }

    func crashAndRecover(rng: inout SplitMix64, report: inout Simulator.Report) async -> Result<EngineState, SimulationFailure> {
        let unsynced = Int(log.appendedPosition - log.durablePosition)
        let kept = unsynced == 0 ? 0 : Int.random(in: 0...unsynced, using: &rng)
        if kept > 0 { report.tornTails += 1 }
        let surviving = log.survivingRecords(keptBeyondDurable: kept)
        log.failSync("the process crashed")
        var recovered = EngineState(shardCount: shardCount)
        for (index, bytes) in surviving.enumerated() {
            do {
                try bytes.withUnsafeBytes { raw in try Record.decodeAll(raw) { try recovered.apply($0) } }
            } catch {
                return .failure(SimulationFailure(description: "recovery failed at record \(index + 1) of \(surviving.count): \(error)"))
            }
        }
        log = SimulatedLog(records: surviving)
        if let suspend { log.onSuspend(suspend) }
        engine = Engine(state: recovered, log: log, executors: [loop.executor])
        return .success(recovered)
    }
}

/// The engine on the real ``Store`` (journal without a writer thread, snapshots, recovery) on a
/// ``SimulatedStorage`` disk with faults.
final class DiskTarget: SimulationTarget {
    let disk: SimulatedStorage
    let directory: DataDirectory
    let options: Store.Options
    private(set) var store: Store
    private var suspend: (@Sendable () -> Void)?
    private(set) var damage: String?
    let loop = SimulatedLoop()

    init(shardCount: Int, seed: UInt64) throws {
        var faults = SimulatedStorage.FaultPlan()
        faults.writeEIO = 0.002
        faults.writeENOSPC = 0.002
        faults.syncEIO = 0.002
        faults.renameEIO = 0.02
        faults.tornWrite = 0.003
        // Mostly segments written into allocated space; now and then a file that grows with each write.
        faults.preallocationRefused = 0.1
        disk = SimulatedStorage(seed: seed)
        directory = DataDirectory("/sim/data", storage: disk)
        var options = Store.Options(shardCount: shardCount)
        options.journal.writerThread = false
        // Small segments, so that snapshots prune and recovery crosses segment boundaries.
        options.journal.segmentBytesMax = 16 << 10
        options.shardExecutors = [loop.executor]
        self.options = options
        store = try Store(directory: directory, options: options)
        disk.faults = faults
    }

    var engine: Engine { store.engine }
    var appendedPosition: UInt64 { store.journal.lastAppendedLSN }
    var durablePosition: UInt64 { store.journal.lastDurableLSN }
    var waiterCount: Int { store.journal.waiterCount }
    var failureReason: String? { store.journal.failure }
    func onSuspend(_ body: @escaping @Sendable () -> Void) {
        suspend = body
        store.journal.onWaiting(body)
    }
    func sync() { _ = store.journal.writePending() }
    func failSync() {
        // Only when there is something to sync: an armed fault would otherwise wait for a later write.
        guard appendedPosition > durablePosition else { return }
        disk.failNext(.sync)
        _ = store.journal.writePending()
    }
    func failNextAppend() { disk.failNext(.write, errno: ENOSPC) }

    func snapshot() async -> String? {
        guard store.journal.failure == nil else { return nil }
        do {
            _ = try await store.snapshot()
        } catch {
            // A snapshot that could not be written (rename EIO) is no harm; the log still has everything.
        }
        return nil
    }

    func durableState(through position: UInt64) throws -> EngineState {
        try Recovery.recover(directory, options: Recovery.Options(shardCount: options.shardCount, repair: false, upToLSN: position)).0
    }

    func crashAndRecover(rng: inout SplitMix64, report: inout Simulator.Report) async -> Result<EngineState, SimulationFailure> {
        // Now and then the process alone dies (`kill -9`): the page cache keeps what it wrote and did
        // not sync, which the next process recovers; a later power cut must not take that back.
        if Int.random(in: 0..<4, using: &rng) == 0 {
            disk.processKilled()
            report.kills += 1
        } else {
            disk.crash()
        }
        // The dead process's journal can write no more: its parked replies are failed.
        _ = store.journal.writePending()
        let saved = disk.faults
        disk.faults = SimulatedStorage.FaultPlan()
        defer { disk.faults = saved }
        // Sometimes the medium is also damaged at rest: one bit of one file.
        var flipped: (path: String, offset: Int, bit: Int)?
        damage = nil
        if Int.random(in: 0..<5, using: &rng) == 0, let files = try? directory.storage.list(directory.path).filter({ $0.hasSuffix(".log") || $0.hasSuffix(".snap") }),
           let file = files.sorted().randomElement(using: &rng)
        {
            let path = directory.path + "/" + file
            if let size = disk.contents(path)?.count, size > 0 {
                let where_ = disk.flipRandomBit(path)
                flipped = (path, where_.offset, where_.bit)
                damage = "bit \(where_.bit) of byte \(where_.offset) of \(file) (\(size) bytes) flipped"
                report.bitFlips += 1
            }
        }
        do {
            store = try Store(directory: directory, options: options)
        } catch {
            guard let flip = flipped else {
                return .failure(SimulationFailure(description: "recovery refused after a power cut alone: \(error)"))
            }
            let message = "\(error)"
            guard message.contains(directory.path) else {
                return .failure(SimulationFailure(description: "a refusal that names no file: \(message)"))
            }
            report.refusedStartUps += 1
            // The operator restores the damaged byte; start-up must then succeed.
            disk.flipBit(flip.path, at: flip.offset, bit: flip.bit)
            do {
                store = try Store(directory: directory, options: options)
            } catch {
                return .failure(SimulationFailure(description: "recovery refused with the damage repaired: \(error)"))
            }
        }
        if let suspend { store.journal.onWaiting(suspend) }
        if store.recovery.tornTail != nil { report.tornTails += 1 }
        return .success(await store.engine.captureState(lsn: store.journal.lastAppendedLSN))
    }
}

/// The simulator's stand-in for an event loop: an actor on the executor all the target's shards run
/// on, so a batch can run in place on it (``Engine/executeLocally(_:now:localShards:)``) as a
/// connection's batch does on a server loop.
actor SimulatedLoop {
    nonisolated let executor = QueueExecutor(label: "stockade-simulated-loop")
    nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    /// Runs `commands` in place, treating the shards flagged in `local` as this loop's.
    func runLocally(_ engine: Engine, _ commands: [Command], now: Int64, local: [Bool]) -> Engine.LocalOutcome {
        engine.executeLocally(commands, now: now, localShards: local)
    }
}
