import Foundation
import Histogram
import StockadeCore
import NIOCore
import StockadeWire
import Synchronization

/// State every load connection shares: the request budget, the clock, the live progress figures.
final class RunState: Sendable {
    let options: BenchOptions
    let dialect: Dialect
    let skuNames: [String]
    let userPrefix: String
    let startNanos: UInt64
    /// Issue no reservation after this (duration runs).
    let deadlineNanos: UInt64?
    private let issued = Atomic<Int>(0)
    let completed = Atomic<Int>(0)
    private let interval = Mutex(Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three))
    /// Cumulative distribution of SKU choice (Zipf), or empty for uniform.
    private let skuCDF: [Double]

    init(options: BenchOptions, dialect: Dialect, skuNames: [String], userPrefix: String) {
        self.options = options
        self.dialect = dialect
        self.skuNames = skuNames
        self.userPrefix = userPrefix
        let start = monotonicNanos()
        startNanos = start
        deadlineNanos = options.durationSeconds.map { start + UInt64($0 * 1e9) }
        if let s = options.zipf, skuNames.count > 1 {
            var weights = (1...skuNames.count).map { 1 / pow(Double($0), s) }
            let total = weights.reduce(0, +)
            var running = 0.0
            for i in weights.indices {
                running += weights[i] / total
                weights[i] = running
            }
            skuCDF = weights
        } else {
            skuCDF = []
        }
    }

    /// A ticket for one more reservation, or false when the budget (count or time) is spent.
    func takeTicket(now: UInt64) -> Bool {
        if let deadlineNanos, now >= deadlineNanos { return false }
        if options.durationSeconds == nil {
            let (old, _) = issued.add(1, ordering: .relaxed)
            return old < options.requests
        }
        issued.add(1, ordering: .relaxed)
        return true
    }

    func pickSku(_ rng: inout SplitMix64) -> Int {
        if skuCDF.isEmpty { return Int(rng.next() % UInt64(skuNames.count)) }
        let u = Double(rng.next() >> 11) / Double(1 << 53)
        var low = 0, high = skuCDF.count - 1
        while low < high {
            let mid = (low + high) / 2
            if skuCDF[mid] < u { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Folds a connection's recent latencies into the progress line's interval histogram.
    func mergeInterval(_ local: inout Histogram<UInt64>) {
        interval.withLock { $0.add(local) }
        local.reset()
    }

    /// The interval's p99 in microseconds, and resets it.
    func takeIntervalP99() -> UInt64 {
        interval.withLock { h in
            defer { h.reset() }
            return h.totalCount == 0 ? 0 : h.valueAtPercentile(99)
        }
    }
}

/// What one connection saw.
struct ConnectionResult: Sendable {
    var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
    var outcomes: [String: Int] = [:]
    /// Successful reservations per SKU index.
    var successesPerSku: [Int: Int] = [:]
    /// Successful units per (user index, SKU index): the harness's own check of per-user limits.
    var perUserSku: [Int: Int] = [:]
    var lastSuccessNanos: UInt64 = 0
    /// Lifecycle: orders and what the harness did with them.
    var orders: [(order: String, sku: Int, action: LifecycleAction, acknowledged: Bool)] = []
    /// Sellout and sustained on Stockade: the holds placed, to cancel at the end (ids are decimal u64).
    var heldOrders: [UInt64] = []
    var protocolError: String?
}

enum LifecycleAction: String, Sendable {
    case confirm = "PAID", cancel = "CANCELLED", expire = "EXPIRED"
}

/// One pipelined connection of the load: keeps `pipeline` requests in flight (closed loop) or sends
/// at its share of the offered rate (open loop), and measures each reply from its intended send time.
final class LoadConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Request {
        case auth
        case reserve(user: Int, sku: Int)
        case follow(orderIndex: Int)
    }

    private struct Pending {
        var intendedNanos: UInt64
        var request: Request
    }

    private let state: RunState
    private let done: EventLoopPromise<ConnectionResult>
    private let parser = RESPReplyParser()
    private var inbound: ByteBuffer?
    private var pending: [Pending] = []
    private var pendingHead = 0
    private var rng: SplitMix64
    private var result = ConnectionResult()
    private var intervalLatency = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
    private var finishedIssuing = false
    private var pacer: RepeatedTask?
    private var nextIntendedNanos: UInt64 = 0
    private let intervalNanos: UInt64
    private var out: ByteBuffer
    private var reported = false

    init(state: RunState, index: Int, done: EventLoopPromise<ConnectionResult>) {
        self.state = state
        self.done = done
        rng = SplitMix64(seed: state.options.seed &* 1_000_003 &+ UInt64(index))
        if let rate = state.options.rate {
            intervalNanos = UInt64(Double(state.options.connections) / rate * 1e9)
        } else {
            intervalNanos = 0
        }
        out = ByteBufferAllocator().buffer(capacity: 4096)
    }

    private var inFlight: Int { pending.count - pendingHead }

    func channelActive(context: ChannelHandlerContext) {
        let now = monotonicNanos()
        if let password = state.options.password, !password.isEmpty {
            encode(["AUTH", password])
            pending.append(Pending(intendedNanos: now, request: .auth))
        }
        if state.options.rate != nil {
            nextIntendedNanos = now
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            pacer = context.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(1)) { _ in
                let (handler, context) = bound.value
                handler.pace(context: context)
            }
        } else {
            for _ in 0..<state.options.pipeline { issue(intended: now) }
            flush(context: context)
            // A connection that opens after the budget is spent has nothing to do.
            checkDone(context: context)
        }
    }

    /// Open loop: sends every request whose intended time has come.
    private func pace(context: ChannelHandlerContext) {
        guard !finishedIssuing else { return }
        let now = monotonicNanos()
        while nextIntendedNanos <= now, inFlight < 100_000, !finishedIssuing {
            issue(intended: nextIntendedNanos)
            nextIntendedNanos += intervalNanos
        }
        flush(context: context)
        checkDone(context: context)
    }

    private func issue(intended: UInt64) {
        guard state.takeTicket(now: monotonicNanos()) else {
            finishedIssuing = true
            return
        }
        let user = Int(rng.next() % UInt64(state.options.users))
        let sku = state.pickSku(&rng)
        let command = state.dialect.reserve(
            user: "\(state.userPrefix)\(user)", sku: state.skuNames[sku], limit: state.options.limit)
        encode(command)
        pending.append(Pending(intendedNanos: intended, request: .reserve(user: user, sku: sku)))
    }

    private func encode(_ command: [String]) {
        out.writeRESPArrayHeader(command.count)
        for word in command { out.writeRESPBulk(word) }
    }

    private func flush(context: ChannelHandlerContext) {
        guard out.readableBytes > 0 else { return }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        out = context.channel.allocator.buffer(capacity: 4096)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if inbound == nil { inbound = bytes } else { inbound!.writeBuffer(&bytes) }
        let now = monotonicNanos()
        while true {
            let reply: RESPReply
            do {
                guard let parsed = try parser.next(&inbound!) else { break }
                reply = parsed
            } catch {
                result.protocolError = error.message
                finishedIssuing = true
                pending.removeAll()
                pendingHead = 0
                break
            }
            guard pendingHead < pending.count else {
                result.protocolError = "reply without a request"
                break
            }
            let request = pending[pendingHead]
            pendingHead += 1
            if case .auth = request.request {
                if case .error(let message) = reply { result.protocolError = "AUTH: \(message)" }
                continue
            }
            let micros = max(1, (now &- request.intendedNanos) / 1000)
            _ = result.latency.record(micros)
            _ = intervalLatency.record(micros)
            state.completed.add(1, ordering: .relaxed)
            handle(reply, for: request.request, now: now)
            if state.options.rate == nil && !finishedIssuing { issue(intended: now) }
        }
        if pendingHead > 4096 && pendingHead * 2 > pending.count {
            pending.removeFirst(pendingHead)
            pendingHead = 0
        }
        if intervalLatency.totalCount >= 256 { state.mergeInterval(&intervalLatency) }
        flush(context: context)
        checkDone(context: context)
    }

    private func handle(_ reply: RESPReply, for request: Request, now: UInt64) {
        switch request {
        case .auth:
            break
        case .reserve(let user, let sku):
            let outcome = state.dialect.classify(reply)
            result.outcomes[outcome.label, default: 0] += 1
            guard case .success(let order) = outcome else { return }
            result.successesPerSku[sku, default: 0] += 1
            result.perUserSku[user * state.skuNames.count + sku, default: 0] += 1
            result.lastSuccessNanos = now
            if state.options.scenario != .lifecycle, !state.options.keep || state.options.acknowledgedOrdersPath != nil,
               let order, let id = UInt64(order) {
                result.heldOrders.append(id)
            }
            if state.options.scenario == .lifecycle, let order {
                let roll = Int(rng.next() % 100)
                let action: LifecycleAction =
                    roll < state.options.confirmPercent ? .confirm
                    : roll < state.options.confirmPercent + state.options.cancelPercent ? .cancel : .expire
                result.orders.append((order, sku, action, action == .expire))
                if action != .expire {
                    encode([action == .confirm ? "CONFIRM" : "CANCEL", order])
                    pending.append(Pending(intendedNanos: now, request: .follow(orderIndex: result.orders.count - 1)))
                }
            }
        case .follow(let index):
            let expected = result.orders[index].action.rawValue
            let ok = reply.string == expected
            result.outcomes[ok ? "\(expected.lowercased())" : "follow-up:\(reply.errorCode ?? "unexpected")", default: 0] += 1
            result.orders[index].acknowledged = ok
        }
    }

    private func checkDone(context: ChannelHandlerContext) {
        guard finishedIssuing, inFlight == 0 else { return }
        pacer?.cancel()
        pacer = nil
        state.mergeInterval(&intervalLatency)
        report()
        context.close(promise: nil)
    }

    private func report() {
        guard !reported else { return }
        reported = true
        done.succeed(result)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        result.protocolError = readableError(error, target: state.options.target)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        pacer?.cancel()
        if !(finishedIssuing && inFlight == 0) {
            result.protocolError = result.protocolError ?? "connection closed with \(inFlight) requests in flight"
        }
        report()
    }
}

func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
