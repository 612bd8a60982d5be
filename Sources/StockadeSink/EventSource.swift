import Foundation
import NIOCore
import StockadeBench
import StockadeWire

/// Where the events come from: a Stockade server.
public struct ServerAddress: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var password: String?

    /// `redis://[[user]:password@]host[:port]` (`rediss://` is refused: Stockade speaks no TLS).
    public static func parse(_ url: String) throws(SinkError) -> ServerAddress {
        let parts = try URLParts.parse(url, schemes: ["redis"], defaultPort: 7379)
        return ServerAddress(host: parts.host, port: parts.port, password: parts.password)
    }

    public var description: String { "redis://\(host):\(port)" }
}

/// The parts of a `scheme://user:password@host:port/path?query` URL, percent-decoded.
struct URLParts {
    var host: String
    var port: Int
    var user: String?
    var password: String?
    var path: String
    var query: [(String, String)]
    var redacted: String

    static func parse(_ url: String, schemes: [String], defaultPort: Int) throws(SinkError) -> URLParts {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased() else {
            throw SinkError(.configuration, "'\(url)' is not a URL; expected \(schemes[0])://host:port")
        }
        var redactedComponents = components
        if components.password != nil { redactedComponents.password = "***" }
        let redacted = redactedComponents.string ?? "\(scheme)://..."
        guard schemes.contains(scheme) else {
            throw SinkError(.configuration, "'\(redacted)': the scheme must be \(schemes.map { $0 + "://" }.joined(separator: " or "))")
        }
        guard var host = components.host, !host.isEmpty else {
            throw SinkError(.configuration, "'\(redacted)' names no host")
        }
        // An IPv6 address is written in brackets in a URL, and resolved without them.
        if host.hasPrefix("["), host.hasSuffix("]"), host.count > 2 { host = String(host.dropFirst().dropLast()) }
        // Printable ASCII without spaces: a decoded %00 cut the name short
        // where it was resolved, and the sink connected to another host than the one shown.
        guard host.utf8.allSatisfy({ (0x21...0x7E).contains($0) }) else {
            throw SinkError(.configuration, "'\(redacted)': the host name must be printable ASCII without spaces or %-escapes of other bytes")
        }
        let port = components.port ?? defaultPort
        guard (1...65535).contains(port) else { throw SinkError(.configuration, "'\(redacted)': port must be 1 to 65535") }
        let path = components.percentEncodedPath.drop { $0 == "/" }
        return URLParts(
            host: host, port: port,
            user: components.percentEncodedUser?.removingPercentEncoding,
            password: components.percentEncodedPassword?.removingPercentEncoding,
            path: String(path).removingPercentEncoding ?? String(path),
            query: (components.queryItems ?? []).map { ($0.name, $0.value ?? "") },
            redacted: redacted)
    }
}

/// One connection to Stockade for EVENTS (and INFO, for the server's position). Bulk strings are
/// read as bytes, so ids stay byte strings. Not Sendable: one task owns it.
final class EventSource {
    private let client: CommandClient
    let address: ServerAddress

    private init(client: CommandClient, address: ServerAddress) {
        self.client = client
        self.address = address
    }

    /// Connects (and authenticates). `onChannel`: see ``CommandClient/connect(group:host:port:password:bulkAsBytes:timeout:onChannel:)``.
    static func connect(_ address: ServerAddress, group: EventLoopGroup, onChannel: (@Sendable (any Channel) -> Void)? = nil) async throws(SinkError) -> EventSource {
        do {
            let client = try await CommandClient.connect(
                group: group, host: address.host, port: address.port, password: address.password, bulkAsBytes: true,
                timeout: .milliseconds(replyTimeoutMillis), onChannel: onChannel)
            return EventSource(client: client, address: address)
        } catch let error as BenchError where error.description.hasPrefix("AUTH failed") {
            throw SinkError(.configuration, "Stockade at \(address.description) refused the password: \(error) (give it in the URL: redis://:password@host:port)")
        } catch {
            throw SinkError(.serverUnavailable, "Stockade at \(address.description): \(error)")
        }
    }

    /// How long past its BLOCK a reply may take before the connection is given up as hung (and
    /// reconnected): far more than a page of EVENTS takes to read and send.
    static let replyTimeoutMillis: Int64 = 30_000

    /// Closes the connection: a command waiting for its reply fails at once (how SIGTERM cuts a
    /// BLOCK wait short).
    func close() { client.close() }

    /// A closer usable from any thread.
    var closer: @Sendable () -> Void {
        let client = self.client
        return { client.close() }
    }

    /// Up to `count` events after `position`, waiting up to `blockMillis` for the first one (nil:
    /// not at all), with the server's term in force at `position` (LOG.TERM, in the same round trip:
    /// nil when the server no longer keeps it).
    func events(after position: UInt64, count: Int, blockMillis: Int?) async throws(SinkError) -> (events: [SinkEvent], termBefore: LogTerm?) {
        let replies: [RESPReply]
        do {
            var command = ["EVENTS", String(position + 1), "COUNT", String(count)]
            if let blockMillis { command += ["BLOCK", String(blockMillis)] }
            replies = try await client.pipeline(
                [["LOG.TERM", String(position)], command], timeout: .milliseconds(Int64(blockMillis ?? 0) + Self.replyTimeoutMillis))
        } catch {
            throw SinkError(.serverUnavailable, "Stockade at \(address.description): EVENTS: \(error)")
        }
        guard replies.count == 2 else {
            throw SinkError(.badEvent, "Stockade answered \(replies.count) replies to LOG.TERM and EVENTS, not 2")
        }
        let termBefore = try Self.term(replies[0], at: position)
        switch replies[1] {
        case .array(let entries?):
            guard entries.count <= count else {
                throw SinkError(.badEvent, "EVENTS \(position + 1) COUNT \(count) answered \(entries.count) events: the sink stops rather than trust the page")
            }
            var events: [SinkEvent] = []
            events.reserveCapacity(entries.count)
            for entry in entries {
                let event = try SinkEvent.decode(entry)
                // A page starts where it was asked and its positions are consecutive: a server that
                // answers otherwise (the same old page again and again) is not followed.
                guard event.position == position + 1 + UInt64(events.count) else {
                    throw SinkError(.badEvent, "EVENTS \(position + 1) answered an event at position \(event.position) where \(position + 1 + UInt64(events.count)) was due: the sink stops rather than skip or repeat a change")
                }
                events.append(event)
            }
            return (events, termBefore)
        case .error(let message):
            throw Self.refusal(message, after: position)
        default:
            throw SinkError(.badEvent, "EVENTS answered \(String(describing: replies[1]).prefix(200)), not an array")
        }
    }

    /// The server's term in force at `position` (LOG.TERM; nil when the server no longer keeps it).
    func term(at position: UInt64) async throws(SinkError) -> LogTerm? {
        let reply: RESPReply
        do {
            reply = try await client.send(["LOG.TERM", String(position)], timeout: .milliseconds(Self.replyTimeoutMillis))
        } catch {
            throw SinkError(.serverUnavailable, "Stockade at \(address.description): LOG.TERM: \(error)")
        }
        return try Self.term(reply, at: position)
    }

    /// Reads a LOG.TERM reply: `[epoch, start]`, with `start <= position` (both 0: no term).
    static func term(_ reply: RESPReply, at position: UInt64) throws(SinkError) -> LogTerm? {
        switch reply {
        case .array(let fields?) where fields.count == 2:
            guard case .integer(let epoch) = fields[0], case .integer(let start) = fields[1], epoch >= 0, start >= 0,
                  (epoch == 0) == (start == 0), UInt64(start) <= position
            else { break }
            return LogTerm(epoch: UInt64(epoch), start: UInt64(start))
        case .error(let message) where message.hasPrefix("TRIMMED "):
            return nil
        case .error(let message) where message.hasPrefix("ERR unknown command"):
            throw SinkError(.configuration, "the server does not know LOG.TERM, which the sink needs to tell whether it follows the same log: it is older than this sink; upgrade it (server: \(message))")
        case .error(let message):
            throw refusal(message, after: position)
        default:
            break
        }
        throw SinkError(.badEvent, "LOG.TERM \(position) answered \(String(describing: reply).prefix(200)), not [epoch, start]")
    }

    /// Whether the server is a replica (ROLE says `slave`): one whose log ends before the database's
    /// position may only be behind, not another log.
    func isReplica() async throws(SinkError) -> Bool {
        let reply: RESPReply
        do {
            reply = try await client.send(["ROLE"], timeout: .milliseconds(Self.replyTimeoutMillis))
        } catch {
            throw SinkError(.serverUnavailable, "Stockade at \(address.description): ROLE: \(error)")
        }
        guard case .array(let fields?) = reply, let first = fields.first else { return false }
        switch first {
        case .bytes(let bytes): return bytes == Array("slave".utf8)
        default: return first.string == "slave"
        }
    }

    /// The server's last durable position, from INFO persistence (for the lag).
    func serverPosition() async throws(SinkError) -> UInt64? {
        let reply: RESPReply
        do {
            reply = try await client.send(["INFO", "persistence"], timeout: .milliseconds(Self.replyTimeoutMillis))
        } catch {
            throw SinkError(.serverUnavailable, "Stockade at \(address.description): INFO: \(error)")
        }
        guard let text = reply.string else { return nil }
        for line in text.split(whereSeparator: \.isNewline) where line.hasPrefix("log_position_durable:") {
            return UInt64(line.dropFirst("log_position_durable:".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// The sink's error for an EVENTS refusal. TRIMMED and BEYOND say how to recover.
    static func refusal(_ message: String, after position: UInt64) -> SinkError {
        let words = message.split(separator: " ")
        switch words.first {
        case "TRIMMED":
            let oldest = words.count > 1 ? String(words[1]) : "?"
            return SinkError(.trimmed, """
                Stockade no longer has the events after position \(position) (its log now starts at \(oldest)): they were \
                removed after a snapshot, so this database cannot be brought up to date from EVENTS. Recover by \
                re-seeding the tables from an export taken at a snapshot and storing that snapshot's position in \
                stockade_sink_position (docs/OPERATIONS.md, "A trimmed log"). Starting over (--reset empties the \
                tables) needs a server whose log still starts at position 1: from this one, every SKU and order from \
                before position \(oldest) would be missing, so --reset refuses it. To keep this from happening, run the \
                server with a larger --events-retention-segments and keep the sink running. (server: \(message))
                """)
        case "BEYOND":
            return SinkError(.beyond, """
                the database has applied events up to position \(position), past the end of this server's log: the \
                server's data directory was replaced or restored from an older copy, or the sink is pointed at another \
                server. The database no longer matches the server: start over (run the sink once with --reset, which \
                empties its tables, then again without it). (server: \(message))
                """)
        case "NOAUTH", "WRONGPASS":
            return SinkError(.configuration, "Stockade refused the sink: \(message) (give the password in the URL: redis://:password@host:port)")
        default:
            return SinkError(.serverUnavailable, "Stockade answered EVENTS with: \(message)")
        }
    }
}
