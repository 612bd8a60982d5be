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
    /// A consumer's reads of the durable log (EVENTS, a replica's stream) from random positions, each
    /// checked against the log's files walked whole; nil when every read was right.
    func readEvents(rng: inout SplitMix64, report: inout Simulator.Report) -> String?
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

    let slicing: Engine.Slicing

    init(shardCount: Int, seed: UInt64) {
        self.shardCount = shardCount
        slicing = Engine.Slicing(simulating: seed)
        log = SimulatedLog()
        engine = Engine(state: EngineState(shardCount: shardCount), log: log, executors: [loop.executor], slicing: slicing)
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
    func readEvents(rng: inout SplitMix64, report: inout Simulator.Report) -> String? { nil }

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
        engine = Engine(state: recovered, log: log, executors: [loop.executor], slicing: slicing)
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
        // The newest records in memory for readers: none, a few batches' worth, or the whole run.
        options.journal.tailBytesMax = [0, 512, 4 << 10, 4 << 20][Int(seed % 4)]
        options.shardExecutors = [loop.executor]
        options.slicing = Engine.Slicing(simulating: seed)
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

    func readEvents(rng: inout SplitMix64, report: inout Simulator.Report) -> String? {
        let durable = store.journal.lastDurableLSN
        guard durable > 0 else { return nil }
        let log: LogFiles
        do { log = try LogFiles(directory) } catch { return "the log's files could not be listed or read: \(error)" }
        // The readers the server uses: the journal's newest records in memory, then the files
        // through its block index (taught by every read); and the files alone.
        let journal = store.journal
        let readers = [
            LogReader(directory: directory, index: journal.blockIndex, tail: journal.tail),
            LogReader(directory: directory, index: journal.blockIndex),
        ]
        for _ in 0..<Int.random(in: 1...4, using: &rng) {
            let reader = readers[Int.random(in: 0..<2, using: &rng)]
            report.eventReads += 1
            // Mostly near the end (a consumer keeping up), sometimes anywhere.
            let from = Bool.random(using: &rng)
                ? UInt64.random(in: 1...durable, using: &rng) : durable - UInt64.random(in: 0...min(durable - 1, 40), using: &rng)
            let count = Int.random(in: 1...(Bool.random(using: &rng) ? 3 : 300), using: &rng)
            let end = min(from + UInt64(count), durable + 1)  // positions from..<end are asked for
            // A read walks a segment's block headers from its start (or from a block it learned): damage
            // anywhere in a segment it walks may refuse it; none may make it answer wrongly.
            let clean = !log.damaged(from: from, through: end - 1, durable: durable)
            if let tail = reader.tail, tail.records(from: from, count: count, durable: durable) != nil { report.eventReadsFromTail += 1 }
            do throws(LogReader.ReadError) {
                let got = try reader.read(from: from, count: count, durable: durable)
                for (i, event) in got.enumerated() {
                    guard event.position == from + UInt64(i) else {
                        return "EVENTS \(from) COUNT \(count) (durable \(durable)): position \(event.position) at index \(i)"
                    }
                    if let want = log.records[event.position], want != event.record {
                        return "EVENTS \(from) COUNT \(count) (durable \(durable)): position \(event.position) read as \(event.record), the file holds \(want)"
                    }
                }
                if clean, got.count != Int(end - from) {
                    return "EVENTS \(from) COUNT \(count) (durable \(durable)): \(got.count) records, the files hold \(end - from)"
                }
                if from < log.oldest { return "EVENTS \(from): answered, but the oldest segment starts at \(log.oldest)" }
            } catch {
                switch error {
                case .trimmed(let oldest):
                    guard from < log.oldest, oldest == log.oldest else {
                        return "EVENTS \(from): trimmed at \(oldest), the oldest segment starts at \(log.oldest)"
                    }
                case .unreadable(let why):
                    // Only where the files themselves do not hold the range (damage at rest, a cut segment).
                    if clean, from >= log.oldest { return "EVENTS \(from) COUNT \(count) (durable \(durable)): unreadable (\(why)), but the files hold it" }
                    report.eventReadsRefused += 1
                }
            }
            // A replica's stream: whole blocks as written, from the one holding `from`.
            let bytesMax = Int.random(in: 1...20_000, using: &rng)
            do throws(LogReader.ReadError) {
                let blocks = try reader.readBlocks(from: from, bytesMax: bytesMax, durable: durable)
                var next = from
                for block in blocks {
                    guard block.firstLSN <= next, block.lastLSN >= next, block.lastLSN <= durable else {
                        return "blocks from \(from) (durable \(durable)): block \(block.firstLSN)...\(block.lastLSN) where \(next) was next"
                    }
                    if let want = log.blocks[block.firstLSN], want != block.bytes {
                        return "blocks from \(from): the block at \(block.firstLSN) differs from the file's"
                    }
                    next = block.lastLSN + 1
                }
                if blocks.isEmpty, from >= log.oldest, !log.damaged(from: from, through: durable, durable: durable) {
                    return "blocks from \(from) (durable \(durable)): none, but the files hold a durable block there"
                }
            } catch {
                switch error {
                case .trimmed(let oldest):
                    guard from < log.oldest, oldest == log.oldest else { return "blocks from \(from): trimmed at \(oldest), oldest \(log.oldest)" }
                case .unreadable(let why):
                    if from >= log.oldest, !log.damaged(from: from, through: durable, durable: durable) {
                        return "blocks from \(from) (durable \(durable)): unreadable (\(why)), but the files hold it"
                    }
                }
            }
        }
        return nil
    }

    /// Writes a snapshot of another log into the directory and returns its path, or nil when there
    /// is no room for one: at a position P the log holds past its newest snapshot, the state this log
    /// had at P - 1 plus a SKU it never had, naming last records other than the log's.
    private func copyInForeignSnapshot(rng: inout SplitMix64) -> String? {
        let newest = (try? directory.snapshots().last?.lsn) ?? 0
        let position = newest + UInt64.random(in: 2...60, using: &rng)
        let reader = LogReader(directory: directory)
        guard let ours = reader.snapshotFingerprint(through: position, durable: position),
              var state = try? Recovery.recover(directory, options: Recovery.Options(shardCount: options.shardCount, repair: false, upToLSN: position - 1)).0,
              state.lsn == position - 1
        else { return nil }
        let sku = Name("another-log-\(position)")
        let shard = Engine.shardIndex(of: sku, shardCount: state.shards.count)
        guard (try? state.apply(.skuAdded(shard: shard, skuIndex: UInt32(state.shards[shard].skuCount), sku: sku, total: 5, limit: 0))) != nil
        else { return nil }
        let theirs = ours.differing(by: UInt32(truncatingIfNeeded: rng.next()))
        return try? SnapshotFile.write(state, lastRecords: theirs, to: directory).path
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
        // Sometimes, with no damage, a snapshot of another log is copied in (a restore into the wrong
        // directory): at a position this log holds, newer than its own snapshots, of a state this log
        // never had. Recovery must skip it for its own.
        let foreign = flipped == nil && Int.random(in: 0..<6, using: &rng) == 0 ? copyInForeignSnapshot(rng: &rng) : nil
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
        // The copy put in above must be skipped, and nothing else: a snapshot of this log taken for
        // another's is a false alarm (the fingerprint written or compared wrong), which could refuse a
        // start-up it should not.
        if let foreign {
            guard store.recovery.foreignSnapshots.count == 1, store.recovery.foreignSnapshots[0].hasPrefix(foreign + ":"),
                  store.recovery.snapshotPath != foreign
            else {
                return .failure(SimulationFailure(description: "a snapshot of another log copied in as \(foreign) was not skipped: \(store.recovery)"))
            }
            report.foreignSnapshots += 1
            // The operator removes it once the start-up log names it.
            try? disk.remove(foreign)
            try? disk.syncDirectory(directory.path)
        } else if !store.recovery.foreignSnapshots.isEmpty {
            return .failure(SimulationFailure(description: "a snapshot of this log taken for another log's: \(store.recovery)"))
        }
        if store.recovery.snapshotMatchedLog { report.snapshotsMatched += 1 }
        // A snapshot holds only what was durable when it was written, and a power cut takes nothing
        // durable: the log must reach its position unless a flipped bit cut it short.
        if store.recovery.snapshotPastLogEnd, flipped == nil {
            return .failure(SimulationFailure(description: "the snapshot used is past the end of the log after a crash alone: \(store.recovery)"))
        }
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

/// The log as its segment files hold it, walked here without ``LogReader`` (each file read whole,
/// its blocks checked and decoded one after another): the truth a consumer's reads are held to. A
/// segment's blocks count up to the first that does not verify (the end of what was written, or
/// damage) and below the next segment's first position (a tail that recovery left behind a later
/// segment is not the log's).
struct LogFiles {
    /// Records by position.
    var records: [UInt64: Record] = [:]
    /// Blocks as written, by their first position.
    var blocks: [UInt64: [UInt8]] = [:]
    /// Each segment's first position, the position after its last block that verified, and the
    /// next segment's first position (nil for the last).
    private var segments: [(first: UInt64, walkedTo: UInt64, following: UInt64?)] = []
    /// The first position of the oldest segment (1 with no segment).
    var oldest: UInt64 = 1

    init(_ directory: DataDirectory) throws {
        let listed = try directory.segments()
        oldest = listed.first?.firstLSN ?? 1
        for (i, segment) in listed.enumerated() {
            let following = i + 1 < listed.count ? listed[i + 1].firstLSN : nil
            let bytes = try directory.storage.readAll(segment.path)
            var offset = SegmentHeader.size
            var next = segment.firstLSN
            walk: while offset < bytes.count {
                switch bytes.withUnsafeBytes({ BlockCodec.read($0, at: offset) }) {
                case .block(let header, let payload):
                    guard header.recordCount > 0, header.firstLSN == next,
                          header.firstLSN + UInt64(header.recordCount) <= following ?? .max
                    else { break walk }
                    var position = header.firstLSN
                    var decoded: [(UInt64, Record)] = []
                    do {
                        try payload.withUnsafeBytes { raw in
                            try Record.decodeAll(raw) { record in
                                decoded.append((position, record))
                                position += 1
                            }
                        }
                    } catch {
                        break walk
                    }
                    guard decoded.count == header.recordCount else { break walk }
                    for (p, record) in decoded { records[p] = record }
                    blocks[header.firstLSN] = Array(bytes[offset..<offset + header.totalLength])
                    next = position
                    offset += header.totalLength
                case .truncated, .invalid:
                    break walk
                }
            }
            segments.append((segment.firstLSN, next, following))
        }
    }

    /// Whether a segment that holds any of `from...through` stops short of what the log must hold
    /// there (damage, or a file cut short): up to the next segment's start, or for the last segment
    /// up to `durable`.
    func damaged(from: UInt64, through: UInt64, durable: UInt64) -> Bool {
        for (i, segment) in segments.enumerated() {
            let end = segment.following ?? (durable + 1)  // the positions this segment must hold: first..<end
            let holdsAny = segment.first <= through && from < end
            // A read from inside the previous segment's range begins in the last segment at or before it.
            let startsHere = segment.first <= from && (i + 1 == segments.count || segments[i + 1].first > from)
            if (holdsAny || startsHere) && segment.walkedTo < min(end, through + 1) { return true }
        }
        return false
    }
}

extension Engine.Slicing {
    /// A seed's slicing: in two seeds of three, an AUDIT of every SKU and an ORDERS' walk are cut
    /// into slices of one to three SKUs or orders (one per call, no time budget), so that the model's
    /// check covers work resumed across calls (and across the other batches of a run); otherwise the
    /// server's.
    init(simulating seed: UInt64) {
        switch seed % 3 {
        case 0: self.init()
        default: self.init(auditSKUs: Int(seed / 3 % 3) + 1, ordersWalkSteps: Int(seed / 9 % 3) + 1, nanos: 0)
        }
    }
}
