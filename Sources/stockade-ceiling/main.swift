// stockade-ceiling: the fastest a SwiftNIO RESP server can answer on this machine, as a yardstick.
//
// Per read it counts the complete commands in the bytes read (multibulk `*N\r\n$len\r\n...` and inline
// lines; a partial command is carried to the next read) and answers `+PONG\r\n` for each, in one buffer,
// with one flush per read. No routing, no engine, no log: whatever `stockade serve` costs beyond this is
// the cost of Stockade itself, so `scripts/compare.py` reports PING and the sold-out commands of Stockade
// as a ratio to this server (issue #8). It uses the same event-loop count and child-channel options as
// `stockade serve`, so the two differ only in what a read does.
//
// Usage: stockade-ceiling [--host 127.0.0.1] [--port 7380] [--threads N]   (N: System.coreCount)
// A benchmark tool for loopback: it trusts its client's framing only as far as counting needs; a byte
// that cannot be part of a RESP frame closes the connection.

import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Counts complete RESP requests in a byte stream fed in arbitrary pieces, without keeping the bytes.
///
/// The state after a piece says where in a frame the stream stopped, so a command split over reads is
/// counted once, in the read that completes it, and each byte is looked at at most once (bulk payloads
/// are skipped by length, inline lines by `memchr`).
struct CommandCounter {
    private enum State {
        /// At the first byte of a request.
        case requestStart
        /// Inside an inline request line, until its `\n`.
        case inline
        /// In the digits of `*N\r\n`.
        case argumentCount(Int)
        /// At the `$` of an argument's `$len\r\n`; `argumentsLeft` includes this one.
        case bulkStart(argumentsLeft: Int)
        /// In the digits of `$len\r\n`.
        case bulkLength(Int, argumentsLeft: Int)
        /// In an argument's payload and its `\r\n`.
        case bulkBody(bytesLeft: Int, argumentsLeft: Int)
    }

    /// Lengths and counts above this are not RESP a benchmark sends; they end the connection rather than
    /// overflow. Redis's own defaults are far below (512 MB bulk, 1024*1024*1024 arguments).
    static let numberMax = 1 << 40

    private var state = State.requestStart

    /// `value` with the decimal digit `digit` appended; nil past ``numberMax``.
    private static func appending(digit: UInt8, to value: Int) -> Int? {
        let next = value * 10 + Int(digit - UInt8(ascii: "0"))
        return next <= numberMax ? next : nil
    }

    /// Counts the requests that end in `bytes`; nil if `bytes` cannot continue a RESP stream.
    mutating func count(_ bytes: UnsafeRawBufferPointer) -> Int? {
        var complete = 0
        var index = 0
        let end = bytes.count
        while index < end {
            switch state {
            case .requestStart:
                switch bytes[index] {
                case UInt8(ascii: "*"): state = .argumentCount(0)
                case UInt8(ascii: "\r"), UInt8(ascii: "\n"): break  // blank lines between requests, as Redis skips them
                default: state = .inline
                }
                index += 1
            case .inline:
                guard let newline = memchr(bytes.baseAddress! + index, Int32(UInt8(ascii: "\n")), end - index) else {
                    index = end
                    continue
                }
                index = (newline - UnsafeMutableRawPointer(mutating: bytes.baseAddress!)) + 1
                complete += 1
                state = .requestStart
            case .argumentCount(let value):
                let byte = bytes[index]
                index += 1
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"):
                    guard let next = Self.appending(digit: byte, to: value) else { return nil }
                    state = .argumentCount(next)
                case UInt8(ascii: "\r"): break
                case UInt8(ascii: "\n"):
                    // `*0` is no request (Redis answers nothing); `*-1` is refused by the digit check above.
                    state = value == 0 ? .requestStart : .bulkStart(argumentsLeft: value)
                default: return nil
                }
            case .bulkStart(let argumentsLeft):
                guard bytes[index] == UInt8(ascii: "$") else { return nil }
                index += 1
                state = .bulkLength(0, argumentsLeft: argumentsLeft)
            case .bulkLength(let value, let argumentsLeft):
                let byte = bytes[index]
                index += 1
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"):
                    guard let next = Self.appending(digit: byte, to: value) else { return nil }
                    state = .bulkLength(next, argumentsLeft: argumentsLeft)
                case UInt8(ascii: "\r"): break
                case UInt8(ascii: "\n"): state = .bulkBody(bytesLeft: value + 2, argumentsLeft: argumentsLeft)
                default: return nil
                }
            case .bulkBody(let bytesLeft, let argumentsLeft):
                let taken = min(bytesLeft, end - index)
                index += taken
                if taken < bytesLeft {
                    state = .bulkBody(bytesLeft: bytesLeft - taken, argumentsLeft: argumentsLeft)
                } else if argumentsLeft > 1 {
                    state = .bulkStart(argumentsLeft: argumentsLeft - 1)
                } else {
                    complete += 1
                    state = .requestStart
                }
            }
        }
        return complete
    }
}

/// One connection: per read, `+PONG\r\n` for each request the read completes, in one buffer, one flush.
final class PongHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var counter = CommandCounter()

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        guard let requests = bytes.withUnsafeReadableBytes({ counter.count($0) }) else {
            context.close(promise: nil)
            return
        }
        guard requests > 0 else { return }
        let pong: StaticString = "+PONG\r\n"
        var reply = context.channel.allocator.buffer(capacity: requests * pong.utf8CodeUnitCount)
        for _ in 0..<requests {
            reply.writeStaticString(pong)
        }
        context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

var host = "127.0.0.1"
var port = 7380
var threads = System.coreCount
let usage = "usage: stockade-ceiling [--host 127.0.0.1] [--port 7380] [--threads N]"

/// A usage error: the message and the usage on stderr, exit status 2 (not a crash report).
func refuse(_ message: String) -> Never {
    let text = "stockade-ceiling: \(message)\n\(usage)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
    exit(2)
}

/// A failure to serve (the address cannot be listened on): one line on stderr, exit status 1, as
/// `stockade serve` does.
func fail(_ message: String) -> Never {
    let text = "stockade-ceiling: \(message)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
    exit(1)
}

var arguments = CommandLine.arguments.dropFirst()
while let flag = arguments.popFirst() {
    if flag == "--help" || flag == "-h" {
        print(usage)
        exit(0)
    }
    // The flag is known before its value is asked for: an unknown flag given last is named as unknown.
    func value() -> String {
        guard let value = arguments.popFirst() else { refuse("\(flag) needs a value") }
        return value
    }
    switch flag {
    case "--host": host = value()
    case "--port":
        guard let number = Int(value()), (0...65535).contains(number) else { refuse("--port must be 0...65535") }
        port = number
    case "--threads":
        // The bound of `stockade serve --io-threads`, so every setting there can be mirrored here.
        guard let number = Int(value()), (1...64).contains(number) else { refuse("--threads must be 1...64") }
        threads = number
    default: refuse("unknown option \(flag)")
    }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
// The options `stockade serve` sets on its client listener (Server.swift), so only the handler differs.
let bootstrap = ServerBootstrap(group: group)
    .serverChannelOption(.backlog, value: 1024)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
    .childChannelOption(.maxMessagesPerRead, value: 4)
    .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 << 10, high: 1 << 20))
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(PongHandler())
        }
    }
let listener: Channel
do {
    listener = try bootstrap.bind(host: host, port: port).wait()
} catch {
    fail("cannot listen on \(host):\(port): \(error)")
}
print("stockade-ceiling listening on \(host):\(listener.localAddress?.port ?? port), \(threads) event loops")
fflush(nil)  // all streams: `stdout` itself is shared mutable state to Swift 6
try listener.closeFuture.wait()
