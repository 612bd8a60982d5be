import NIOCore
import StockadeCore
import StockadeJournal
import StockadeWire

/// One client connection. Per read: parse every complete command, hand the engine commands to the
/// engine in one batch, write every reply of that read into one buffer and flush once. Commands that
/// arrive while a batch is in flight wait in the input buffer for the next round, so a client's
/// commands stay in order; past ``inboundHoldBytes`` of waiting input, reading pauses (backpressure),
/// so its input never piles up and other clients are not affected.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: ServerContext
    private let parser: RESPParser
    private var inbound: ByteBuffer?
    /// A round (batch, then its async step) is running; reads wait.
    private var busy = false
    private var readWanted = false
    private var closing = false
    private var counted = false
    private var authenticated: Bool
    private var bucket: TokenBucket?
    private var stallTimer: Scheduled<Void>?
    private var executor: EventLoopTaskExecutor?

    init(server: ServerContext) {
        self.server = server
        parser = RESPParser(limits: server.configuration.parserLimits)
        authenticated = (server.configuration.requirePassword ?? "").isEmpty
        if server.configuration.rateLimitPerSecond > 0 {
            bucket = TokenBucket(perSecond: server.configuration.rateLimitPerSecond, nowNanos: monotonicNanos())
        }
    }

    /// What one command of a round answers with, in order.
    private enum Slot {
        case bytes(ByteBuffer)
        case engine(Int, name: String)
    }

    // MARK: Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        executor = EventLoopTaskExecutor(loop: context.eventLoop)
    }

    func channelActive(context: ChannelHandlerContext) {
        guard server.admit(context.channel) else {
            var out = context.channel.allocator.buffer(capacity: 64)
            out.writeRESPError("ERR max number of clients reached")
            closing = true
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            context.close(promise: nil)
            return
        }
        counted = true
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if counted { server.release(context.channel) }
        counted = false
        stallTimer?.cancel()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    // MARK: Reading

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        var bytes = unwrapInboundIn(data)
        if inbound == nil || inbound!.readableBytes == 0 {
            inbound = bytes
        } else {
            inbound!.writeBuffer(&bytes)
        }
        if !busy { process(context: context) }
    }

    /// Input buffered while a round runs, past which reading from this client pauses. Below it the
    /// socket stays registered for reads (no epoll change per round); above it a flooding client
    /// only fills its own socket buffer.
    private static let inboundHoldBytes = 256 * 1024

    func read(context: ChannelHandlerContext) {
        let flooding = busy && (inbound?.readableBytes ?? 0) >= Self.inboundHoldBytes
        if flooding || closing || !context.channel.isWritable {
            readWanted = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            stallTimer?.cancel()
            stallTimer = nil
            resumeReading(context: context)
        } else if stallTimer == nil {
            let seconds = server.configuration.clientStallSeconds
            let channel = context.channel
            let log = server.logger
            stallTimer = context.eventLoop.scheduleTask(in: .seconds(Int64(seconds))) {
                if !channel.isWritable {
                    log.warning("closing a client that has not read its replies for \(seconds) s", metadata: ["peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
                    channel.close(promise: nil)
                }
            }
        }
        context.fireChannelWritabilityChanged()
    }

    private func resumeReading(context: ChannelHandlerContext) {
        if readWanted && !closing && context.channel.isWritable
            && (!busy || (inbound?.readableBytes ?? 0) < Self.inboundHoldBytes) {
            readWanted = false
            context.read()
        }
    }

    // MARK: Rounds

    /// Parses every complete command buffered and answers them: at once when none needs the engine
    /// or an async step, otherwise after one engine batch (and at most one async step, which ends the round).
    private func process(context: ChannelHandlerContext) {
        guard var input = inbound, input.readableBytes > 0, !closing else { return }
        let started = monotonicNanos()
        var slots: [Slot] = []
        var batch: [Command] = []
        var asyncStep: RoundStep?
        var closeAfter = false
        parsing: while true {
            let arguments: [String]
            do {
                guard case .command(let parsed) = try parser.next(&input) else { break }
                arguments = parsed
            } catch {
                var out = context.channel.allocator.buffer(capacity: 128)
                out.writeRESPError("ERR Protocol error: \(error.message)")
                slots.append(.bytes(out))
                server.metrics.count("protocol", outcome: "error")
                server.logger.info("protocol error, closing connection: \(error.message)", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
                input.moveReaderIndex(to: input.writerIndex)
                closeAfter = true
                break
            }
            var request = CommandTable.parse(arguments)
            if !authenticated && !request.allowedBeforeAuth {
                request = .invalid("NOAUTH Authentication required.")
            }
            // Engine commands (the hot path) only join the batch: no reply buffer of their own.
            if case .engine(let command) = request {
                if command.isChange, var tokens = bucket {
                    let allowed = tokens.take(nowNanos: monotonicNanos())
                    bucket = tokens
                    if !allowed {
                        var refusal = context.channel.allocator.buffer(capacity: 64)
                        refusal.writeRESPError("BUSY rate limit of \(server.configuration.rateLimitPerSecond) changes per second")
                        slots.append(.bytes(refusal))
                        server.metrics.count(request.metricName, outcome: "busy")
                        continue
                    }
                }
                batch.append(command)
                slots.append(.engine(batch.count - 1, name: request.metricName))
                continue
            }
            var out = context.channel.allocator.buffer(capacity: 64)
            switch request {
            case .engine:
                preconditionFailure("engine commands were batched above")
            case .quit:
                out.writeRESPSimple("OK")
                closeAfter = true
            case .snapshot: asyncStep = .snapshot
            case .shutdown: asyncStep = .shutdown
            case .info(let section): asyncStep = .info(section)
            case .events(let from, let count, let block): asyncStep = .events(from: from, count: count, blockMillis: block)
            case .hello(_, let password) where !authenticated:
                if let password, let expected = server.configuration.requirePassword, constantTimeEqual(password, expected) {
                    authenticated = true
                    server.writeLocal(request, clientID: ObjectIdentifier(self), into: &out)
                } else if password != nil {
                    out.writeRESPError("WRONGPASS invalid username-password pair or user is disabled.")
                } else {
                    out.writeRESPError("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")
                }
            case .auth(_, let password):
                if let expected = server.configuration.requirePassword, !expected.isEmpty {
                    if constantTimeEqual(password, expected) {
                        authenticated = true
                        out.writeRESPSimple("OK")
                    } else {
                        out.writeRESPError("WRONGPASS invalid username-password pair or user is disabled.")
                    }
                } else {
                    out.writeRESPError("ERR AUTH called without any password configured")
                }
            default:
                server.writeLocal(request, clientID: ObjectIdentifier(self), into: &out)
            }
            if asyncStep == nil {
                server.metrics.count(request.metricName, outcome: outcomeOf(out))
                slots.append(.bytes(out))
            }
            if asyncStep != nil || closeAfter { break parsing }
        }
        inbound = input.readableBytes > 0 ? input : nil
        // Only part of a command so far: wait for the next read.
        if slots.isEmpty && asyncStep == nil { return }

        if batch.isEmpty && asyncStep == nil {
            finish(context: context, slots: slots, replies: [], tail: nil, closeAfter: closeAfter, started: started)
            return
        }
        busy = true
        let engine = server.engine
        let server = self.server
        let step = asyncStep
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let commands = batch
        let loop = context.eventLoop
        let roundSlots = slots
        let roundCloses = closeAfter
        server.beginRound()
        Task(executorPreference: executor) {
            let replies = commands.isEmpty ? [] : await engine.execute(commands, now: wallClockMillis())
            let (tail, stepCloses): (ByteBuffer?, Bool) = if let step { await server.run(step: step) } else { (nil, false) }
            server.endRound()
            loop.execute {
                let (handler, context) = bound.value
                handler.busy = false
                handler.finish(context: context, slots: roundSlots, replies: replies, tail: tail, closeAfter: roundCloses || stepCloses, started: started)
            }
        }
    }

    private func finish(context: ChannelHandlerContext, slots: [Slot], replies: [Reply], tail: ByteBuffer?, closeAfter: Bool, started: UInt64) {
        var out = context.channel.allocator.buffer(capacity: 64 * max(1, slots.count))
        var tally = Tally()
        for slot in slots {
            switch slot {
            case .bytes(var bytes): out.writeBuffer(&bytes)
            case .engine(let index, let name):
                let reply = replies[index]
                ReplyEncoding.write(reply, into: &out)
                tally.add(name, ReplyEncoding.outcome(reply))
            }
        }
        server.metrics.count(tally)
        if !replies.isEmpty {
            server.metrics.roundDuration.record(Duration.nanoseconds(Int64(monotonicNanos() - started)))
        }
        if var tail { out.writeBuffer(&tail) }
        guard context.channel.isActive else { return }
        if out.readableBytes > 0 { context.writeAndFlush(wrapOutboundOut(out), promise: nil) }
        if closeAfter {
            closing = true
            context.close(promise: nil)
            return
        }
        if let buffered = try? context.channel.syncOptions?.getOption(.bufferedWritableBytes),
           buffered > server.configuration.clientOutputBytesMax {
            server.logger.warning("closing a client with \(buffered) bytes of unread replies (limit \(server.configuration.clientOutputBytesMax))")
            closing = true
            context.close(promise: nil)
            return
        }
        // Commands that arrived while this round ran.
        if inbound != nil {
            process(context: context)
        }
        resumeReading(context: context)
    }

    private func outcomeOf(_ out: ByteBuffer) -> String {
        guard out.getInteger(at: out.readerIndex, as: UInt8.self) == UInt8(ascii: "-") else { return "ok" }
        let line = out.getString(at: out.readerIndex + 1, length: min(out.readableBytes - 1, 16)) ?? ""
        return line.prefix { $0 != " " && $0 != "\r" }.lowercased()
    }
}

/// Compares without returning early, so the time taken does not reveal how much of a guess matched.
func constantTimeEqual(_ a: String, _ b: String) -> Bool {
    let x = Array(a.utf8), y = Array(b.utf8)
    var difference = UInt8(x.count == y.count ? 0 : 1)
    for i in 0..<max(x.count, y.count) {
        difference |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0)
    }
    return difference == 0
}

/// A per-client token bucket: `perSecond` tokens a second, holding at most `perSecond`.
struct TokenBucket {
    let perSecond: Int
    private var tokens: Double
    private var lastNanos: UInt64

    init(perSecond: Int, nowNanos: UInt64) {
        self.perSecond = perSecond
        tokens = Double(perSecond)
        lastNanos = nowNanos
    }

    mutating func take(nowNanos: UInt64) -> Bool {
        let elapsed = Double(nowNanos &- lastNanos) / 1e9
        lastNanos = nowNanos
        tokens = min(Double(perSecond), tokens + elapsed * Double(perSecond))
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
