import ArgumentParser
import Foundation
import StockadeBench

/// `stockade bench`: drives a flash-sale scenario against a running server and reports.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a flash-sale load against a running Stockade (or Redis + Lua) and audit the outcome.",
        discussion: """
            Scenarios: sellout (K SKUs with stock S, far more requests than stock, per-user limit), sustained \
            (stock never runs out; closed loop, or open loop with --rate), lifecycle (reserve, then confirm / cancel / \
            let expire; the server must match the harness's record). Exit status 1 when an audit fails.

            Each run creates its own SKUs (bench-<run>-<n>) and says what it sends. A RESERVE places a hold, \
            not a sale: holds and sales are reported apart. At the end the harness cancels its holds, empties and \
            pauses its SKUs (the protocol cannot delete a SKU); --keep leaves everything as the load left it.
            """)

    @Argument(help: "sellout, sustained or lifecycle.")
    var scenario: String = "sellout"

    @Option(help: "stockade://host:port or redis://host:port (Redis with the Lua stock script).")
    var target = "stockade://127.0.0.1:7379"

    @Option(help: "Run the same scenario against this target afterwards and print both with the ratio.")
    var compare: String?

    @Option(help: "Password (AUTH) for the targets.")
    var password: String?

    @Option(help: "SKUs.") var skus = 10
    @Option(help: "Stock of each SKU (sellout, lifecycle).") var stock = 1_000
    @Option(help: "Distinct users.") var users = 1_000_000
    @Option(help: "Per-user limit of each SKU (sellout, lifecycle; 0: none).") var limit = 1
    @Option(name: [.short, .long], help: "Connections.") var connections = 50
    @Option(name: [.customShort("P"), .long], help: "Requests in flight per connection (closed loop).") var pipeline = 16
    @Option(name: [.customShort("n"), .long], help: "Reservations to send.") var requests = 1_000_000
    @Option(help: "Send for this many seconds instead of a count.") var duration: Double?
    @Option(help: "Open loop: offered requests per second (latency from the intended send time).") var rate: Double?
    @Option(help: "Zipf exponent of SKU popularity (hot spots); uniform when absent.") var zipf: Double?
    @Option(help: "Lifecycle: percent of holds confirmed.") var confirm = 50
    @Option(help: "Lifecycle: percent of holds cancelled (the rest expire).") var cancel = 25
    @Option(help: "Lifecycle: hold TTL in ms.") var ttl = 2_000
    @Option(name: .customLong("hold-ttl"), help: "Sellout, sustained: hold TTL in ms (the holds are cancelled at the end; the TTL bounds them if the run is killed).")
    var holdTTL = 300_000
    @Flag(help: "Leave the holds and SKUs on the target (no cleanup).") var keep = false
    @Option(name: .customLong("acknowledged-orders"), help: "Sellout, sustained: write the id of every acknowledged hold to this file, one per line (for a failover audit).")
    var acknowledgedOrders: String?
    @Option(help: "Client event-loop threads.") var clientThreads = 1
    @Option(help: "Seed of the request choices.") var seed: UInt64 = 1
    @Flag(help: "Print the report as JSON.") var json = false
    @Flag(help: "No live progress line.") var quiet = false

    func run() async throws {
        guard let scenario = BenchOptions.Scenario(rawValue: scenario) else {
            throw ValidationError("scenario must be sellout, sustained or lifecycle")
        }
        guard let first = BenchTarget(url: target) else { throw ValidationError("--target must be stockade://host:port or redis://host:port") }
        var options = BenchOptions()
        options.scenario = scenario
        options.target = first
        options.password = password
        options.skus = skus
        options.stock = stock
        options.users = users
        options.limit = limit
        options.connections = connections
        options.pipeline = rate == nil ? pipeline : 1
        options.requests = requests
        options.durationSeconds = duration
        options.rate = rate
        options.zipf = zipf
        options.confirmPercent = confirm
        options.cancelPercent = cancel
        options.ttlMillis = ttl
        options.holdTTLMillis = holdTTL
        options.keep = keep
        options.acknowledgedOrdersPath = acknowledgedOrders
        options.clientThreads = clientThreads
        options.progress = !quiet && !json
        options.seed = seed
        guard skus >= 1, stock >= 1, users >= 1, connections >= 1, pipeline >= 1, requests >= 1 else {
            throw ValidationError("counts must be at least 1")
        }
        guard (1...604_800_000).contains(ttl), (1...604_800_000).contains(holdTTL) else {
            throw ValidationError("--ttl and --hold-ttl must be 1 to 604800000 ms (7 days)")
        }
        // Every flag is checked here, before anything is sent: a run refused later would leave its
        // SKUs on the target.
        if let rate, !(rate.isFinite && rate >= 1 && rate <= 100_000_000) {
            throw ValidationError("--rate must be 1 to 100000000 requests a second")
        }
        if let duration, !(duration.isFinite && duration > 0 && duration <= 86_400) {
            throw ValidationError("--duration must be more than 0 and at most 86400 s")
        }
        if let zipf, !(zipf.isFinite && zipf >= 0 && zipf <= 100) {
            throw ValidationError("--zipf must be 0 to 100")
        }
        guard (0...100).contains(confirm), (0...100).contains(cancel), confirm + cancel <= 100 else {
            throw ValidationError("--confirm and --cancel are percents of the holds: each 0 to 100, together at most 100")
        }
        guard connections <= 100_000, pipeline <= 100_000 else {
            throw ValidationError("-c and -P must be at most 100000 (-c: each connection a socket, -P: requests in flight on each)")
        }
        guard limit >= 0, (1...1024).contains(clientThreads) else {
            throw ValidationError("--limit must be 0 or more, --client-threads 1 to 1024")
        }
        let most = users.multipliedReportingOverflow(by: limit)
        if scenario == .sellout, limit > 0, !most.overflow, most.partialValue < stock {
            throw ValidationError("\(users) users with a limit of \(limit) can hold at most \(users * limit) units of a SKU of \(stock): the sale cannot sell out (raise --users or --limit)")
        }
        if scenario == .lifecycle {
            if first.isRedis { throw ValidationError("lifecycle needs a Stockade target") }
            if let compare, BenchTarget(url: compare)?.isRedis == true {
                throw ValidationError("lifecycle needs a Stockade target: Redis + Lua has no orders to confirm or cancel, so --compare would set two different loads side by side")
            }
            if acknowledgedOrders != nil {
                throw ValidationError("--acknowledged-orders is for sellout and sustained: lifecycle's holds are confirmed, cancelled or left to expire")
            }
        }
        if let compare, BenchTarget(url: compare) == nil {
            throw ValidationError("--compare must be stockade://host:port or redis://host:port")
        }
        // The file is written when the run ends; a path that cannot be written is found now.
        if let acknowledgedOrders, !FileManager.default.createFile(atPath: acknowledgedOrders, contents: nil) {
            throw ValidationError("--acknowledged-orders: cannot create \(acknowledgedOrders)")
        }

        let log: @Sendable (String) -> Void = { try? FileHandle.standardError.write(contentsOf: Data("\($0)\n".utf8)) }
        var reports: [BenchReport] = []
        do {
            reports.append(try await Harness.run(options, log: log))
            if let compare, let second = BenchTarget(url: compare) {
                options.target = second
                reports.append(try await Harness.run(options, log: log))
            }
        } catch let error as BenchError {
            throw CommandError("bench: \(error.description)")
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(reports.count == 1 ? AnyReports.one(reports[0]) : AnyReports.many(reports)), as: UTF8.self))
        } else {
            for report in reports { print(report.text) }
            if reports.count == 2, reports.contains(where: { !$0.auditPassed }) {
                print("no ratio: an audit failed, so the two runs did not do the same work")
            } else if reports.count == 2 {
                let (a, b) = (reports[0], reports[1])
                print(String(format: "%@ / %@: throughput x%.2f; p50 %.3f ms against %.3f ms; p99 %.3f ms against %.3f ms",
                             a.system, b.system, a.throughput / b.throughput,
                             Double(a.latencyMicros["p50"] ?? 0) / 1000, Double(b.latencyMicros["p50"] ?? 0) / 1000,
                             Double(a.latencyMicros["p99"] ?? 0) / 1000, Double(b.latencyMicros["p99"] ?? 0) / 1000))
            }
        }
        if reports.contains(where: { !$0.auditPassed }) { throw ExitCode(1) }
    }
}

/// One report as an object, several as an array.
enum AnyReports: Encodable {
    case one(BenchReport)
    case many([BenchReport])
    func encode(to encoder: Encoder) throws {
        switch self {
        case .one(let r): try r.encode(to: encoder)
        case .many(let r): try r.encode(to: encoder)
        }
    }
}
