import ArgumentParser
import CJemalloc
import Foundation
import StockadeCore
import StockadeJournal
import StockadeServer

@main
struct Stockade: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stockade",
        abstract: "An in-memory, sharded order engine for flash sales, with a write-ahead log.",
        discussion: "Start a server with `stockade serve` (data in ./data); try it without a server with `stockade demo`.",
        version: stockadeVersion,
        subcommands: [Serve.self, Bench.self, Demo.self, Inspect.self, Snapshot.self, Measure.self, Simulate.self, SinkCommand.self, CrashWorker.self])
}

/// Options every command that opens a data directory shares.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: "Data directory (log segments and snapshots). Default: ./data (demo: a new temporary directory).")
    var dataDir: String?

    /// The directory to open: the flag, or ./data (where `make run` keeps its data).
    var path: String { dataDir ?? "./data" }

    @Option(name: .long, help: "Shards for a new data directory (an existing one keeps its own). Default: cores.")
    var shards = ProcessInfo.processInfo.activeProcessorCount

    @Option(name: .long, help: "always (answer after fdatasync), everysec, none.")
    var fsync = "always"

    @Flag(name: .long, help: "On mid-log corruption, truncate the log there instead of refusing to start; past an unreadable snapshot the log no longer covers, start from what the log holds.")
    var truncateCorrupt = false

    func validate() throws {
        guard FsyncPolicy(rawValue: fsync) != nil else { throw ValidationError("--fsync must be always, everysec or none") }
        guard shards >= 1 && shards <= Limits.shardCountMax else { throw ValidationError("--shards must be 1 to \(Limits.shardCountMax)") }
    }

    func open(at directory: String? = nil) throws -> Store {
        var options = Store.Options(shardCount: shards)
        options.journal.fsync = FsyncPolicy(rawValue: fsync)!
        options.truncateCorrupt = truncateCorrupt
        return try Store(path: directory ?? path, options: options)
    }
}

/// A failure a person can act on, printed as `Error: <message>` with exit status 1.
struct CommandError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func log(_ message: String) {
    try? FileHandle.standardError.write(contentsOf: Data("[stockade] \(message)\n".utf8))
}

/// A built-in flash sale: recover, sell, snapshot, restart, compare. In a temporary directory
/// (removed afterwards) unless `--data-dir` names one, so it never writes into a server's data.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a flash sale in process, snapshot it, recover it again and check the state matches.",
        discussion: "Uses a new temporary directory, removed at the end, unless --data-dir names one (which then keeps the sale).")

    @OptionGroup var store: StoreOptions

    @Option(help: "Users racing for the stock.")
    var users = 20_000

    @Option(help: "Units of stock of the demo SKU.")
    var stock: Int64 = 1_000

    func run() async throws {
        let directory: String
        var temporary: String?
        if let given = store.dataDir {
            directory = given
        } else {
            var template = Array((NSTemporaryDirectory() as NSString).appendingPathComponent("stockade-demo-XXXXXX").utf8CString)
            guard let made = mkdtemp(&template) else { throw ValidationError("cannot create a temporary directory: \(String(cString: strerror(errno)))") }
            directory = String(cString: made)
            temporary = directory
            log("data directory: \(directory) (temporary, removed at the end; --data-dir DIR keeps it)")
        }
        defer { if let temporary { try? FileManager.default.removeItem(atPath: temporary) } }
        try await sell(in: directory)
    }

    private func sell(in directory: String) async throws {
        let opened = try store.open(at: directory)
        log("recovery: \(opened.recovery)")
        let engine = opened.engine
        let sku = Name("demo-\(wallClockMillis())")
        _ = await engine.execute(.addSku(sku: sku, total: stock, limit: 1), now: wallClockMillis())
        let started = monotonicNanos()
        var reserved: [OrderID] = []
        var soldOut = 0
        let batch = 256
        for first in stride(from: 0, to: users, by: batch) {
            let commands = (first..<min(users, first + batch)).map {
                Command.reserve(user: Name("user-\($0)"), lines: [OrderLine(sku: sku, quantity: 1)], requestId: Name("r\($0)"), ttlMillis: 60_000)
            }
            for reply in await engine.execute(commands, now: wallClockMillis()) {
                switch reply {
                case .reserved(let id, _, _): reserved.append(id)
                case .rejected(.soldOut): soldOut += 1
                default: break
                }
            }
        }
        let seconds = Double(monotonicNanos() - started) / 1e9
        log(String(format: "%d users asked for %lld units: %d holds, %d sold out, in %.3f s", users, stock, reserved.count, soldOut, seconds))
        // Half pay, a quarter cancel, the rest stay pending until their deadline.
        var commands: [Command] = []
        for (i, id) in reserved.enumerated() where i % 4 != 3 { commands.append(i % 4 == 2 ? .cancel(id) : .confirm(id)) }
        _ = await engine.execute(commands, now: wallClockMillis())
        let info = await engine.execute(.stock(sku: sku), now: wallClockMillis())
        if case .stock(let s) = info {
            log("after payments: STOCK \(s.sku): total \(s.total) available \(s.available) reserved \(s.reserved) sold \(s.sold) limit \(s.limit) paused \(s.paused ? 1 : 0)")
        } else {
            log("STOCK \(sku) failed: \(info)")
        }
        let audit = await engine.execute(.audit(sku: nil), now: wallClockMillis())
        if case .audit(let findings) = audit, findings.contains(where: { !$0.ok }) {
            for finding in findings where !finding.ok { log("AUDIT FAILED: \(finding.sku): \(finding.problem)") }
            throw ExitCode(1)
        }
        let snapshot = try await opened.snapshot()
        log("\(snapshot)")
        let live = await engine.captureState(lsn: opened.journal.lastAppendedLSN)
        let stats = opened.journal.statistics
        log("journal: \(stats.records) records in \(stats.batches) batches, \(stats.syncs) fdatasyncs, \(stats.writtenBytes) bytes written")
        opened.close()

        let reopened = try store.open(at: directory)
        log("restart: \(reopened.recovery)")
        let recovered = await reopened.engine.captureState(lsn: reopened.journal.lastAppendedLSN)
        reopened.close()
        guard recovered.stateHash() == live.stateHash() else {
            log("RECOVERED STATE DIFFERS: live \(String(live.stateHash(), radix: 16)), recovered \(String(recovered.stateHash(), radix: 16))")
            throw ExitCode(1)
        }
        log("recovered state hash \(String(recovered.stateHash(), radix: 16)) matches the live state; audit OK")
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List snapshots, log segments and blocks of a data directory and verify every checksum.")

    @Argument(help: "The data directory.")
    var dataDir: String

    @Flag(help: "Print every record too.")
    var records = false

    func run() throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dataDir, isDirectory: &isDirectory) else {
            throw CommandError("\(dataDir) does not exist")
        }
        guard isDirectory.boolValue else { throw CommandError("\(dataDir) is not a directory") }
        let directory = DataDirectory(dataDir)
        if try directory.snapshots().isEmpty && directory.segments().isEmpty {
            throw CommandError("\(dataDir) holds no snapshot and no log segment: not a Stockade data directory")
        }
        let ok = try Inspector.inspect(directory, records: records) { print($0) }
        if !ok { throw ExitCode(1) }
    }
}

struct Snapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Recover a data directory and write a snapshot of it.")

    @OptionGroup var store: StoreOptions

    func run() async throws {
        let opened = try store.open()
        log("recovery: \(opened.recovery)")
        let report = try await opened.snapshot()
        opened.close()
        print(report)
    }
}

/// Used by the crash test: reserves under load and prints each acknowledged hold, until killed.
struct CrashWorker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "crash-worker", abstract: "Test helper: reserve under load, print acknowledgements, until killed.",
        shouldDisplay: false)

    @OptionGroup var store: StoreOptions

    @Option(help: "SKUs to sell.")
    var skus = 4

    @Option(help: "Stock of each SKU.")
    var stock: Int64 = 1_000_000

    @Option(help: "Concurrent clients.")
    var clients = 8

    @Option(help: "Take a snapshot every this many batches of a client (0: never).")
    var snapshotEvery = 0

    func run() async throws {
        let opened = try store.open()
        let engine = opened.engine
        let names = (0..<skus).map { Name("crash-sku-\($0)") }
        for name in names { _ = await engine.execute(.addSku(sku: name, total: stock, limit: 0), now: wallClockMillis()) }
        let runID = UInt64(getpid())
        ackOutput.write("READY\n")
        await withTaskGroup(of: Void.self) { group in
            for client in 0..<clients {
                group.addTask {
                    var n = 0
                    while true {
                        n += 1
                        let commands = (0..<16).map { k in
                            Command.reserve(
                                user: Name("u\(runID)-\(client)-\(n)-\(k)"), lines: [OrderLine(sku: names[(client + k) % names.count], quantity: 1)],
                                requestId: nil, ttlMillis: Limits.ttlMillisMax)
                        }
                        let replies = await engine.execute(commands, now: wallClockMillis())
                        var lines = ""
                        for (command, reply) in zip(commands, replies) {
                            guard case .reserved(let id, _, _) = reply, case .reserve(let user, let orderLines, _, _) = command else { continue }
                            lines += "ACK \(id) \(user) \(orderLines[0].sku)\n"
                        }
                        ackOutput.write(lines)
                        if snapshotEvery > 0, client == 0, n % snapshotEvery == 0 { _ = try? await opened.snapshot() }
                    }
                }
            }
        }
    }
}

/// Serializes acknowledgement lines to stdout: a line is printed only after its reply was durable.
let ackOutput = AckOutput()

final class AckOutput: Sendable {
    private let lock = NSLock()
    func write(_ text: String) {
        guard !text.isEmpty else { return }
        lock.lock()
        try? FileHandle.standardOutput.write(contentsOf: Data(text.utf8))
        lock.unlock()
    }
}
