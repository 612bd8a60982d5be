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
    private let start = Atomic<UInt64>(0)
    /// When the load began (``begin()``): every connection was open and answering by then.
    var startNanos: UInt64 { start.load(ordering: .acquiring) }
    /// Issue no reservation intended at or after this (duration runs).
    var deadlineNanos: UInt64? { options.durationSeconds.map { startNanos + UInt64($0 * 1e9) } }
    private let issued = Atomic<Int>(0)
    let completed = Atomic<Int>(0)
    private let interval = Mutex(Histogram<UInt64>(highestTrackableValue: LatencyRecorder.microsMax, numberOfSignificantValueDigits: .three))
    /// Cumulative distribution of SKU choice (Zipf), or empty for uniform.
    private let skuCDF: [Double]

    init(options: BenchOptions, dialect: Dialect, skuNames: [String], userPrefix: String) {
        self.options = options
        self.dialect = dialect
        self.skuNames = skuNames
        self.userPrefix = userPrefix
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

    /// Starts the clock; the connections start sending when told (``LoadConnection/Start``).
    func begin() { start.store(monotonicNanos(), ordering: .releasing) }

    /// A ticket for one more reservation meant to be sent at `intended` (now, in a closed loop), or
    /// false when the budget (count or time) is spent.
    func takeTicket(intended: UInt64) -> Bool {
        if let deadlineNanos, intended >= deadlineNanos { return false }
        if options.durationSeconds == nil {
            let (old, _) = issued.add(1, ordering: .relaxed)
            return old < options.requests
        }
        issued.add(1, ordering: .relaxed)
        return true
    }

    /// No reservation meant for `intended` or later will be sent.
    func budgetSpent(from intended: UInt64) -> Bool {
        if let deadlineNanos { return intended >= deadlineNanos }
        return issued.load(ordering: .relaxed) >= options.requests
    }

    /// Open loop: how far the sending fell behind the schedule at worst, in nanoseconds.
    let sendLagNanos = Atomic<UInt64>(0)

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

/// The latencies of every connection on one event loop: one pair of histograms a loop, not a
/// connection (a histogram of three significant digits up to 60 s is about 140 KB: with one a
/// connection, -c 2000 took 600 MB, and merging them held the loop for hundreds of milliseconds).
final class LatencyRecorder {
    var latency = Histogram<UInt64>(highestTrackableValue: microsMax, numberOfSignificantValueDigits: .three)
    /// Since the last fold into the progress line's histogram.
    var interval = Histogram<UInt64>(highestTrackableValue: microsMax, numberOfSignificantValueDigits: .three)

    /// The histograms' bound: a latency past it is recorded at it (a request the histogram refused
    /// went uncounted: an open loop far behind its schedule reported fewer requests than it sent).
    static let microsMax: UInt64 = 60_000_000

    func record(_ micros: UInt64) {
        let bounded = min(micros, Self.microsMax)
        let recorded = (latency.record(bounded), interval.record(bounded))
        assert(recorded == (true, true), "a latency within the bound is always recorded")
    }
}

/// What one connection saw.
struct ConnectionResult: Sendable {
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
///
/// Once connected it authenticates and sends PING, and `ready` completes with the PONG (or fails
/// with the refusal, e.g. the server's client limit); the load starts with ``Start``, once every
/// connection is ready, so the measured window has all of them open.
final class LoadConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The user event that starts the load (after ``RunState/begin()``).
    struct Start: Sendable {}

    private enum Request {
        case auth
        case ping
        case reserve(user: Int, sku: Int)
        case follow(orderIndex: Int)
    }

    private struct Pending {
        var intendedNanos: UInt64
        var request: Request
    }

    private let state: RunState
    private let index: Int
    private let ready: EventLoopPromise<Void>
    private var isReady = false
    private let done: EventLoopPromise<ConnectionResult>
    private let parser = RESPReplyParser()
    private var inbound: ByteBuffer?
    private var pending: [Pending] = []
    private var pendingHead = 0
    private var rng: SplitMix64
    private var result = ConnectionResult()
    /// Its loop's recorder, shared by every connection on the loop.
    private let recorder: NIOLoopBound<LatencyRecorder>
    private var finishedIssuing = false
    private var pacer: RepeatedTask?
    private var nextIntendedNanos: UInt64 = 0
    /// Open loop: the number, in the whole run, of this connection's next request.
    private var scheduled = 0
    private var out: ByteBuffer
    private var reported = false
    /// ``Start`` came in a closed loop: replies are answered with new requests.
    private var started = false

    init(state: RunState, index: Int, recorder: NIOLoopBound<LatencyRecorder>, ready: EventLoopPromise<Void>,
         done: EventLoopPromise<ConnectionResult>) {
        self.state = state
        self.recorder = recorder
        self.index = index
        self.ready = ready
        self.done = done
        rng = SplitMix64(seed: state.options.seed &* 1_000_003 &+ UInt64(index))
        out = ByteBufferAllocator().buffer(capacity: 4096)
    }

    private var inFlight: Int { pending.count - pendingHead }

    func channelActive(context: ChannelHandlerContext) {
        let now = monotonicNanos()
        if let password = state.options.password, !password.isEmpty {
            encode(["AUTH", password])
            pending.append(Pending(intendedNanos: now, request: .auth))
        }
        encode(["PING"])
        pending.append(Pending(intendedNanos: now, request: .ping))
        flush(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is Start else { return context.fireUserInboundEventTriggered(event) }
        let now = monotonicNanos()
        if let rate = state.options.rate {
            // Request k of the whole run is meant for start + k / rate, and goes to connection
            // k mod connections: together they offer the rate from the first request on.
            scheduled = index
            nextIntendedNanos = intendedNanos(of: scheduled, rate: rate)
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            pacer = context.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(1)) { _ in
                let (handler, context) = bound.value
                handler.pace(context: context)
            }
        } else {
            started = true
            for _ in 0..<state.options.pipeline where !finishedIssuing { issue(intended: now) }
            flush(context: context)
            // A connection with nothing left of the budget (fewer requests than connections) ends.
            checkDone(context: context)
        }
    }

    /// When request `k` of the whole open-loop run is meant to be sent.
    private func intendedNanos(of k: Int, rate: Double) -> UInt64 {
        state.startNanos + UInt64(Double(k) / rate * 1e9)
    }

    /// The connection was refused before the load (a password, the server's client limit).
    private func refuse(context: ChannelHandlerContext, _ message: String) {
        result.protocolError = message
        if !isReady {
            isReady = true
            ready.fail(BenchError(message))
        }
        context.close(promise: nil)
    }

    /// Open loop: sends every request whose intended time has come, late if need be (its latency
    /// counts from the intended time), and ends once the schedule or the count is done.
    private func pace(context: ChannelHandlerContext) {
        guard !finishedIssuing else { return }
        let now = monotonicNanos()
        if state.budgetSpent(from: nextIntendedNanos) { finishedIssuing = true }
        while nextIntendedNanos <= now, inFlight < 100_000, !finishedIssuing {
            issue(intended: nextIntendedNanos)
            if !finishedIssuing {
                state.sendLagNanos.max(now - nextIntendedNanos, ordering: .relaxed)
            }
            scheduled += state.options.connections
            nextIntendedNanos = intendedNanos(of: scheduled, rate: state.options.rate!)
        }
        flush(context: context)
        checkDone(context: context)
    }

    private func issue(intended: UInt64) {
        guard state.takeTicket(intended: intended) else {
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
            switch request.request {
            case .auth:
                if case .error(let message) = reply { refuse(context: context, "AUTH: \(message)") }
                continue
            case .ping:
                if case .error(let message) = reply { refuse(context: context, message) }
                else if !isReady {
                    isReady = true
                    ready.succeed()
                }
                continue
            default:
                break
            }
            let micros = max(1, (now &- request.intendedNanos) / 1000)
            recorder.value.record(micros)
            state.completed.add(1, ordering: .relaxed)
            handle(reply, for: request.request, now: now)
        }
        if pendingHead > 4096 && pendingHead * 2 > pending.count {
            pending.removeFirst(pendingHead)
            pendingHead = 0
        }
        // Closed loop: the connection keeps `pipeline` requests in flight (a lifecycle's CONFIRM or
        // CANCEL takes the place of the RESERVE it follows).
        if isReady, started, state.options.rate == nil {
            while !finishedIssuing && inFlight < state.options.pipeline { issue(intended: now) }
        }
        if recorder.value.interval.totalCount >= 256 { state.mergeInterval(&recorder.value.interval) }
        flush(context: context)
        checkDone(context: context)
    }

    private func handle(_ reply: RESPReply, for request: Request, now: UInt64) {
        switch request {
        case .auth, .ping:
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
            if reply.errorCode == "EXPIRED" {
                // The hold's deadline passed before the CONFIRM or CANCEL arrived: the order is
                // EXPIRED on the server, and that is what the audit must find.
                result.outcomes["follow-up:EXPIRED", default: 0] += 1
                result.orders[index].action = .expire
                result.orders[index].acknowledged = true
                return
            }
            let ok = reply.string == expected
            result.outcomes[ok ? "\(expected.lowercased())" : "follow-up:\(reply.errorCode ?? "unexpected")", default: 0] += 1
            result.orders[index].acknowledged = ok
        }
    }

    private func checkDone(context: ChannelHandlerContext) {
        guard finishedIssuing, inFlight == 0 else { return }
        pacer?.cancel()
        pacer = nil
        if recorder.value.interval.totalCount > 0 { state.mergeInterval(&recorder.value.interval) }
        // Closed by the harness once every connection is done: closes during the load would hold
        // the loop while other connections' replies wait (-c 2000 -n 200: 1,800 closes first).
        report()
    }

    private func report() {
        guard !reported else { return }
        reported = true
        done.succeed(result)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        refuse(context: context, readableError(error, target: state.options.target))
    }

    func channelInactive(context: ChannelHandlerContext) {
        pacer?.cancel()
        if !isReady {
            isReady = true
            ready.fail(BenchError(result.protocolError ?? "the connection was closed before the load"))
        }
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
