import StockadeCore
import Testing
@testable import StockadeServer

@Suite struct CommandTableTests {
    @Test func parsesEngineCommandsAndRefusesBadArguments() {
        #expect(CommandTable.parse(["reserve", "ann", "tv", "2", "req", "r1", "TTL", "500"])
            == .engine(.reserve(user: "ann", lines: [OrderLine(sku: "tv", quantity: 2)], requestId: "r1", ttlMillis: 500)))
        #expect(CommandTable.parse(["BUY", "bob", "a", "1", "b", "2", "REQ", "x"])
            == .engine(.reserve(user: "bob", lines: [OrderLine(sku: "a", quantity: 1), OrderLine(sku: "b", quantity: 2)], requestId: "x", ttlMillis: nil)))
        #expect(CommandTable.parse(["RESERVE", "ann", "tv", "many"]) == .invalid("ERR value is not an integer or out of range"))
        #expect(CommandTable.parse(["RESERVE", "ann", "tv"]) == .invalid("ERR wrong number of arguments for 'reserve' command"))
        #expect(CommandTable.parse(["BUY", "bob", "a", "1", "TTL"]) == .invalid("ERR syntax error: TTL needs a value"))
        #expect(CommandTable.parse(["SKU.ADD", "x", "5", "LIMIT", "1"]) == .engine(.addSku(sku: "x", total: 5, limit: 1)))
        #expect(CommandTable.parse(["DEDUCT", "x"]) == .engine(.deduct(sku: "x", quantity: 1)))
        #expect(CommandTable.parse(["CONFIRM", "not-a-number"]) == .engine(.confirm(OrderID(rawValue: 0))))
        #expect(CommandTable.parse(["EVENTS", "5", "COUNT", "0"]) == .invalid("ERR COUNT must be 1 to 10000"))
        #expect(CommandTable.parse(["EVENTS", "5", "BLOCK", "100"]) == .events(from: 5, count: 100, blockMillis: 100))
        #expect(CommandTable.parse(["HELLO", "3", "AUTH", "default", "pw"]) == .hello(version: 3, password: "pw"))
        #expect(CommandTable.parse(["nope"]) == .invalid("ERR unknown command 'nope'"))
    }

    @Test func globMatchesLikeRedisAndStaysFast() {
        #expect(globMatch("*", "save"))
        #expect(globMatch("app*", "appendfsync"))
        #expect(globMatch("?ave", "save"))
        #expect(!globMatch("app*x", "appendfsync"))
        #expect(globMatch("*fsync", "appendfsync"))
        // Many stars against a non-matching text: answered at once, not in exponential time.
        #expect(!globMatch(String(repeating: "*", count: 10_000) + "z", "appendfsync"))
    }
}
