import Foundation
import Histogram
import NIOCore
import NIOPosix
import StockadeWire

/// What to run. Every field has a flag on `stockade bench`.
public struct BenchOptions: Sendable {
    public enum Scenario: String, Sendable, CaseIterable {
        /// K SKUs with stock S, far more requests than stock, per-user limit: sell out, then audit.
        case sellout
        /// Stock that never runs out: closed loop (max throughput) or open loop (--rate).
        case sustained
        /// Reserve, then confirm / cancel / let expire; the server must match the harness's record.
        case lifecycle
    }

    public var scenario = Scenario.sellout
    public var target = BenchTarget.stockade(host: "127.0.0.1", port: 7379)
    public var password: String?
    public var skus = 10
    public var stock = 1_000
    public var users = 1_000_000
    public var limit = 1
    public var connections = 50
    public var pipeline = 16
    public var requests = 1_000_000
    public var durationSeconds: Double?
    /// Open loop: requests per second offered, whatever the replies do.
    public var rate: Double?
    /// Zipf exponent of SKU popularity; nil: uniform.
    public var zipf: Double?
    public var confirmPercent = 50
    public var cancelPercent = 25
    /// Lifecycle: the TTL of the holds, which the scenario waits out.
    public var ttlMillis = 2_000
    /// Sellout and sustained: the TTL of the holds. They are cancelled at the end anyway; the TTL
    /// bounds how long they would stay if the harness were killed before cleaning up.
    public var holdTTLMillis = 300_000
    /// Leave the holds and SKUs as the load left them (no cleanup).
    public var keep = false
    /// Sellout, sustained: write the id of every hold the target acknowledged to this file, one per
    /// line, when the run ends (also when the target went away mid-run): what a failover audit checks
    /// against the node promoted in the target's place.
    public var acknowledgedOrdersPath: String?
    public var clientThreads = 1
    public var progress = true
    public var seed: UInt64 = 1

    public init() {}
}

/// A finished run: figures, outcomes, and the audit.
public struct BenchReport: Codable, Sendable {
    public var target: String
    public var system: String
    public var scenario: String
    public var connections: Int
    public var pipeline: Int
    public var offeredRate: Double?
    public var requests: Int
    public var seconds: Double
    public var throughput: Double
    public var latencyMicros: [String: UInt64]
    public var outcomes: [String: Int]
    /// Units acknowledged: holds on Stockade (orders that are not sales until confirmed), deductions on Redis + Lua.
    public var successes: Int
    /// Holds placed (Stockade RESERVE answered with an order id).
    public var holds: Int
    /// Units sold: confirmed orders on Stockade, successful deductions on Redis + Lua.
    public var sales: Int
    /// What the harness sent, one line each: setup, load, cleanup.
    public var plan: [String]
    /// What the cleanup did (empty with --keep).
    public var cleanup: [String]
    /// The SKUs of this run.
    public var skuNames: [String]
    public var sellOutSeconds: Double?
    public var auditPassed: Bool
    public var auditProblems: [String]
    public var errors: [String]
    /// What a reader of the figures should know: refusals counted in the rate, an open loop that
    /// fell behind its schedule.
    public var notes: [String]

    public var text: String {
        var lines: [String] = []
        lines.append("\(system) (\(target)), scenario \(scenario), \(connections) connections, pipeline \(pipeline)"
            + (offeredRate.map { String(format: ", offered %.0f/s", $0) } ?? ""))
        lines.append(String(format: "  %d requests in %.2f s: %.0f requests/s", requests, seconds, throughput))
        let l = latencyMicros
        lines.append(String(format: "  latency ms: p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f",
                            Double(l["p50"] ?? 0) / 1000, Double(l["p90"] ?? 0) / 1000, Double(l["p99"] ?? 0) / 1000,
                            Double(l["p99.9"] ?? 0) / 1000, Double(l["max"] ?? 0) / 1000))
        for line in plan { lines.append("  sent: \(line)") }
        lines.append("  outcomes: " + outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        lines.append("  holds placed: \(holds); units sold: \(sales)")
        if let sellOutSeconds {
            lines.append(String(format: "  all stock taken after %.3f s (%d units %@)", sellOutSeconds, successes, holds > 0 ? "held" : "sold"))
        }
        lines.append("  audit: " + (auditPassed ? "PASSED" : "FAILED: " + auditProblems.joined(separator: "; ")))
        for line in cleanup { lines.append("  cleanup: \(line)") }
        for error in errors { lines.append("  error: \(error)") }
        for note in notes { lines.append("  note: \(note)") }
        return lines.joined(separator: "\n")
    }
}

/// Runs a scenario against one target.
public enum Harness {
    public static func run(_ options: BenchOptions, log: @escaping @Sendable (String) -> Void) async throws -> BenchReport {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, options.clientThreads))
        do {
            let report = try await run(options, group: group, log: log)
            try? await group.shutdownGracefully()
            return report
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
    }

    private static func run(
        _ options: BenchOptions, group: MultiThreadedEventLoopGroup, log: @escaping @Sendable (String) -> Void
    ) async throws -> BenchReport {
        let control: CommandClient
        do {
            control = try await CommandClient.connect(group: group, target: options.target, password: options.password)
        } catch {
            throw BenchError(readableError(error, target: options.target))
        }
        defer { control.close() }

        // Fresh SKU names per run, so runs never collide in one server.
        let runID = String(UInt64(Date().timeIntervalSince1970 * 1000) % 100_000_000, radix: 36)
        let skuNames = (0..<options.skus).map { "bench-\(runID)-\($0)" }
        var dialect = Dialect(target: options.target)
        dialect.ttlMillis = options.scenario == .lifecycle ? options.ttlMillis : options.holdTTLMillis
        let stock = options.scenario == .sustained ? 1 << 40 : options.stock
        let limit = options.scenario == .sustained ? 0 : options.limit
        let plan = describePlan(options, dialect: dialect, skuNames: skuNames, stock: stock, limit: limit)
        for line in plan { log("sending: \(line)") }
        if options.target.isRedis {
            guard case .bulk(let sha?) = try await control.send(["SCRIPT", "LOAD", redisStockScript]) else {
                throw BenchError("SCRIPT LOAD failed")
            }
            dialect.scriptSHA = sha
        }
        var effective = options
        effective.limit = limit
        let state = RunState(options: effective, dialect: dialect, skuNames: skuNames, userPrefix: "u\(runID)-")

        // The load's connections, all open and answering PING before anything is created or timed:
        // a connection refused (the server's client limit, a password) stops the run here.
        let (channels, dones, recorders) = try await openLoadConnections(options, group: group, state: state)

        // Setup: fresh SKU names per run, so runs never collide in one server.
        do {
            if options.target.isRedis {
                for sku in skuNames {
                    _ = try await control.send(["SET", "stock:\(sku)", String(stock)])
                    _ = try await control.send(["DEL", "bought:\(sku)"])
                }
            } else {
                for sku in skuNames {
                    let reply = try await control.send(["SKU.ADD", sku, String(stock), "LIMIT", String(limit)])
                    guard reply == .simple("OK") else { throw BenchError("SKU.ADD \(sku): \(reply)") }
                }
            }
        } catch {
            for channel in channels { channel.close(promise: nil) }
            throw error
        }

        // Load.
        state.begin()
        let progress = options.progress ? Task { await reportProgress(state, log: log) } : nil
        for channel in channels { channel.pipeline.fireUserInboundEventTriggered(LoadConnection.Start()) }
        let futures = dones
        var merged = ConnectionResult()
        var errors: [String] = []
        for future in futures {
            do {
                let result = try await future.get()
                merged.outcomes.merge(result.outcomes, uniquingKeysWith: +)
                merged.successesPerSku.merge(result.successesPerSku, uniquingKeysWith: +)
                merged.perUserSku.merge(result.perUserSku, uniquingKeysWith: +)
                merged.lastSuccessNanos = max(merged.lastSuccessNanos, result.lastSuccessNanos)
                merged.orders += result.orders
                merged.heldOrders += result.heldOrders
                if let error = result.protocolError { errors.append(error) }
            } catch {
                errors.append("\(error)")
            }
        }
        let seconds = Double(monotonicNanos() - state.startNanos) / 1e9
        for channel in channels { channel.close(promise: nil) }
        var latency = Histogram<UInt64>(highestTrackableValue: LatencyRecorder.microsMax, numberOfSignificantValueDigits: .three)
        for recorder in recorders {
            latency.add(try await recorder.eventLoop.submit { recorder.value.latency }.get())
        }
        if let path = options.acknowledgedOrdersPath {
            let text = merged.heldOrders.map { "\($0)\n" }.joined()
            if !FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) {
                errors.append("cannot write the acknowledged orders to \(path)")
            }
        }
        errors = collapse(errors)
        progress?.cancel()

        // Audit.
        var problems: [String] = []
        let successes = merged.successesPerSku.values.reduce(0, +)
        switch options.scenario {
        case .sellout:
            try await auditSellout(options, control: control, skuNames: skuNames, merged: merged, problems: &problems)
        case .sustained:
            break
        case .lifecycle:
            if options.target.isRedis {
                problems.append("the lifecycle scenario needs Stockade (Redis + Lua has no orders)")
            } else {
                try await auditLifecycle(options, control: control, skuNames: skuNames, merged: merged, problems: &problems, log: log)
            }
        }
        if !errors.isEmpty { problems.append("connection errors (below)") }

        var cleanup: [String] = []
        if !options.keep {
            do {
                cleanup = try await cleanUp(options, control: control, skuNames: skuNames, held: merged.heldOrders, log: log)
            } catch {
                cleanup = ["failed: \(readableError(error, target: options.target))"]
            }
        }
        let holds = options.target.isRedis ? 0 : (merged.outcomes["held"] ?? 0)
        let sales = options.target.isRedis ? successes : (merged.outcomes["paid"] ?? 0)

        let h = latency
        let requests = Int(h.totalCount)
        var notes: [String] = []
        if let busy = merged.outcomes["BUSY"], busy > 0 {
            notes.append("\(busy) of \(requests) requests were refused BUSY (the server overloaded or over its --rate-limit): requests/s counts them with the rest")
        }
        let lagMillis = Double(state.sendLagNanos.load(ordering: .relaxed)) / 1e6
        if options.rate != nil, lagMillis >= 10 {
            notes.append(String(format: "the open loop fell behind its schedule by up to %.0f ms: the offered rate was not kept (the server or this client could not keep up); every request was still sent, and its latency counts from its scheduled time", lagMillis))
        }
        return BenchReport(
            target: options.target.description, system: options.target.name, scenario: options.scenario.rawValue,
            connections: options.connections, pipeline: options.pipeline, offeredRate: options.rate, requests: requests,
            seconds: seconds, throughput: Double(requests) / seconds,
            latencyMicros: ["p50": h.valueAtPercentile(50), "p90": h.valueAtPercentile(90), "p99": h.valueAtPercentile(99),
                            "p99.9": h.valueAtPercentile(99.9), "max": h.max],
            outcomes: merged.outcomes, successes: successes, holds: holds, sales: sales, plan: plan, cleanup: cleanup,
            skuNames: skuNames,
            sellOutSeconds: options.scenario == .sellout && successes >= options.skus * options.stock && merged.lastSuccessNanos > 0
                ? Double(merged.lastSuccessNanos - state.startNanos) / 1e9 : nil,
            auditPassed: problems.isEmpty, auditProblems: problems, errors: errors, notes: notes)
    }

    /// Opens the load's connections, at most 256 connecting at once, and waits until each has
    /// answered PING. Any failure closes them all and stops the run with one line per kind of error.
    private static func openLoadConnections(
        _ options: BenchOptions, group: MultiThreadedEventLoopGroup, state: RunState
    ) async throws -> ([Channel], [EventLoopFuture<ConnectionResult>], [NIOLoopBound<LatencyRecorder>]) {
        // One recorder a loop, made on it.
        var recorders: [ObjectIdentifier: NIOLoopBound<LatencyRecorder>] = [:]
        for loop in group.makeIterator() {
            recorders[ObjectIdentifier(loop)] = try await loop.submit { NIOLoopBound(LatencyRecorder(), eventLoop: loop) }.get()
        }
        var channels: [Channel] = []
        var dones: [EventLoopFuture<ConnectionResult>] = []
        var errors: [String] = []
        var tried = 0
        for batch in stride(from: 0, to: options.connections, by: 256) {
            var pending: [(EventLoopFuture<Channel>, EventLoopFuture<Void>)] = []
            for index in batch..<min(options.connections, batch + 256) {
                tried += 1
                let loop = group.next()
                let recorder = recorders[ObjectIdentifier(loop)]!
                let ready = loop.makePromise(of: Void.self)
                let done = loop.makePromise(of: ConnectionResult.self)
                let bootstrap = ClientBootstrap(group: loop)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                LoadConnection(state: state, index: index, recorder: recorder, ready: ready, done: done))
                        }
                    }
                let connected = bootstrap.connect(host: options.target.host, port: options.target.port)
                connected.whenFailure { ready.fail($0) }
                pending.append((connected, ready.futureResult))
                dones.append(done.futureResult)
            }
            for (connected, ready) in pending {
                do {
                    channels.append(try await connected.get())
                    try await ready.get()
                } catch {
                    errors.append(readableError(error, target: options.target))
                }
            }
            if !errors.isEmpty { break }
        }
        if !errors.isEmpty {
            for channel in channels { channel.close(promise: nil) }
            throw BenchError("\(errors.count) of the \(tried) connections tried (of \(options.connections)) could not be opened before the load (nothing was created): "
                + collapse(errors).joined(separator: "; "))
        }
        return (channels, dones, Array(recorders.values))
    }

    /// Checks the sale against the target, SKU by SKU: what the harness was acknowledged must be
    /// what the target counts as taken, all of the stock. A stock another client changed during the
    /// run is named as such, not as an oversell or a sale that did not sell out.
    private static func auditSellout(
        _ options: BenchOptions, control: CommandClient, skuNames: [String], merged: ConnectionResult, problems: inout [String]
    ) async throws {
        if options.limit > 0, let worst = merged.perUserSku.values.max(), worst > options.limit {
            problems.append("a user got \(worst) units of a SKU limited to \(options.limit)")
        }
        for (index, sku) in skuNames.enumerated() {
            let acknowledged = merged.successesPerSku[index, default: 0]
            if options.target.isRedis {
                guard case .bulk(let text?) = try await control.send(["GET", "stock:\(sku)"]), let left = Int(text) else {
                    problems.append("\(sku): no stock counter")
                    continue
                }
                if left < 0 || acknowledged > options.stock {
                    // Redis keeps no total: a counter raised by another client looks the same.
                    problems.append("OVERSOLD: \(sku): \(acknowledged) units acknowledged of \(options.stock), the counter is \(left)"
                        + (left >= 0 ? " (or another client raised the counter during the run)" : ""))
                } else if left != options.stock - acknowledged {
                    problems.append("\(sku): the counter is \(left), but \(acknowledged) of \(options.stock) units were acknowledged: "
                        + "another client changed it during the run, or replies were lost")
                } else if left > 0 {
                    problems.append("\(sku): not sold out: \(acknowledged) of \(options.stock) units (send more requests)")
                }
            } else {
                let info = try await stockInfo(control, sku)
                let total = info["total", default: -1], available = info["available", default: -1]
                let taken = info["reserved", default: -1] + info["sold", default: -1]
                if total == options.stock && acknowledged > options.stock {
                    problems.append("OVERSOLD: \(sku): \(acknowledged) units acknowledged of \(options.stock) (server \(info))")
                } else if total != options.stock {
                    problems.append("\(sku): total \(total), set up with \(options.stock): another client changed the stock during the run (server \(info), \(acknowledged) holds acknowledged)")
                } else if taken < acknowledged {
                    problems.append("\(sku): \(acknowledged) holds acknowledged but the server counts \(taken) units taken: acknowledged holds are missing (server \(info))")
                } else if taken > acknowledged {
                    problems.append("\(sku): the server counts \(taken) units taken but \(acknowledged) holds were acknowledged: another client took units during the run, or replies were lost (server \(info))")
                } else if available > 0 {
                    problems.append("\(sku): not sold out: \(acknowledged) of \(options.stock) units (send more requests)")
                }
                let audit = try await control.send(["AUDIT", sku])
                if audit != .array([.bulk(sku), .bulk("OK")]) { problems.append("\(sku): AUDIT \(audit)") }
            }
        }
    }

    private static func auditLifecycle(
        _ options: BenchOptions, control: CommandClient, skuNames: [String], merged: ConnectionResult, problems: inout [String],
        log: @Sendable (String) -> Void
    ) async throws {
        // Every hold left alone must expire: wait out the TTL.
        log("waiting \(options.ttlMillis + 500) ms for unconfirmed holds to expire")
        try await Task.sleep(for: .milliseconds(options.ttlMillis + 500))
        var sold = [Int](repeating: 0, count: skuNames.count)
        var mismatched = 0
        for chunk in stride(from: 0, to: merged.orders.count, by: 512) {
            let slice = merged.orders[chunk..<min(merged.orders.count, chunk + 512)]
            let replies = try await control.pipeline(slice.map { ["ORDER", $0.order] })
            for (order, reply) in zip(slice, replies) {
                if order.action == .confirm && order.acknowledged { sold[order.sku] += 1 }
                guard case .array(let fields?) = reply, fields.count >= 6, fields[5].string == order.action.rawValue,
                      order.acknowledged
                else {
                    mismatched += 1
                    continue
                }
            }
        }
        if mismatched > 0 { problems.append("\(mismatched) of \(merged.orders.count) orders not in the state the harness left them in") }
        for (index, sku) in skuNames.enumerated() {
            let info = try await stockInfo(control, sku)
            if info["sold"] != sold[index] || info["reserved"] != 0 || info["available"] != options.stock - sold[index] {
                problems.append("\(sku): server \(info), harness expects sold \(sold[index]), reserved 0")
            }
        }
    }

    /// What the run sends, in the target's commands, for the log and the report.
    private static func describePlan(
        _ options: BenchOptions, dialect: Dialect, skuNames: [String], stock: Int, limit: Int
    ) -> [String] {
        let skus = skuNames.count == 1 ? skuNames[0] : "\(skuNames[0]) ... \(skuNames[skuNames.count - 1])"
        let amount = options.durationSeconds.map { String(format: "for %.1f s", $0) } ?? "\(options.requests) times"
        let pacing = options.rate.map { String(format: "open loop at %.0f/s", $0) } ?? "pipeline \(options.pipeline)"
        var plan: [String] = []
        if options.target.isRedis {
            plan.append("setup: SCRIPT LOAD (the stock script), SET stock:<sku> \(stock) for \(skuNames.count) SKUs \(skus)")
            plan.append("load: EVALSHA <script> 2 stock:<sku> bought:<sku> <user> \(limit) 1 (deduct 1 unit, per-user limit \(limit)), "
                + "\(amount) over \(options.connections) connections, \(pacing), users out of \(options.users)")
        } else {
            plan.append("setup: SKU.ADD <sku> \(stock) LIMIT \(limit) for \(skuNames.count) SKUs \(skus)")
            let example = dialect.reserve(user: "<user>", sku: "<sku>", limit: limit).joined(separator: " ")
            plan.append("load: \(example) (a hold, not a sale), \(amount) over \(options.connections) connections, \(pacing), users out of \(options.users)")
            if options.scenario == .lifecycle {
                plan.append("then per hold: CONFIRM \(options.confirmPercent)%, CANCEL \(options.cancelPercent)%, the rest expire after \(options.ttlMillis) ms")
            }
        }
        plan.append(options.keep ? "cleanup: none (--keep)" : options.target.isRedis
            ? "cleanup: DEL stock:<sku> bought:<sku>"
            : "cleanup: CANCEL every hold left, then SKU.RESTOCK <sku> -<available> and SKU.PAUSE <sku> (a SKU cannot be deleted)")
        return plan
    }

    /// Leaves the target as it was, as far as the protocol allows: holds cancelled, SKUs emptied and paused.
    /// A command refused BUSY (the server's --rate-limit, or its log's queue full) is sent again, for
    /// at most a minute; what is still refused then is reported as left.
    private static func cleanUp(
        _ options: BenchOptions, control: CommandClient, skuNames: [String], held: [UInt64], log: @Sendable (String) -> Void
    ) async throws -> [String] {
        if options.target.isRedis {
            _ = try await control.pipeline(skuNames.map { ["DEL", "stock:\($0)", "bought:\($0)"] })
            return ["deleted the keys of \(skuNames.count) SKUs"]
        }
        let deadline = monotonicNanos() + 60_000_000_000
        var cancelled = 0, expired = 0, other = 0, busy = 0
        if !held.isEmpty { log("cleanup: cancelling \(held.count) holds") }
        for chunk in stride(from: 0, to: held.count, by: 512) {
            let replies = try await sendRetryingBusy(
                control, held[chunk..<min(held.count, chunk + 512)].map { ["CANCEL", String($0)] }, until: deadline)
            for reply in replies {
                switch reply.errorCode {
                case nil where reply == .simple("CANCELLED"): cancelled += 1
                case "EXPIRED": expired += 1
                case "BUSY": busy += 1
                default: other += 1
                }
            }
        }
        var emptied = 0, paused = 0
        for sku in skuNames {
            let available = try await stockInfo(control, sku)["available", default: 0]
            var commands = [["SKU.PAUSE", sku]]
            if available > 0 { commands.insert(["SKU.RESTOCK", sku, String(-available)], at: 0) }
            let replies = try await sendRetryingBusy(control, commands, until: deadline)
            if available > 0, case .array = replies[0] { emptied += 1 }
            if replies.last == .simple("OK") { paused += 1 }
        }
        var lines: [String] = []
        if !held.isEmpty {
            var line = "cancelled \(cancelled) of \(held.count) holds"
            if expired > 0 { line += ", \(expired) had expired" }
            if other > 0 { line += ", \(other) were no longer pending" }
            if busy > 0 { line += ", \(busy) still refused BUSY after a minute: LEFT HELD until their TTL" }
            lines.append(line)
        }
        lines.append("\(paused) of \(skuNames.count) SKUs paused with no stock left (\(emptied) emptied); sales stay sold"
            + (paused < skuNames.count ? "; the others were LEFT as they are (refused BUSY)" : ""))
        return lines
    }

    /// Sends `commands` in one pipeline, and again those answered BUSY, a quarter of a second apart,
    /// until `deadline`; returns the last reply of each.
    private static func sendRetryingBusy(_ control: CommandClient, _ commands: [[String]], until deadline: UInt64) async throws -> [RESPReply] {
        var replies = try await control.pipeline(commands)
        while monotonicNanos() < deadline {
            let refused = replies.indices.filter { replies[$0].errorCode == "BUSY" }
            if refused.isEmpty { break }
            try await Task.sleep(for: .milliseconds(250))
            let again = try await control.pipeline(refused.map { commands[$0] })
            for (index, reply) in zip(refused, again) { replies[index] = reply }
        }
        return replies
    }

    private static func stockInfo(_ control: CommandClient, _ sku: String) async throws -> [String: Int] {
        guard case .array(let fields?) = try await control.send(["STOCK", sku]) else { return [:] }
        var info: [String: Int] = [:]
        for i in stride(from: 0, to: fields.count - 1, by: 2) {
            if let key = fields[i].string, case .integer(let value) = fields[i + 1] { info[key] = Int(value) }
        }
        return info
    }

    /// Once a second: requests done, rate over the last second, p99 over the last second.
    private static func reportProgress(_ state: RunState, log: @Sendable (String) -> Void) async {
        var last = 0
        var lastNanos = state.startNanos
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            if Task.isCancelled { break }
            let done = state.completed.load(ordering: .relaxed)
            let now = monotonicNanos()
            let rate = Double(done - last) / (Double(now - lastNanos) / 1e9)
            log(String(format: "%10d done  %9.0f/s  p99 %.3f ms", done, rate, Double(state.takeIntervalP99()) / 1000))
            last = done
            lastNanos = now
        }
    }
}

/// Identical errors of many connections as one line: `8 connections: <error>`.
func collapse(_ errors: [String]) -> [String] {
    var order: [String] = []
    var counts: [String: Int] = [:]
    for error in errors {
        if counts[error] == nil { order.append(error) }
        counts[error, default: 0] += 1
    }
    return order.map { counts[$0]! > 1 ? "\(counts[$0]!) connections: \($0)" : $0 }
}

/// One line a person can read for a connection error, instead of SwiftNIO's nested type dump.
func readableError(_ error: Error, target: BenchTarget) -> String {
    func reason(_ error: Error) -> String {
        if let io = error as? IOError { return "\(String(cString: strerror(io.errnoCode))) (errno \(io.errnoCode))" }
        if let channel = error as? ChannelError {
            switch channel {
            case .connectTimeout(let amount): return "timed out after \(amount.nanoseconds / 1_000_000) ms"
            case .ioOnClosedChannel, .alreadyClosed, .eof: return "the connection was closed"
            default: return "\(channel)"
            }
        }
        if let bench = error as? BenchError { return bench.description }
        return "\(error)"
    }
    if let connection = error as? NIOConnectionError {
        if let failure = connection.connectionErrors.first {
            return "cannot connect to \(target.host):\(target.port): \(reason(failure.error))"
        }
        if let dns = connection.dnsAError ?? connection.dnsAAAAError { return "cannot resolve \(target.host): \(reason(dns))" }
        return "cannot connect to \(target.host):\(target.port)"
    }
    return reason(error)
}

public struct BenchError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
