import Logging
import NIOCore
import StockadeCore
import StockadeJournal
import StockadeWire
import Synchronization

/// One client connection. Per read: parse every complete command, hand the engine commands to the
/// engine in one batch, write every reply of that read into one buffer and flush once. Commands that
/// arrive while a batch is in flight wait in the input buffer for the next round, so a client's
/// commands stay in order; past ``inboundHoldBytes`` of waiting input, reading pauses (backpressure),
/// so its input never piles up and other clients are not affected.
final class ConnectionHandler: ChannelDuplexHandler, DurableWaiter {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: ServerContext
    /// Holds a request that arrived in part, so the next read continues where this one stopped.
    private var parser: RESPParser
    private var inbound: ByteBuffer?
    /// A command parsed but left for the next round (the round's replies reached their bound).
    private var carried: Request?
    /// The client half-closed (sent FIN): answer what it sent, then close.
    private var inputClosed = false
    /// A round (batch, then its async step) is running; reads wait.
    private var busy = false
    /// A ``process(context:)`` is scheduled on the loop for the input left after a round.
    private var processScheduled = false
    /// Event-loop time the last round took (parsing it, encoding its replies).
    private var loopNanos: UInt64 = 0
    private var readWanted = false
    private var closing = false
    /// The output is shut after the last reply and input is read only to be dropped, until the client
    /// closes or ``lingerSeconds`` pass (``closeAfterWrites(context:)``).
    private var lingering = false
    private var outputShutRequested = false
    private var lingerTimer: Scheduled<Void>?
    /// The longest a closing connection reads and drops what its client still sends.
    static let lingerSeconds: Int64 = 5
    /// The most it drops: a client that sends more is not finishing a pipeline but streaming, and is
    /// cut off at once (its socket reset).
    static let lingerBytesMax = 256 * 1024
    private var lingerBytes = 0
    private var counted = false
    private var authenticated: Bool
    /// HELLO 3 was accepted: STOCK, ORDER and EVENTS entries are maps (RESP2: flat arrays).
    private var resp3 = false
    /// CLIENT ID, and HELLO's `id`.
    private let clientNumber: Int64
    /// This connection in ``ServerContext/clients`` (CLIENT LIST), once admitted.
    private var record: ClientRecord?
    /// After MULTI, until EXEC or DISCARD: every other command is refused, not run
    /// (``CommandTable/parseInTransaction(_:)``).
    private var inTransaction = false
    /// A command was refused in the open transaction: its EXEC answers EXECABORT.
    private var transactionRefused = false
    private var bucket: TokenBucket?
    private var stallTimer: Scheduled<Void>?
    private var executor: EventLoopTaskExecutor?
    /// This connection's loop: its shards and its rounds waiting for durability.
    private var loopState: DurableReplies?
    /// The loop time its loop's rounds with large replies may take (``HeavyRounds``).
    private var heavyRounds: HeavyRounds?
    /// A heavy round built and waiting for its loop's ``heavyRounds`` to allow it.
    private var parked: Round?
    /// Set once the connection became a replica's log stream (REPLICATE): its input is acknowledgements.
    private var feed: ReplicaFeed?
    /// Whether the client is still there, for steps that wait on its behalf (WAIT).
    private let presence = ClientPresence()
    /// The last round's slot and batch arrays, emptied, for the next round: no allocation per round
    /// for them once they have grown (kept only up to ``spareCapacityMax`` entries).
    private var spareSlots: [Slot] = []
    private var spareBatch: [Command] = []
    /// Entries of spare capacity kept per connection: a pipeline of 64 (about 4 KiB), however many
    /// connections there are; larger arrays go back to the allocator.
    private static let spareCapacityMax = 64
    /// The last round's reply buffers, for the next round: the one its local replies were written
    /// to and the one its output was encoded into. Once the socket has taken a written buffer, this
    /// connection holds the only reference and the next round writes into it without an allocation
    /// (while the socket still holds it, `clear()` allocates a fresh one: never a shared write).
    private var spareLocal: ByteBuffer?
    private var spareOut: ByteBuffer?
    /// Capacity of a reply buffer kept for the next round: enough for the replies of a pipeline of
    /// about a hundred small commands; a larger buffer goes back to the allocator, so an idle
    /// connection holds at most two of these.
    private static let spareBufferBytesMax = 4096
    /// The round whose replies wait for its position to be durable (``awaitDurable``).
    private var awaiting: (round: Round, replies: [Reply], position: UInt64, context: ChannelHandlerContext)?
    /// The round whose batch hopped to the loop of the shard it needs, until the hop comes back.
    private var hopping: Round?
    /// This connection's share of ``ServerContext/partialRequests``: what it holds of a request
    /// begun and not finished, as last counted.
    private var partialBytesCounted = 0
    /// The channel went inactive: this connection holds nothing any more.
    private var gone = false

    init(server: ServerContext) {
        self.server = server
        clientNumber = server.nextClientID.add(1, ordering: .relaxed).oldValue
        authenticated = (server.configuration.requirePassword ?? "").isEmpty
        parser = RESPParser(limits: authenticated ? server.configuration.parserLimits : Self.unauthenticatedLimits(server.configuration.parserLimits))
        if server.configuration.rateLimitPerSecond > 0 {
            bucket = TokenBucket(perSecond: server.configuration.rateLimitPerSecond, nowNanos: monotonicNanos())
        }
    }

    /// What one command of a round answers with, in order.
    private enum Slot {
        /// A reply already written, at these indices of the round's ``Round/local`` buffer.
        case local(start: Int, end: Int)
        case engine(Int, name: String)
    }

    // MARK: Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        executor = EventLoopTaskExecutor(loop: context.eventLoop)
        loopState = server.durableReplies(for: context.eventLoop)
        heavyRounds = server.heavyRounds(for: context.eventLoop)
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
        let record = ClientRecord(id: clientNumber, channel: context.channel, nowNanos: monotonicNanos())
        self.record = record
        server.clients.add(record)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        presence.leave()
        if record != nil { server.clients.remove(clientNumber) }
        if counted { server.release(context.channel) }
        // Nothing more is parsed or counted: a round that was running when the client went, and the
        // next one it schedules, find the connection closing (the next one would count the unfinished
        // request again, after its share was let go here).
        closing = true
        gone = true
        inbound = nil
        _ = countPartialRequest(bytes: 0, context: context)
        counted = false
        stallTimer?.cancel()
        lingerTimer?.cancel()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            inputClosed = true
            if lingering {
                context.close(promise: nil)
                return
            }
            presence.leave()
            // A replica that closed its side is gone: its stream ends (the socket is not kept half open).
            if feed != nil {
                closing = true
                context.close(promise: nil)
                return
            }
            if !busy { process(context: context) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: Reading

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else {
            if lingering {
                lingerBytes += unwrapInboundIn(data).readableBytes
                if lingerBytes > Self.lingerBytesMax { context.close(promise: nil) }
            }
            return
        }
        var bytes = unwrapInboundIn(data)
        if let feed {
            feed.received(&bytes)
            return
        }
        if inbound == nil || inbound!.readableBytes == 0 {
            inbound = bytes
        } else {
            inbound!.writeBuffer(&bytes)
        }
        if !busy && !processScheduled { process(context: context) }
    }

    /// Input buffered while a round runs, past which reading from this client pauses. Below it the
    /// socket stays registered for reads (no epoll change per round); above it a flooding client
    /// only fills its own socket buffer.
    private static let inboundHoldBytes = 256 * 1024

    func read(context: ChannelHandlerContext) {
        if lingering {
            context.read()
            return
        }
        // Work waiting (a round running, or the next one scheduled) and much input already buffered.
        let flooding = (busy || processScheduled) && (inbound?.readableBytes ?? 0) >= Self.inboundHoldBytes
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
            // Rounds paused while the client's replies piled up go on.
            process(context: context)
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
            && ((!busy && !processScheduled) || (inbound?.readableBytes ?? 0) < Self.inboundHoldBytes) {
            readWanted = false
            context.read()
        }
    }

    /// What a client may send before AUTH: enough for AUTH and HELLO with any real password, not
    /// enough to make the server hold much for a stranger (as Redis bounds unauthenticated clients).
    static func unauthenticatedLimits(_ configured: RESPParser.Limits) -> RESPParser.Limits {
        var limits = configured
        limits.inlineBytesMax = min(configured.inlineBytesMax, 16 << 10)
        limits.bulkBytesMax = min(configured.bulkBytesMax, 16 << 10)
        limits.argumentsMax = min(configured.argumentsMax, 16)
        limits.requestBytesMax = min(configured.requestBytesMax, 64 << 10)
        return limits
    }

    /// The connection is now authenticated: requests get the configured limits. Called between two
    /// requests (right after AUTH or HELLO), so the parser holds no partial request.
    private func becameAuthenticated() {
        guard !authenticated else { return }
        authenticated = true
        parser = RESPParser(limits: server.configuration.parserLimits)
    }

    // MARK: Rounds

    /// Worst-case reply bytes of the commands one round admits (or less under a small output limit:
    /// ``ServerContext/roundReplyBytes``). Commands past it wait for the next round, after this one's replies were written:
    /// a pipeline of commands with large replies (ORDERS, AUDIT) is answered a few at a time, so the
    /// replies built at once stay bounded whatever one read holds.
    static let roundReplyBytesMax = 4 << 20

    /// Commands in one round: a round is work done on the event loop in one go (parsing, local
    /// replies, encoding), so it is bounded in count too, not only in reply bytes: a flood of small
    /// commands (PING, HELLO) is answered a round per turn of the loop, with other clients between.
    static let roundCommandsMax = 1024

    /// Parses the commands buffered and answers the next round of them. A round without engine
    /// commands or an async step is answered at once; otherwise it waits for one engine batch (and at
    /// most one async step, which ends the round) and ``finish`` comes back here. Either way the next
    /// round starts only on a later turn of the event loop (other clients' reads run in between), and
    /// only while the client reads what it was sent (the channel is writable): a client whose replies
    /// pile up is paced, not served ahead of everyone else.
    private func process(context: ChannelHandlerContext) {
        guard !busy && !closing else { return }
        // Resumed by channelWritabilityChanged once the client has read its replies.
        guard context.channel.isWritable else { return }
        let parseStarted = monotonicNanos()
        record?.lastActiveNanos.store(parseStarted, ordering: .relaxed)
        // Built in place, in this variable: a round returned by value was copied (each of its arrays
        // and buffers retained once more).
        var round = Round(local: Self.reuse(&spareLocal, context: context), started: parseStarted)
        guard buildRound(into: &round, context: context) else {
            recycle(round)
            if inputClosed {
                // The client half-closed: everything it sent before is answered; now close.
                closeAfterWrites(context: context)
            }
            return
        }
        if case .replicate(let request)? = round.step {
            startFeed(context: context, round: round, request: request)
            return
        }
        if round.batch.isEmpty && round.step == nil {
            finish(context: context, round: round, replies: [], tail: nil, closeAfter: round.closeAfter)
            recycle(round)
            loopNanos = monotonicNanos() - parseStarted
            processOnNextTurn(context: context)
            return
        }
        loopNanos = monotonicNanos() - parseStarted
        if round.turnAtStart, let heavyRounds {
            guard heavyRounds.start(now: monotonicNanos()) else {
                park(round, heavyRounds, context: context)
                return
            }
            run(consume round, context: context)
            heavyRounds.charge(monotonicNanos() - parseStarted, now: monotonicNanos())
            return
        }
        run(consume round, context: context)
    }

    /// A heavy round waits, built, in its loop's ``HeavyRounds`` queue while the loop serves its
    /// other clients, until its turn. Nothing else of the connection runs meanwhile (`busy`); its
    /// input waits in the buffer.
    private func park(_ round: consuming Round, _ heavyRounds: HeavyRounds, context: ChannelHandlerContext) {
        busy = true
        precondition(parked == nil, "one round at a time")
        parked = consume round
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        heavyRounds.enqueue {
            let (handler, context) = bound.value
            guard let round = handler.parked.take() else { preconditionFailure("the parked round") }
            let started = monotonicNanos()
            // Run as it would have been: its commands were received (a client that left meanwhile
            // gets no reply, as when it leaves during any round).
            handler.run(round, context: context)
            heavyRounds.charge(monotonicNanos() - started, now: monotonicNanos())
        }
    }

    /// The connection becomes a replica's log stream: the replies before REPLICATE are written, then
    /// ``ReplicaFeed`` owns the socket until it closes. REPLICATE always starts a round of its own
    /// (``buildRound(into:context:)``), so nothing of the engine is in flight here.
    private func startFeed(context: ChannelHandlerContext, round: Round, request: ReplicaRequest) {
        finish(context: context, round: round, replies: [], tail: nil, closeAfter: false)
        busy = true  // no more rounds on this connection
        let feed = ReplicaFeed(server: server, channel: context.channel, request: request)
        self.feed = feed
        record?.isReplica.store(true, ordering: .relaxed)
        if var rest = inbound, rest.readableBytes > 0 { feed.received(&rest) }
        inbound = nil
        server.logger.info("a replica at \(context.remoteAddress.map { "\($0)" } ?? "?") follows the log from position \(request.from)")
        Task { await feed.run() }
    }

    /// How long the next round of a client with input left waits: as long as this round kept the loop
    /// busy (parsing and encoding), within these bounds, so the loop polls its sockets first and a
    /// flooding client gets at most about half of its loop. A SwiftNIO loop runs tasks until none are
    /// left before it polls again (a task that is due by then runs in the same pass), so a round that
    /// queued the next one at once would keep every other client on the loop waiting.
    static let nextRoundDelayNanosMin: UInt64 = 50_000
    static let nextRoundDelayNanosMax: UInt64 = 10_000_000

    /// How long work that kept its loop busy for `busyNanos` waits before it goes on: as long, within
    /// ``nextRoundDelayNanosMin`` and ``nextRoundDelayNanosMax``.
    static func nextTurnDelay(busyNanos: UInt64) -> TimeAmount {
        .nanoseconds(Int64(min(max(busyNanos, nextRoundDelayNanosMin), nextRoundDelayNanosMax)))
    }

    /// Waits until a later turn of `loop`, once it polled its sockets: work sliced across turns
    /// (an AUDIT's encoding, the engine's slices on a shard) pauses so between slices, for as long as
    /// the slice before kept the loop busy (``nextTurnDelay(busyNanos:)``).
    static func laterTurn(on loop: EventLoop, busyNanos: UInt64) async {
        try? await loop.scheduleTask(in: nextTurnDelay(busyNanos: busyNanos)) {}.futureResult.get()
    }

    /// Schedules ``process(context:)`` for a later turn of the event loop when input is left.
    private func processOnNextTurn(context: ChannelHandlerContext) {
        guard !closing, !processScheduled, carried != nil || (inbound?.readableBytes ?? 0) > 0 || inputClosed else { return }
        processScheduled = true
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: Self.nextTurnDelay(busyNanos: loopNanos)) {
            let (handler, context) = bound.value
            handler.processScheduled = false
            handler.process(context: context)
            handler.resumeReading(context: context)
        }
    }

    /// One round's commands, in order.
    private struct Round {
        var slots: [Slot] = []
        /// Replies written while the round was built (commands answered without the engine, errors).
        var local: ByteBuffer
        /// Commands counted so far, for the metrics (counted once per round).
        var tally = Tally()
        var batch: [Command] = []
        /// Whether ``batch`` holds a change (a command that can change state), set as it is built: read
        /// three times a round, so the batch is not scanned each time.
        var hasChanges = false
        /// Engine commands of the round were answered from the counters while it was parsed: the
        /// read is timed like one whose batch ran.
        var soldOutAnswers = false
        var step: RoundStep?
        var closeAfter = false
        var started: UInt64
        /// The round's replies can be large (``heavyReplyBytes``): it takes a turn in its loop's
        /// ``HeavyRounds`` and is charged the loop time it takes.
        var heavy = false
        /// Its engine commands' replies can be large (ORDERS, AUDIT of every SKU, many ORDER): the
        /// round takes its turn before it runs, and then holds no change. Otherwise a heavy round
        /// (an EVENTS step) takes it once its step is about to read a page, if it needs one
        /// (``HeavyTurn``).
        var turnAtStart = false
    }

    /// A round whose commands with medium or large replies (``ReplyEncoding/smallReplyBytesMax``
    /// and up: ORDER, ORDERS, AUDIT of every SKU) can together answer this many bytes or more is
    /// heavy (``HeavyRounds``), as is a round with an EVENTS of more than one record or of a basket
    /// (its step takes the turn when it knows). The commands of the hot path (RESERVE,
    /// DEDUCT, STOCK, CONFIRM) have small replies and never count, however many a round holds.
    static let heavyReplyBytes = 64 << 10

    /// What a sold-out answer counts against a round's reply budget: what its command would count
    /// had it joined the batch (``ReplyEncoding/replyBytesMax(_:)`` of a DEDUCT or RESERVE), so
    /// rounds end where they did before these answers.
    static let soldOutReplyBytesMax = ReplyEncoding.smallReplyBytesMax

    /// The metrics name of a command answered from its counter: the name its request has
    /// (``Request/metricName``).
    private static func metricName(_ candidate: borrowing Engine.SoldOutCandidate) -> String {
        switch candidate {
        case .deduct: "deduct"
        case .reserve: "reserve"
        }
    }

    /// Parses commands from the buffered input into a round: until the input runs out, an async
    /// step or QUIT or a protocol error ends it, or the replies admitted reach the round's bound.
    /// False when nothing complete was buffered (the caller recycles the round's arrays and buffer).
    private func buildRound(into round: inout Round, context: ChannelHandlerContext) -> Bool {
        swap(&round.slots, &spareSlots)
        swap(&round.batch, &spareBatch)
        // Emptied here, not when the last round ended: by now that round is gone, so these arrays
        // have one holder and are emptied in place.
        round.slots.removeAll(keepingCapacity: true)
        round.batch.removeAll(keepingCapacity: true)
        let replyBudget = server.roundReplyBytes
        var replyBytes = 0
        // The reply bytes its commands with medium or large replies can take (``heavyReplyBytes``).
        var pagedBytes = 0
        var input = inbound ?? ByteBuffer()
        // Whether changes are refused (a replica, a lapsed lease), read once a round at its first
        // change: the role is one object shared by every connection of both loops, and reading it
        // retains it, a write to a cache line the other loop writes too. The shard checks it again
        // when it runs the batch.
        var readOnly: Bool?
        // The parse stopped for want of bytes: a request may be begun and not finished.
        var starved = false
        // Sold-out answers of this parse: made at the first request that may be one.
        var soldOut: Engine.SoldOutMemo?
        // A log position seen durable in this parse.
        var durableSeen: UInt64 = 0
        parsing: while replyBytes < replyBudget && round.slots.count < Self.roundCommandsMax {
            var request: Request
            if let waiting = carried {
                request = waiting
                carried = nil
            } else {
                guard input.readableBytes > 0 else {
                    starved = true
                    break
                }
                do {
                    let authenticated = authenticated
                    // A sold-out answer read from the SKU's counter goes with the local replies while
                    // nothing of this round has joined the batch (a batch runs after the parse, and this
                    // answer must not come before the state the commands before it leave): a round of
                    // sold-out requests then runs no batch and builds no command. Only for a state
                    // already durable; not when changes wait for replicas (the batch's wait decides),
                    // are rate limited (the bucket counts them) or refused (READONLY); not past the
                    // round's reply budget (the command table's request then starts the next round).
                    let inTransaction = inTransaction
                    let mayAnswer = round.batch.isEmpty && bucket == nil && server.configuration.minReplicasToWrite == 0
                        && (round.slots.isEmpty || replyBytes + Self.soldOutReplyBytesMax <= replyBudget) && !inTransaction
                    var parsed: Request?
                    var candidate: Engine.SoldOutCandidate?
                    guard try parser.next(&input, { arguments in
                        if mayAnswer, let found = CommandTable.soldOutCandidate(arguments, authenticated: authenticated) {
                            candidate = found
                        } else if inTransaction {
                            parsed = CommandTable.parseInTransaction(arguments)
                        } else {
                            parsed = CommandTable.parse(arguments, authenticated: authenticated)
                        }
                    }) else {
                        starved = true
                        break
                    }
                    if let candidate = candidate.take() {
                        if readOnly == nil { readOnly = server.engine.role.isReadOnly }
                        if readOnly == false {
                            if soldOut == nil { soldOut = server.engine.soldOutMemo(now: wallClockMillis()) }
                            if let (reply, lsn) = server.engine.soldOutAnswer(to: candidate, memo: &soldOut!),
                               lsn <= durableSeen || lsn <= server.store.journal.lastDurableLSN {
                                durableSeen = max(durableSeen, lsn)
                                let start = round.local.writerIndex
                                ReplyEncoding.write(reply, resp3: resp3, into: &round.local)
                                round.slots.append(.local(start: start, end: round.local.writerIndex))
                                round.tally.add(Self.metricName(candidate), ReplyEncoding.outcome(reply))
                                replyBytes += Self.soldOutReplyBytesMax
                                round.soldOutAnswers = true
                                continue
                            }
                        }
                        // Not answered here: the command the parse makes of the same arguments.
                        request = .engine(candidate.command)
                    } else {
                        guard let taken = parsed.take() else { preconditionFailure("a complete request is parsed") }  // moved out, not copied
                        request = consume taken
                    }
                } catch {
                    let start = round.local.writerIndex
                    round.local.writeRESPError("ERR Protocol error: \(error.message)")
                    round.slots.append(.local(start: start, end: round.local.writerIndex))
                    server.metrics.count("protocol", outcome: "error")
                    server.protocolErrorLog.record(
                        "protocol error, closing connection: \(error.message)",
                        peer: context.remoteAddress.map { "\($0)" } ?? "?", logger: server.logger, loop: context.eventLoop)
                    input.moveReaderIndex(to: input.writerIndex)
                    round.closeAfter = true
                    break
                }
            }
            // Engine commands (the hot path) only join the batch: no reply buffer of their own.
            if case .engine = request {
                let name = request.metricName
                // Moved out of the request, not copied: the command goes on to the batch as it is.
                guard case .engine(let command) = consume request else { preconditionFailure("an engine request") }
                if command.isChange && readOnly == nil { readOnly = server.engine.role.isReadOnly }
                if command.isChange && readOnly == true {
                    let start = round.local.writerIndex
                    round.local.writeRESPError(ReplyEncoding.errorText(.readOnly))
                    round.slots.append(.local(start: start, end: round.local.writerIndex))
                    round.tally.add(name, "readonly")
                    replyBytes += round.local.writerIndex - start
                    continue
                }
                // Semi-synchronous: with fewer replicas connected than a change must reach, it is
                // refused before it changes anything (Redis's words).
                let minReplicas = server.configuration.minReplicasToWrite
                if minReplicas > 0, command.isChange, server.replication.replicaCount < minReplicas {
                    let start = round.local.writerIndex
                    round.local.writeRESPError("NOREPLICAS Not enough good replicas to write.")
                    round.slots.append(.local(start: start, end: round.local.writerIndex))
                    round.tally.add(name, "noreplicas")
                    replyBytes += round.local.writerIndex - start
                    continue
                }
                let replyMax = ReplyEncoding.replyBytesMax(command)
                if !round.slots.isEmpty, replyBytes + (replyMax ?? replyBudget) > replyBudget {
                    carried = .engine(command)  // it starts the next round
                    break
                }
                // A heavy round holds no change and a change joins no heavy round (one or the other
                // starts the next round): a change waits for the disk and, when semi-synchronous, for
                // replicas, and a heavy round holds its loop's turn until its replies are written.
                let paged = (replyMax ?? replyBudget) > ReplyEncoding.smallReplyBytesMax ? (replyMax ?? replyBudget) : 0
                // (Unbounded, AUDIT of every SKU, is heavy whatever the round's budget.)
                let heavyWith = round.turnAtStart || replyMax == nil || pagedBytes + paged >= Self.heavyReplyBytes
                if !round.slots.isEmpty, heavyWith, round.hasChanges || command.isChange {
                    carried = .engine(command)
                    break
                }
                replyBytes += replyMax ?? replyBudget
                pagedBytes += paged
                if heavyWith {
                    round.heavy = true
                    round.turnAtStart = true
                }
                if command.isChange, var tokens = bucket {
                    let allowed = tokens.take(nowNanos: monotonicNanos())
                    bucket = tokens
                    if !allowed {
                        let start = round.local.writerIndex
                        round.local.writeRESPError("BUSY rate limit of \(server.configuration.rateLimitPerSecond) changes per second")
                        round.slots.append(.local(start: start, end: round.local.writerIndex))
                        round.tally.add(name, "busy")
                        continue
                    }
                }
                if command.isChange { round.hasChanges = true }
                round.batch.append(consume command)  // moved into the batch, not copied
                round.slots.append(.engine(round.batch.count - 1, name: name))
                continue
            }
            if request.needsOwnRound && !round.slots.isEmpty {
                carried = request  // it starts the next round
                break parsing
            }
            // A round holding a turn of large replies takes no step that can wait (a SNAPSHOT being
            // written, INFO, REPLICAOF): it starts the next round, so the turn is not held through it.
            // (An EVENTS without BLOCK only reads; WAIT and a blocking EVENTS have rounds of their own.)
            if round.turnAtStart {
                switch request {
                case .snapshot, .shutdown, .info, .role, .replicaOf, .promote:
                    carried = request
                    break parsing
                default: break
                }
            }
            // Local replies go straight into the round's buffer: no buffer of their own.
            let start = round.local.writerIndex
            switch request {
            case .engine:
                preconditionFailure("engine commands were batched above")
            case .quit:
                round.local.writeRESPSimple("OK")
                round.closeAfter = true
            case .snapshot: round.step = .snapshot
            case .shutdown: round.step = .shutdown
            case .info(let section): round.step = .info(section)
            case .events(let from, let count, let block):
                round.step = .events(from: from, count: count, blockMillis: block, resp3: resp3)
                round.heavy = true
            case .replicate(let replicaRequest): round.step = .replicate(replicaRequest)
            case .role: round.step = .role
            case .replicaOf(let host, let port): round.step = .replicaOf(host: host, port: port)
            case .promote: round.step = .promote
            case .wait(let replicas, let timeoutMillis): round.step = .wait(replicas: replicas, timeoutMillis: timeoutMillis)
            case .hello(let version, let password, _):
                // Engine replies are encoded when the round ends, in the protocol of that moment: a
                // HELLO that names a version starts a round of its own after the engine commands before it.
                if version != nil && !round.batch.isEmpty {
                    carried = request
                    break parsing
                }
                // Redis's order: the version and options were checked by the command table; then the
                // password. A HELLO that fails changes nothing.
                if let password, let expected = server.configuration.requirePassword, !expected.isEmpty {
                    guard constantTimeEqual(password, expected) else {
                        round.local.writeRESPError(Self.wrongPassword)
                        break
                    }
                    becameAuthenticated()
                } else if !authenticated {
                    round.local.writeRESPError("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")
                    break
                }
                server.writeLocal(request, client: clientNumber, resp3: resp3, into: &round.local)
                if let version { resp3 = version == 3 }
            case .logTerm:
                // It reads the durable log: after engine commands of this read, in a round of its own
                // once their records are durable (answered now, it would not see them: -BEYOND for a
                // position they wrote, where the same commands sent one by one find it).
                if !round.batch.isEmpty {
                    carried = request
                    break parsing
                }
                server.writeLocal(request, client: clientNumber, resp3: resp3, into: &round.local)
            case .multi:
                if inTransaction {
                    // As in Redis 7: an error while the transaction is open aborts its EXEC.
                    transactionRefused = true
                    round.local.writeRESPError("ERR MULTI calls can not be nested")
                } else {
                    (inTransaction, transactionRefused) = (true, false)
                    round.local.writeRESPSimple("OK")
                }
            case .exec:
                if !inTransaction {
                    round.local.writeRESPError("ERR EXEC without MULTI")
                } else if transactionRefused {
                    round.local.writeRESPError("EXECABORT Transaction discarded because of previous errors.")
                } else {
                    round.local.writeRESPArrayHeader(0)  // nothing was queued, nothing ran
                }
                inTransaction = false
            case .discard:
                if inTransaction { round.local.writeRESPSimple("OK") } else { round.local.writeRESPError("ERR DISCARD without MULTI") }
                inTransaction = false
            case .invalid where inTransaction:
                transactionRefused = true
                server.writeLocal(request, client: clientNumber, resp3: resp3, into: &round.local)
            case .auth(_, let password):
                if let expected = server.configuration.requirePassword, !expected.isEmpty {
                    // A wrong password leaves the connection as it was (as in Redis): an
                    // authenticated client stays authenticated, others stay out.
                    if constantTimeEqual(password, expected) {
                        becameAuthenticated()
                        round.local.writeRESPSimple("OK")
                    } else {
                        round.local.writeRESPError(Self.wrongPassword)
                    }
                } else {
                    round.local.writeRESPError("ERR AUTH called without any password configured")
                }
            default:
                server.writeLocal(request, client: clientNumber, resp3: resp3, into: &round.local)
            }
            if round.step == nil {
                round.tally.add(request.metricName, outcomeOf(round.local, at: start))
                replyBytes += round.local.writerIndex - start
                round.slots.append(.local(start: start, end: round.local.writerIndex))
            }
            if round.step != nil || round.closeAfter { break parsing }
        }
        inbound = input.readableBytes > 0 ? input : nil
        // Bytes taken in stay at the front of the buffer until it is emptied; drop them once they
        // outweigh what is left, so moving the rest costs no more than what was read (linear).
        if var rest = inbound, rest.readerIndex >= max(rest.readableBytes, 4096) {
            rest.discardReadBytes()
            inbound = rest
        }
        if starved {
            holdPartialRequest(into: &round, context: context)
        } else if partialBytesCounted != 0 {
            // Between requests (a round's bound or a step ended the parse): nothing begun is held.
            _ = countPartialRequest(bytes: 0, context: context)
        }
        // Only part of a command so far: wait for the next read (the round's arrays and buffer serve
        // the next one).
        return !(round.slots.isEmpty && round.step == nil)
    }

    /// The input ran out: whatever part of a request this connection holds (the parser's copy of its
    /// earlier arguments and the input buffer) becomes its share of the bytes all connections hold for
    /// unfinished requests (``PartialRequestBudget``). Past ``ServerConfiguration/partialRequestBytesMax``
    /// the oldest unfinished requests are refused and their connections closed: this one's, if it is
    /// among them, with an error as the round's last reply.
    private func holdPartialRequest(into round: inout Round, context: ChannelHandlerContext) {
        // A few bytes left at the end of a large read would keep the whole read buffer (up to 64
        // KiB) for as long as the client waits: they move to a buffer of their size.
        if let rest = inbound, rest.capacity >= Self.partialCompactBytes, rest.readableBytes <= rest.capacity / 4 {
            var small = context.channel.allocator.buffer(capacity: rest.readableBytes)
            small.writeImmutableBuffer(rest)
            inbound = small
        }
        let bytes = parser.heldBytes + (inbound?.capacity ?? 0)
        // A request that completed in this round means the one now held began after it: its age
        // starts now. Otherwise it is the request counted before, still arriving.
        let restart = !round.slots.isEmpty || round.step != nil
        guard countPartialRequest(bytes: bytes, restart: restart, context: context) else { return }
        let start = round.local.writerIndex
        round.local.writeRESPError(refusalMessage(bytes))
        round.slots.append(.local(start: start, end: round.local.writerIndex))
        round.closeAfter = true
        refusePartialRequest(context: context)
    }

    /// Read buffers at least this large are not kept for a small remainder (see ``holdPartialRequest``).
    private static let partialCompactBytes = 16 << 10

    /// Sets this connection's share of ``ServerContext/partialRequests`` (`restart`: of a request
    /// begun since the last count) and closes the connections (on their loops) whose unfinished
    /// requests are refused; returns whether this one's is. Once the connection is gone its share
    /// stays 0, whatever runs after the close.
    private func countPartialRequest(bytes: Int, restart: Bool = false, context: ChannelHandlerContext) -> Bool {
        let bytes = gone ? 0 : bytes
        guard bytes != partialBytesCounted || (restart && bytes > 0) else { return false }
        let id = ObjectIdentifier(self)
        let old = partialBytesCounted
        partialBytesCounted = bytes
        let holder = bytes > 0 ? NIOLoopBound((self, context), eventLoop: context.eventLoop) : nil
        let refused = server.partialRequests.withLock { $0.set(id, from: old, to: bytes, restart: restart, holder: holder) }
        var this = false
        for (key, holder) in refused {
            if key == id {
                this = true
            } else {
                holder.eventLoop.execute {
                    let (handler, context) = holder.value
                    handler.partialRequestRefused(context: context)
                }
            }
        }
        return this
    }

    /// Another connection's share passed the bound and this connection's unfinished request was the
    /// oldest: unless it has finished since, the connection is closed, with the error as its last reply
    /// when no round is running (otherwise without it, as a reply in the middle of a round's would be
    /// out of order).
    private func partialRequestRefused(context: ChannelHandlerContext) {
        guard !closing, server.partialRequests.withLock({ $0.isChosen(ObjectIdentifier(self)) }) else { return }
        let bytes = partialBytesCounted
        refusePartialRequest(context: context)
        if busy {
            closing = true
            context.close(promise: nil)
        } else {
            var out = context.channel.allocator.buffer(capacity: 256)
            out.writeRESPError(refusalMessage(bytes))
            context.write(wrapOutboundOut(out), promise: nil)
            closeAfterWrites(context: context)
        }
    }

    private func refusalMessage(_ bytes: Int) -> String {
        "ERR unfinished requests of all clients hold over \(server.configuration.partialRequestBytesMax) bytes (--max-partial-request-bytes): refusing the oldest, this client's \(bytes) bytes; closing"
    }

    /// Lets the refused request's bytes go and counts the refusal.
    private func refusePartialRequest(context: ChannelHandlerContext) {
        inbound = nil
        parser = RESPParser(limits: parser.limits)
        _ = countPartialRequest(bytes: 0, context: context)
        server.partialRequestRefusals.add(1, ordering: .relaxed)
        server.metrics.count("protocol", outcome: "partial_limit")
        server.protocolErrorLog.record(
            "closing a connection: its unfinished request was the oldest when the bytes of all of them passed --max-partial-request-bytes",
            peer: context.remoteAddress.map { "\($0)" } ?? "?", logger: server.logger, loop: context.eventLoop)
    }

    private static let wrongPassword = "WRONGPASS invalid username-password pair or user is disabled."

    /// Runs a round's engine batch and async step. A batch whose shards all run on one loop (and that
    /// needs nothing else: see ``Engine/executeLocally(_:now:localShards:)``) runs in place on that
    /// loop: this one (no hop at all), or the loop of the first shard it needs (one hop there and one
    /// back).
    /// The round then waits on this loop's ``DurableReplies`` for its position: no task, no
    /// continuation. Anything else runs in a task that awaits the shards it needs.
    /// Takes the round (`consuming`): a round holds a dozen references (its arrays, buffers and tally),
    /// and it moves from here to the wait for durability and on to ``complete`` without a copy.
    private func run(_ round: consuming Round, context: ChannelHandlerContext) {
        busy = true
        server.beginRound(changes: round.hasChanges)
        guard round.step == nil, !round.batch.isEmpty, let loopState else {
            runAsync(round, context: context)
            return
        }
        // In place on this loop (sold-out answers from the counters need no shard at all).
        let elsewhere: Int
        switch server.engine.executeLocally(round.batch, now: wallClockMillis(), localShards: loopState.localShards) {
        case .answered(let replies, let waitFor):
            awaitDurable(consume round, replies: replies, waitFor: waitFor, context: context)
            return
        case .needsAsync:
            runAsync(round, context: context)
            return
        case .partlyRan(let partial):
            runAsync(round, context: context, partial: partial)
            return
        case .needsShard(let shard):
            elsewhere = shard
        }
        guard let homeState = server.loopState(ofShard: elsewhere), homeState !== loopState else {
            runAsync(round, context: context)
            return
        }
        // One hop to the loop of the shard the batch needs, which runs it in place, and one hop back.
        let engine = server.engine
        let batch = round.batch
        // Who writes the records the round waits for. A pipelined round's: the shard's loop, in the sync
        // of its own rounds; were both loops to write, each would find the other's write under way and
        // leave the rest to the journal's thread, which then syncs back to back in small batches (with
        // two loops, durable RESERVE -P16 x1.19 this way). A single command's: this loop, whose sync
        // then overlaps the shard loop's next commands (at pipeline 1 the shard's loop writing measured
        // x0.87). BENCHMARKS.md, "The shard's loop writes a pipelined round's records".
        let shardWrites = batch.count > 1
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let ownLoop = context.eventLoop
        // The round waits here, not in the hop's closures: capturing it would copy it (a retain of each
        // of its references, and a release of each when the closures go).
        // Checked in release builds too: a second round here would overwrite the first one's replies.
        precondition(hopping == nil, "one round at a time")
        hopping = consume round
        homeState.loop.execute {
            let outcome = engine.executeLocally(batch, now: wallClockMillis(), localShards: homeState.localShards)
            if shardWrites, case .answered(_, let waitFor) = outcome { homeState.writeSoon(through: waitFor) }
            ownLoop.execute {
                let (handler, context) = bound.value
                guard let round = handler.hopping.take() else { preconditionFailure("the round that hopped") }
                switch outcome {
                case .answered(let replies, let waitFor):
                    handler.awaitDurable(round, replies: replies, waitFor: waitFor, context: context, write: !shardWrites)
                case .partlyRan(let partial):
                    // What ran there is not run again.
                    handler.runAsync(round, context: context, partial: partial)
                case .needsAsync, .needsShard:
                    handler.runAsync(round, context: context)
                }
            }
        }
    }

    /// Answers a round whose commands ran once its position is durable (on this loop's ``DurableReplies``,
    /// which the journal wakes once per sync), or refuses them all if the log fails first.
    private func awaitDurable(
        _ round: consuming Round, replies: [Reply], waitFor: UInt64, context: ChannelHandlerContext, write: Bool = true
    ) {
        guard let loopState else { preconditionFailure("only connections on a server loop run rounds in place") }
        precondition(awaiting == nil, "one round at a time")
        awaiting = (consume round, replies, waitFor, context)
        // No closure per round: the loop's DurableReplies calls durableReached(_:) back.
        loopState.wait(for: waitFor, self, write: write)
    }

    /// The round in ``awaiting`` is durable (or never will be): answer it, after the replicas'
    /// acknowledgements when semi-synchronous.
    func durableReached(_ failure: String?) {
        // Taken out of `awaiting`, not copied.
        guard let (round, replies, position, context) = awaiting.take() else { preconditionFailure("no round waits") }
        let answered = failure.map { reason in replies.map { _ in Reply.rejected(.unavailable(reason)) } } ?? replies
        guard failure == nil, server.configuration.minReplicasToWrite > 0, round.hasChanges else {
            server.endRound(changes: round.hasChanges)
            let closeAfter = round.closeAfter
            complete(round, replies: answered, tail: nil, closeAfter: closeAfter, context: context)
            return
        }
        // Semi-synchronous: then the replicas' acknowledgements, back on this loop.
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let loop = context.eventLoop
        server.awaitReplicas(round.batch, answered, position: position) { replicated in
            loop.execute {
                let (handler, context) = bound.value
                handler.server.endRound(changes: round.hasChanges)
                handler.complete(round, replies: replicated, tail: nil, closeAfter: round.closeAfter, context: context)
            }
        }
    }

    /// The general path: a task runs the batch with ``Engine/execute(_:now:)`` (which awaits each shard
    /// it needs) and the round's async step, then finishes the round on the loop. With `partial`, the
    /// part of the batch that ran in place is not run again: ``Engine/executeRest(_:_:)`` runs the rest.
    private func runAsync(_ round: Round, context: ChannelHandlerContext, partial: Engine.PartialRun? = nil) {
        let engine = server.engine
        let server = self.server
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let loop = context.eventLoop
        let presence = self.presence
        let resp3 = self.resp3
        // An EVENTS takes its turn once it is about to read the log, unless its round holds one.
        let turn = round.heavy && !round.turnAtStart ? heavyRounds.map(HeavyTurn.init) : nil
        Task(executorPreference: executor) {
            var replies: [Reply]
            if let partial {
                replies = await engine.executeRest(round.batch, partial)
            } else {
                replies = round.batch.isEmpty ? [] : await engine.execute(round.batch, now: wallClockMillis())
            }
            if server.configuration.minReplicasToWrite > 0, round.hasChanges {
                // Every change of the batch is durable here: the durable position covers them.
                let position = server.store.journal.lastDurableLSN
                replies = await withCheckedContinuation { continuation in
                    server.awaitReplicas(round.batch, replies, position: position) { continuation.resume(returning: $0) }
                }
            }
            // The batch's changes are done (durable, and past the replicas' wait when semi-synchronous):
            // a step that lets changes in flight finish first (REPLICAOF) must not wait for this round's.
            if round.hasChanges { server.endChanges() }
            // Replies without a bound (an AUDIT of every SKU) are encoded here a slice at a time,
            // on this loop (the task prefers it) with its other work in between.
            var unbounded = ReplyEncoding.Unbounded()
            if round.turnAtStart { unbounded = await ReplyEncoding.encodeUnbounded(&replies, resp3: resp3, on: loop) }
            let answered = replies
            let encoded = unbounded
            let (tail, stepCloses, stepNanos) = if let step = round.step { await server.run(step: step, presence: presence, turn: turn) } else { (nil, false, 0) }
            server.endRound(changes: false)
            loop.execute {
                let (handler, context) = bound.value
                // The step's reply was encoded on this loop (the task prefers it).
                let charged = stepNanos + encoded.nanos
                if round.heavy, charged > 0 { handler.heavyRounds?.charge(charged, now: monotonicNanos()) }
                handler.complete(
                    round, replies: answered, encoded: encoded.encoded, tail: tail, closeAfter: round.closeAfter || stepCloses,
                    turnTaken: turn?.taken ?? false, context: context)
            }
        }
    }

    /// A round's replies are ready: write them, then go on with the input that arrived meanwhile.
    /// `encoded`: replies already encoded, by index (``ReplyEncoding/encodeUnbounded(_:resp3:allocator:later:)``).
    /// `turnTaken`: its step took a turn in ``heavyRounds`` (``HeavyTurn``), given back here.
    private func complete(
        _ round: consuming Round, replies: [Reply], encoded: [Int: [ByteBuffer]] = [:], tail: ByteBuffer?, closeAfter: Bool,
        turnTaken: Bool = false, context: ChannelHandlerContext
    ) {
        busy = false
        let encodeStarted = monotonicNanos()
        finish(context: context, round: round, replies: replies, encoded: encoded, tail: tail, closeAfter: closeAfter)
        let encodeNanos = monotonicNanos() - encodeStarted
        loopNanos += encodeNanos
        if round.heavy, let heavyRounds {
            heavyRounds.charge(encodeNanos, now: monotonicNanos())
            if round.turnAtStart || turnTaken { heavyRounds.finished() }
        }
        recycle(round)
        // Commands that arrived while this round ran, on the next turn of the loop.
        processOnNextTurn(context: context)
        resumeReading(context: context)
    }

    /// A finished round's arrays serve the next round (``buildRound(into:context:)`` empties them), as
    /// does its local reply buffer if ``finish`` did not keep the one it wrote.
    private func recycle(_ round: borrowing Round) {
        if round.slots.capacity <= Self.spareCapacityMax { spareSlots = round.slots }
        if round.batch.capacity <= Self.spareCapacityMax { spareBatch = round.batch }
        if spareLocal == nil, round.local.capacity <= Self.spareBufferBytesMax { spareLocal = round.local }
    }

    /// The spare buffer in `spare`, emptied, or a new one.
    private static func reuse(_ spare: inout ByteBuffer?, context: ChannelHandlerContext) -> ByteBuffer {
        guard var buffer = spare.take() else { return context.channel.allocator.buffer(capacity: 256) }
        buffer.clear()
        return buffer
    }

    /// Writes a round's replies in order with one flush. Checks the output limit while they are
    /// built: past ``ServerConfiguration/clientOutputBytesMax`` of unread replies, the rest of the
    /// round is not encoded, the client gets an error and is disconnected. `encoded`: replies
    /// encoded already, by index, written as they are.
    private func finish(
        context: ChannelHandlerContext, round: Round, replies: [Reply], encoded: [Int: [ByteBuffer]] = [:], tail: ByteBuffer?,
        closeAfter: Bool
    ) {
        guard context.channel.isActive else { return }
        // A write can change the channel's writability, and its handler starts the next round at once:
        // not while this round is being written (review found the round after an output-limit error
        // run from inside the write of the error). The caller starts the next round afterwards.
        let wasBusy = busy
        busy = true
        defer { busy = wasBusy }
        let outputMax = server.configuration.clientOutputBytesMax
        // Bytes written and not yet taken by the socket. A writable channel holds fewer than its
        // high water mark, so the exact count (a channel option: a dynamic cast and a lookup) is
        // asked for only when that bound and this round's output could pass the limit.
        let writable = context.channel.isWritable
        var unreadExact: Int?
        func unread() -> Int {
            if unreadExact == nil { unreadExact = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0 }
            return unreadExact!
        }
        // Bytes of this round handed to the channel already (replies encoded before, written apart).
        var written = 0
        func pastLimit(with bytes: Int) -> Bool {
            let bytes = written + bytes
            if writable && server.writeBufferHighWaterBytes + bytes <= outputMax { return false }
            return unread() + bytes > outputMax
        }
        var out: ByteBuffer
        var tally = round.tally
        var overLimit = false
        if round.batch.isEmpty {
            // Only replies written while the round was built: they are the output as they are, up to
            // the one that would pass the limit, whose place the error takes.
            out = round.local
            if pastLimit(with: out.readableBytes) {
                overLimit = true
                let base = out.readerIndex
                var fits = base
                for case .local(_, let end) in round.slots {
                    if pastLimit(with: end - base) { break }
                    fits = end
                }
                out.moveWriterIndex(to: fits)
            }
        } else {
            out = Self.reuse(&spareOut, context: context)
            out.reserveCapacity(minimumWritableBytes: round.local.readableBytes + 64 * round.batch.count)
            slots: for slot in round.slots {
                // Where this slot's reply begins: a reply that passes the limit is taken back, and
                // the error takes its place (written after it, a large reply could fill the socket,
                // and the close drop the error with it).
                var before = out.writerIndex
                switch slot {
                case .local(let start, let end):
                    out.writeImmutableBuffer(round.local.getSlice(at: start, length: end - start)!)
                case .engine(let index, let name) where !encoded.isEmpty && encoded[index] != nil:
                    // Written as it is, after what the round has so far; not at all when it would
                    // pass the output limit. The channel's count of unread bytes is taken before the
                    // round writes anything (`written` counts what it wrote since).
                    _ = unread()
                    let reply = encoded[index]!
                    let bytes = reply.reduce(0) { $0 + $1.readableBytes }
                    if pastLimit(with: out.readableBytes + bytes) {
                        overLimit = true
                        break slots
                    }
                    if out.readableBytes > 0 {
                        written += out.readableBytes
                        context.write(wrapOutboundOut(out), promise: nil)
                        out = context.channel.allocator.buffer(capacity: 256)
                    }
                    written += bytes
                    for slice in reply { context.write(wrapOutboundOut(slice), promise: nil) }
                    before = out.writerIndex  // written apart: nothing of it in `out` to take back
                    tally.add(name, ReplyEncoding.outcome(replies[index]))
                case .engine(let index, let name):
                    // Read in place, not copied out of the array. Only one error's text depends on
                    // the command (BADQTY): no copy of the command otherwise (a sold-out answer is
                    // the common error).
                    if case .rejected(.badQuantity) = replies[index] {
                        ReplyEncoding.write(replies[index], to: round.batch[index], resp3: resp3, into: &out)
                    } else {
                        ReplyEncoding.write(replies[index], resp3: resp3, into: &out)
                    }
                    tally.add(name, ReplyEncoding.outcome(replies[index]))
                }
                if pastLimit(with: out.readableBytes) {
                    out.moveWriterIndex(to: before)
                    overLimit = true
                    break slots
                }
            }
        }
        server.metrics.count(tally)
        if !replies.isEmpty || round.soldOutAnswers {
            server.metrics.roundDuration.record(Duration.nanoseconds(Int64(monotonicNanos() - round.started)))
        }
        if var tail, !overLimit { out.writeBuffer(&tail) }
        if overLimit || pastLimit(with: out.readableBytes) {
            server.logger.warning("closing a client with more than \(outputMax) bytes of unread replies (--max-output-bytes)")
            out.writeRESPError("ERR output buffer limit reached: more than \(outputMax) bytes of replies unread (--max-output-bytes); closing")
            // Closed once what is written reaches the socket (a client that does not read is closed by
            // the stall timer): closed at once, the writes still pending were dropped, the error with
            // them, and a client that read slowly got a reply cut short and no error (review).
            context.write(wrapOutboundOut(out), promise: nil)
            closeAfterWrites(context: context)
            return
        }
        // No promise: a write's outcome matters only before a close (``closeAfterWrites``).
        if out.readableBytes > 0 {
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        } else if written > 0 {
            context.flush()
        }
        // The buffer serves the next round once the socket has taken it (see ``spareOut``).
        if out.capacity <= Self.spareBufferBytesMax {
            if round.batch.isEmpty { spareLocal = out } else { spareOut = out }
        }
        if closeAfter { closeAfterWrites(context: context) }
    }

    /// Closes after everything written so far, lingering as a web server's close does: the output is
    /// shut once the writes reach the socket (the client reads every reply, then the end of the
    /// stream), and what the client still sends is read and dropped until it closes too, for at most
    /// ``lingerSeconds`` and ``lingerBytesMax``. A socket closed with unread input is answered with a
    /// reset, which drops the replies still in its send queue: a slow reader that went on sending
    /// after QUIT lost its last replies and the `+OK`. Called once a connection (later calls return).
    private func closeAfterWrites(context: ChannelHandlerContext) {
        guard !outputShutRequested else { return }
        outputShutRequested = true
        closing = true
        inbound = nil
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let shut = context.eventLoop.makePromise(of: Void.self)
        // Shuts the socket's output once every pending write is on it (SwiftNIO keeps the order).
        context.flush()
        context.close(mode: .output, promise: shut)
        shut.futureResult.whenComplete { result in
            let (handler, context) = bound.value
            guard case .success = result, !handler.gone, !handler.inputClosed else {
                context.close(promise: nil)
                return
            }
            handler.lingering = true
            let channel = context.channel
            handler.lingerTimer = context.eventLoop.scheduleTask(in: .seconds(Self.lingerSeconds)) {
                channel.close(promise: nil)
            }
            context.read()
        }
    }

    /// The outcome label of the reply written at `start`: "ok", or the error's code in lower case.
    private func outcomeOf(_ out: ByteBuffer, at start: Int) -> String {
        guard out.getInteger(at: start, as: UInt8.self) == UInt8(ascii: "-") else { return "ok" }
        let line = out.getString(at: start + 1, length: min(out.writerIndex - start - 1, 16)) ?? ""
        return line.prefix { $0 != " " && $0 != "\r" }.lowercased()
    }
}

/// Whether a connection's client is still there (it has not closed or half-closed): a step that
/// waits for it (WAIT) stops waiting once it is gone, so a closed socket is not held open.
final class ClientPresence: Sendable {
    private let gone = Atomic<Bool>(false)
    /// The hook of a blocked EVENTS wait, called once when the client leaves, or nil once called.
    private let onLeave = Mutex<(@Sendable () -> Void)?>(nil)

    /// The client half-closed or closed (the server cannot tell them apart until it writes): steps
    /// that wait on its behalf (WAIT) stop waiting, and a blocked EVENTS wait ends now.
    func leave() {
        gone.store(true, ordering: .releasing)
        takeHook()?()
    }

    var isGone: Bool { gone.load(ordering: .acquiring) }

    /// Calls `hook` when the client leaves, or now if it has (replacing an earlier hook); nil
    /// clears it.
    func whenGone(_ hook: (@Sendable () -> Void)?) {
        onLeave.withLock { $0 = hook }
        if hook != nil, isGone { takeHook()?() }
    }

    private func takeHook() -> (@Sendable () -> Void)? {
        onLeave.withLock { hook in
            defer { hook = nil }
            return hook
        }
    }
}

/// Compares without returning early, so the time taken does not reveal how much of a guess matched.
func constantTimeEqual(_ a: ByteBuffer, _ b: String) -> Bool {
    let x = Array(a.readableBytesView), y = Array(b.utf8)
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

/// Lines about protocol errors, at most ``linesPerSecond`` a second for the whole server: a client
/// cannot flood the log by sending garbage. Lines past that are counted, and one line says how many
/// were left out when the second is over.
final class ProtocolErrorLog: Sendable {
    /// Enough to see what is going on; few enough that a flood of bad connections costs the log
    /// at most a few KiB a second.
    static let linesPerSecond = 10

    private struct Window {
        var startNanos: UInt64 = 0
        var logged = 0
        var suppressed = 0
        var summaryScheduled = false
    }

    private let window = Mutex(Window())
    private let nowNanos: @Sendable () -> UInt64

    init(nowNanos: @escaping @Sendable () -> UInt64 = { monotonicNanos() }) { self.nowNanos = nowNanos }

    /// Logs `message` unless this second's lines are used up; then the first suppressed line
    /// schedules the summary on `loop` for when the second ends.
    func record(_ message: String, peer: String, logger: Logger, loop: EventLoop?) {
        enum Decision { case log(summary: Int), suppress(scheduleSummary: Bool) }
        let decision: Decision = window.withLock { w in
            // The time is read under the lock: read before it, it could be older than a window
            // another loop has just started, and the difference would underflow (a trap).
            let now = nowNanos()
            var summary = 0
            if now >= w.startNanos, now - w.startNanos >= 1_000_000_000 {
                summary = w.suppressed
                w = Window(startNanos: now)
            }
            if w.logged < Self.linesPerSecond {
                w.logged += 1
                return .log(summary: summary)
            }
            w.suppressed += 1
            defer { w.summaryScheduled = true }
            return .suppress(scheduleSummary: !w.summaryScheduled)
        }
        switch decision {
        case .log(let summary):
            if summary > 0 { logger.info("\(summary) more protocol errors were not logged (at most \(Self.linesPerSecond) lines a second)") }
            logger.info("\(message)", metadata: ["peer": "\(peer)"])
        case .suppress(let scheduleSummary):
            guard scheduleSummary, let loop else { return }
            loop.scheduleTask(in: .seconds(1)) { self.flushSummary(logger: logger) }
        }
    }

    /// Logs how many lines were left out in a second that is over (the next error would say it too).
    func flushSummary(logger: Logger) {
        let summary: Int = window.withLock { w in
            let now = nowNanos()  // under the lock, as in `record`
            guard now >= w.startNanos, now - w.startNanos >= 1_000_000_000, w.suppressed > 0 else { return 0 }
            defer { w = Window(startNanos: w.startNanos, logged: w.logged, suppressed: 0, summaryScheduled: false) }
            return w.suppressed
        }
        if summary > 0 { logger.info("\(summary) more protocol errors were not logged (at most \(Self.linesPerSecond) lines a second)") }
    }

    /// Lines logged and suppressed in the current second (for tests).
    var counts: (logged: Int, suppressed: Int) { window.withLock { ($0.logged, $0.suppressed) } }
}
