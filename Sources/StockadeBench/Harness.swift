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
    public var ttlMillis = 2_000
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
    public var successes: Int
    public var sellOutSeconds: Double?
    public var auditPassed: Bool
    public var auditProblems: [String]
    public var errors: [String]

    public var text: String {
        var lines: [String] = []
        lines.append("\(system) (\(target)), scenario \(scenario), \(connections) connections, pipeline \(pipeline)"
            + (offeredRate.map { String(format: ", offered %.0f/s", $0) } ?? ""))
        lines.append(String(format: "  %d requests in %.2f s: %.0f requests/s", requests, seconds, throughput))
        let l = latencyMicros
        lines.append(String(format: "  latency ms: p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f",
                            Double(l["p50"] ?? 0) / 1000, Double(l["p90"] ?? 0) / 1000, Double(l["p99"] ?? 0) / 1000,
                            Double(l["p99.9"] ?? 0) / 1000, Double(l["max"] ?? 0) / 1000))
        lines.append("  outcomes: " + outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        if let sellOutSeconds { lines.append(String(format: "  sold out after %.3f s (%d units)", sellOutSeconds, successes)) }
        lines.append("  audit: " + (auditPassed ? "PASSED" : "FAILED: " + auditProblems.joined(separator: "; ")))
        for error in errors { lines.append("  error: \(error)") }
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
        let control = try await CommandClient.connect(group: group, target: options.target, password: options.password)
        defer { control.close() }

        // Setup: fresh SKU names per run, so runs never collide in one server.
        let runID = String(UInt64(Date().timeIntervalSince1970 * 1000) % 100_000_000, radix: 36)
        let skuNames = (0..<options.skus).map { "bench-\(runID)-\($0)" }
        var dialect = Dialect(target: options.target)
        if options.scenario == .lifecycle { dialect.ttlMillis = options.ttlMillis }
        let stock = options.scenario == .sustained ? 1 << 40 : options.stock
        let limit = options.scenario == .sustained ? 0 : options.limit
        if options.target.isRedis {
            guard case .bulk(let sha?) = try await control.send(["SCRIPT", "LOAD", redisStockScript]) else {
                throw BenchError("SCRIPT LOAD failed")
            }
            dialect.scriptSHA = sha
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
        var effective = options
        effective.limit = limit
        let state = RunState(options: effective, dialect: dialect, skuNames: skuNames, userPrefix: "u\(runID)-")

        // Load.
        let progress = options.progress ? Task { await reportProgress(state, log: log) } : nil
        var futures: [EventLoopFuture<ConnectionResult>] = []
        for index in 0..<options.connections {
            let loop = group.next()
            let promise = loop.makePromise(of: ConnectionResult.self)
            let bootstrap = ClientBootstrap(group: loop)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(LoadConnection(state: state, index: index, done: promise))
                    }
                }
            do {
                _ = try await bootstrap.connect(host: options.target.host, port: options.target.port).get()
            } catch {
                promise.fail(error)
            }
            futures.append(promise.futureResult)
        }
        var merged = ConnectionResult()
        var errors: [String] = []
        for future in futures {
            do {
                let result = try await future.get()
                merged.latency.add(result.latency)
                merged.outcomes.merge(result.outcomes, uniquingKeysWith: +)
                merged.successesPerSku.merge(result.successesPerSku, uniquingKeysWith: +)
                merged.perUserSku.merge(result.perUserSku, uniquingKeysWith: +)
                merged.lastSuccessNanos = max(merged.lastSuccessNanos, result.lastSuccessNanos)
                merged.orders += result.orders
                if let error = result.protocolError { errors.append(error) }
            } catch {
                errors.append("connection failed: \(error)")
            }
        }
        let seconds = Double(monotonicNanos() - state.startNanos) / 1e9
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
        if !errors.isEmpty { problems.append("\(errors.count) connection errors") }

        let h = merged.latency
        let requests = Int(h.totalCount)
        return BenchReport(
            target: options.target.description, system: options.target.name, scenario: options.scenario.rawValue,
            connections: options.connections, pipeline: options.pipeline, offeredRate: options.rate, requests: requests,
            seconds: seconds, throughput: Double(requests) / seconds,
            latencyMicros: ["p50": h.valueAtPercentile(50), "p90": h.valueAtPercentile(90), "p99": h.valueAtPercentile(99),
                            "p99.9": h.valueAtPercentile(99.9), "max": h.max],
            outcomes: merged.outcomes, successes: successes,
            sellOutSeconds: options.scenario == .sellout && successes >= options.skus * options.stock && merged.lastSuccessNanos > 0
                ? Double(merged.lastSuccessNanos - state.startNanos) / 1e9 : nil,
            auditPassed: problems.isEmpty, auditProblems: problems, errors: errors)
    }

    private static func auditSellout(
        _ options: BenchOptions, control: CommandClient, skuNames: [String], merged: ConnectionResult, problems: inout [String]
    ) async throws {
        let successes = merged.successesPerSku.values.reduce(0, +)
        if successes > options.skus * options.stock {
            problems.append("OVERSOLD: \(successes) successes for \(options.skus * options.stock) units")
        }
        if successes < options.skus * options.stock {
            problems.append("not sold out: \(successes) of \(options.skus * options.stock) units (send more requests)")
        }
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
                if left < 0 || left != options.stock - acknowledged {
                    problems.append("\(sku): counter \(left), harness saw \(acknowledged) of \(options.stock) sold")
                }
            } else {
                let info = try await stockInfo(control, sku)
                if info["reserved", default: -1] + info["sold", default: -1] != acknowledged
                    || info["available", default: -1] != options.stock - acknowledged {
                    problems.append("\(sku): server \(info), harness saw \(acknowledged) holds")
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

public struct BenchError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
