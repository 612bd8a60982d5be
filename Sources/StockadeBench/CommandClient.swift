import NIOCore
import NIOPosix
import StockadeWire
import Synchronization

/// A plain request/reply connection for setup, audits and the sink's EVENTS (not for load).
package final class CommandClient: Sendable {
    private let channel: Channel
    private let handler: NIOLoopBound<ReplyHandler>

    private init(channel: Channel, handler: NIOLoopBound<ReplyHandler>) {
        self.channel = channel
        self.handler = handler
    }

    static func connect(group: EventLoopGroup, target: BenchTarget, password: String?) async throws -> CommandClient {
        try await connect(group: group, host: target.host, port: target.port, password: password)
    }

    /// Connects (and sends AUTH when `password` is set). `bulkAsBytes`: bulk replies come back as
    /// ``RESPReply/bytes(_:)``, for ids that must stay byte strings. `timeout`: for AUTH's answer
    /// (a server that accepts connections but does not answer would hold the caller forever).
    /// `onChannel`: called with the channel before it connects, so a caller can close it (and so end
    /// the connect and AUTH's wait) from another thread.
    package static func connect(
        group: EventLoopGroup, host: String, port: Int, password: String?, bulkAsBytes: Bool = false, timeout: TimeAmount? = nil,
        onChannel: (@Sendable (any Channel) -> Void)? = nil
    ) async throws -> CommandClient {
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                onChannel?(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ReplyHandler(parser: RESPReplyParser(bulkAsBytes: bulkAsBytes)))
                }
            }
            .connect(host: host, port: port).get()
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: ReplyHandler.self), eventLoop: channel.eventLoop)
        }.get()
        let client = CommandClient(channel: channel, handler: handler)
        if let password, !password.isEmpty {
            let reply = try await client.send(["AUTH", password], timeout: timeout)
            guard reply == .simple("OK") else {
                client.close()
                throw BenchError("AUTH failed: \(reply.string ?? "\(reply)")")
            }
        }
        return client
    }

    /// Sends one command and returns its reply; see ``pipeline(_:timeout:)`` for `timeout`.
    package func send(_ command: [String], timeout: TimeAmount? = nil) async throws -> RESPReply {
        try await pipeline([command], timeout: timeout)[0]
    }

    /// Sends commands in one write and returns their replies in order. On a connection that is
    /// already closed, or whose write fails, it fails at once (a reply that can never come must not
    /// be waited for). `timeout`: no complete answer by then closes the connection, which fails it.
    package func pipeline(_ commands: [[String]], timeout: TimeAmount? = nil) async throws -> [RESPReply] {
        let handler = self.handler
        let channel = self.channel
        return try await channel.eventLoop.flatSubmit {
            guard channel.isActive else { return channel.eventLoop.makeFailedFuture(BenchError("connection closed")) }
            let promise = channel.eventLoop.makePromise(of: [RESPReply].self)
            var out = channel.allocator.buffer(capacity: 256)
            for command in commands {
                out.writeRESPArrayHeader(command.count)
                for word in command { out.writeRESPBulk(word) }
            }
            handler.value.expect(commands.count, promise)
            channel.writeAndFlush(out).whenFailure { error in
                handler.value.fail(BenchError("write failed: \(error)"))
                channel.close(promise: nil)
            }
            if let timeout {
                let timer = channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
                promise.futureResult.whenComplete { _ in timer.cancel() }
            }
            return promise.futureResult
        }.get()
    }

    /// Closes the connection; a command waiting for its reply fails.
    package func close() { channel.close(promise: nil) }
}

final class ReplyHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var buffer: ByteBuffer?
    private var waiting: [(count: Int, promise: EventLoopPromise<[RESPReply]>)] = []
    private var collected: [RESPReply] = []
    private let parser: RESPReplyParser
    /// Parsing starts only once a whole reply is in: linear in a large reply's bytes however many
    /// reads bring it.
    private var scanner = RESPReplyScanner()

    init(parser: RESPReplyParser = RESPReplyParser()) { self.parser = parser }

    func expect(_ count: Int, _ promise: EventLoopPromise<[RESPReply]>) {
        waiting.append((count, promise))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if buffer == nil { buffer = bytes } else { buffer!.writeBuffer(&bytes) }
        do {
            while try scanner.complete(buffer!), let reply = try parser.next(&buffer!) {
                scanner.reset()
                if buffer!.readerIndex >= max(buffer!.readableBytes, 64 << 10) { buffer!.discardReadBytes() }
                collected.append(reply)
                if let first = waiting.first, collected.count == first.count {
                    waiting.removeFirst()
                    first.promise.succeed(collected)
                    collected = []
                }
            }
        } catch {
            fail(BenchError("bad reply stream: \(error.message)"))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(BenchError("connection closed"))
    }

    /// Fails every command waiting for its replies.
    func fail(_ error: Error) {
        for (_, promise) in waiting { promise.fail(error) }
        waiting = []
    }
}
