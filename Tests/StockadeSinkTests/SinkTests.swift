import NIOCore
import StockadeWire
import Testing
@testable import StockadeSink

/// An EVENTS entry as the server writes it in RESP2, read back by the sink's parser.
private func entry(_ bytes: String) -> RESPReply {
    var buffer = ByteBuffer(string: bytes)
    return try! RESPReplyParser(bulkAsBytes: true).next(&buffer)!
}

private func bulk(_ bytes: [UInt8]) -> RESPReply { .bytes(bytes) }

@Suite struct SinkEventTests {
    @Test func decodesEveryEventType() throws {
        #expect(try SinkEvent.decode(entry("*5\r\n:1\r\n$9\r\nsku-added\r\n$2\r\ntv\r\n:10\r\n:2\r\n"))
            == SinkEvent(position: 1, change: .skuAdded(sku: "tv", total: 10, limit: 2)))
        #expect(try SinkEvent.decode(entry("*4\r\n:2\r\n$9\r\nrestocked\r\n$2\r\ntv\r\n:-3\r\n"))
            == SinkEvent(position: 2, change: .restocked(sku: "tv", delta: -3)))
        #expect(try SinkEvent.decode(entry("*3\r\n:3\r\n$6\r\npaused\r\n$2\r\ntv\r\n")).change == .pausedChanged(sku: "tv", paused: true))
        #expect(try SinkEvent.decode(entry("*3\r\n:4\r\n$7\r\nresumed\r\n$2\r\ntv\r\n")).change == .pausedChanged(sku: "tv", paused: false))
        #expect(try SinkEvent.decode(entry("*4\r\n:5\r\n$8\r\ndeducted\r\n$2\r\ntv\r\n:1\r\n")).change == .deducted(sku: "tv", quantity: 1))
        let created = "*6\r\n:6\r\n$7\r\ncreated\r\n$20\r\n18446744073709551615\r\n$3\r\nann\r\n:1700000000000\r\n*4\r\n$2\r\ntv\r\n:2\r\n$1\r\nx\r\n:1\r\n"
        #expect(try SinkEvent.decode(entry(created)).change == .created(
            order: UInt64.max, user: "ann", deadlineMillis: 1_700_000_000_000,
            items: [SinkEvent.Item(sku: "tv", quantity: 2), SinkEvent.Item(sku: "x", quantity: 1)]))
        #expect(try SinkEvent.decode(entry("*3\r\n:7\r\n$4\r\npaid\r\n$2\r\n42\r\n")).change == .paid(order: 42))
        #expect(try SinkEvent.decode(entry("*3\r\n:8\r\n$9\r\ncancelled\r\n$2\r\n42\r\n")).change == .cancelled(order: 42))
        #expect(try SinkEvent.decode(entry("*3\r\n:9\r\n$7\r\nexpired\r\n$2\r\n42\r\n")).change == .expired(order: 42))
        #expect(try SinkEvent.decode(entry("*3\r\n:10\r\n$5\r\nepoch\r\n:7\r\n")).change == .epoch(7))
    }

    /// Ids are bytes: not UTF-8, or equal to another as Unicode, they stay what the server sent.
    @Test func idsStayBytes() throws {
        let invalid: [UInt8] = [0x63, 0x61, 0x66, 0xFF, 0x00]
        let event = try SinkEvent.decode(.array([.integer(1), bulk(Array("sku-added".utf8)), bulk(invalid), .integer(1), .integer(0)]))
        guard case .skuAdded(let sku, _, _) = event.change else { Issue.record("not sku-added"); return }
        #expect(sku.bytes == invalid)
        #expect(sku.text == nil)  // no text column for it: not UTF-8 (and a NUL)
        let composed = try SinkEvent.decode(entry("*3\r\n:1\r\n$6\r\npaused\r\n$5\r\ncaf\u{E9}\r\n"))
        let decomposed = try SinkEvent.decode(entry("*3\r\n:1\r\n$6\r\npaused\r\n$6\r\ncafe\u{301}\r\n"))
        #expect(composed != decomposed)
        #expect(ID(Array("caf\u{E9}".utf8)).text == "caf\u{E9}")
    }

    @Test func refusesWhatIsNotAnEvent() {
        let bad: [RESPReply] = [
            .integer(1),
            .array([.integer(1), bulk(Array("sku-added".utf8))]),
            .array([.integer(0), bulk(Array("paid".utf8)), bulk(Array("1".utf8))]),
            .array([.integer(1), bulk(Array("paid".utf8)), bulk(Array("one".utf8))]),
            .array([.integer(1), bulk(Array("refunded".utf8)), bulk(Array("1".utf8))]),
            .array([.integer(1), bulk(Array("created".utf8)), bulk(Array("1".utf8)), bulk(Array("u".utf8)), .integer(5), .array([])]),
            .array([.integer(1), bulk(Array("restocked".utf8)), bulk([]), .integer(5)]),
            // An epoch is a number from 1, alone.
            .array([.integer(1), bulk(Array("epoch".utf8)), .integer(0)]),
            .array([.integer(1), bulk(Array("epoch".utf8)), .integer(3), .integer(4)]),
            // Amounts no server logs: a deduction below 1, a negative total, a SKU twice in a basket.
            .array([.integer(1), bulk(Array("deducted".utf8)), bulk(Array("tv".utf8)), .integer(Int64.min)]),
            .array([.integer(1), bulk(Array("deducted".utf8)), bulk(Array("tv".utf8)), .integer(0)]),
            .array([.integer(1), bulk(Array("sku-added".utf8)), bulk(Array("tv".utf8)), .integer(-1), .integer(0)]),
            .array([.integer(1), bulk(Array("created".utf8)), bulk(Array("1".utf8)), bulk(Array("u".utf8)), .integer(5),
                    .array([bulk(Array("tv".utf8)), .integer(1), bulk(Array("tv".utf8)), .integer(2)])]),
            // A deadline no timestamptz column takes.
            .array([.integer(1), bulk(Array("created".utf8)), bulk(Array("1".utf8)), bulk(Array("u".utf8)), .integer(Int64.max),
                    .array([bulk(Array("tv".utf8)), .integer(1)])]),
        ]
        for reply in bad {
            #expect(throws: SinkError.self) { try SinkEvent.decode(reply) }
            do { _ = try SinkEvent.decode(reply) } catch { #expect(error.code == .badEvent) }
        }
    }
}

@Suite struct SinkAddressTests {
    @Test func parsesPostgresURLs() throws {
        let full = try DatabaseAddress.parse("postgres://app:s%40cret@db.local:6432/shop?sslmode=disable", environment: ["PGPASSWORD": "other"])
        #expect(full == DatabaseAddress(host: "db.local", port: 6432, user: "app", password: "s@cret", database: "shop"))
        let bare = try DatabaseAddress.parse("postgresql://app@127.0.0.1", environment: ["PGPASSWORD": "env"])
        #expect(bare == DatabaseAddress(host: "127.0.0.1", port: 5432, user: "app", password: "env", database: "app"))
        #expect(full.description == "postgres://app@db.local:6432/shop")  // never the password
        // A NUL byte cannot go into PostgreSQL's start-up message (its strings end at one): the
        // server answered a protocol error, which the sink retried for ever.
        for wrong in ["mysql://a@b/c", "postgres://db/shop", "postgres://a@b:0/c", "not a url", "postgres://a@b/c?sslmode=require",
                      "postgres://a@b/sink%00x", "postgres://a%00b@h/c", "postgres://a:p%00w@h/c",
                      "postgres://a@127.0.0.1%00.db.example:5432/c", "postgres://a@h%20x/c"] {
            #expect(throws: SinkError.self) { try DatabaseAddress.parse(wrong, environment: [:]) }
        }
    }

    @Test func parsesRedisURLs() throws {
        #expect(try ServerAddress.parse("redis://127.0.0.1:7379") == ServerAddress(host: "127.0.0.1", port: 7379, password: nil))
        #expect(try ServerAddress.parse("redis://:pw@h") == ServerAddress(host: "h", port: 7379, password: "pw"))
        #expect(throws: SinkError.self) { try ServerAddress.parse("rediss://h:1") }
        #expect(throws: SinkError.self) { try ServerAddress.parse("redis://127.0.0.1%00.example:7379") }
        // An IPv6 address in brackets is resolved without them (the sink looked the brackets up by name).
        #expect(try ServerAddress.parse("redis://[::1]:7379").host == "::1")
        #expect(try DatabaseAddress.parse("postgres://u@[::1]:5432/d", environment: [:]).host == "::1")
    }

    @Test func configurationBoundsNameTheirFlag() {
        var configuration = SinkConfiguration(server: ServerAddress(host: "h", port: 1), database: DatabaseAddress(host: "h", port: 1, user: "u", database: "d"))
        configuration.batchEventsMax = 10_001
        #expect(throws: SinkError.self) { try configuration.validate() }
        configuration.batchEventsMax = 1
        configuration.waitMillis = 0
        do { try configuration.validate(); Issue.record("accepted --wait-ms 0") } catch { #expect(error.message.contains("--wait-ms")) }
    }

    /// TRIMMED and BEYOND stop the sink (not retried) and say how to recover.
    @Test func refusalsSayWhatToDo() {
        let trimmed = EventSource.refusal("TRIMMED 900 events before position 900 were removed after a snapshot", after: 41)
        #expect(trimmed.code == .trimmed && !trimmed.isRetryable)
        #expect(trimmed.message.contains("after position 41") && trimmed.message.contains("starts at 900"))
        #expect(trimmed.message.contains("--events-retention-segments"))
        let beyond = EventSource.refusal("BEYOND 10 position 42 is beyond the end of the log (last position 10)", after: 41)
        #expect(beyond.code == .beyond && !beyond.isRetryable && beyond.message.contains("start over"))
        #expect(EventSource.refusal("UNAVAILABLE fsync failed", after: 1).isRetryable)
        // Starting over from a trimmed log would miss what came before it: the message says so.
        #expect(trimmed.message.contains("--reset") && trimmed.message.contains("before position 900"))
    }

    /// A lock held past lock_timeout, a serialization failure, a deadlock, a server shutting down or
    /// out of connections: retried with backoff. A refused login, a broken constraint: not.
    @Test func transientDatabaseErrorsAreRetried() {
        #expect(Database.transientStates.contains("55P03"))
        for state in ["55P03", "40001", "40P01", "57P01", "53300", "08006", "25006"] {
            let prefixRetried = ["08", "57", "53", "40"].contains(String(state.prefix(2)))
            #expect(prefixRetried || Database.transientStates.contains(state), "\(state)")
        }
    }
}
