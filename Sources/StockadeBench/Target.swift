import StockadeWire

/// Where the harness sends load, and how that system spells a flash sale.
public enum BenchTarget: Sendable, Equatable, CustomStringConvertible {
    case stockade(host: String, port: Int)
    /// Redis running the classic stock script (GET, check, DECRBY) with a per-user limit, via EVALSHA.
    case redis(host: String, port: Int)

    /// Parses `stockade://host:port` or `redis://host:port`.
    public init?(url: String) {
        let parts = url.split(separator: "://", maxSplits: 1).map(String.init)
        guard parts.count == 2 else { return nil }
        let hostPort = parts[1].split(separator: ":").map(String.init)
        guard hostPort.count == 2, let port = Int(hostPort[1]), !hostPort[0].isEmpty else { return nil }
        switch parts[0] {
        case "stockade": self = .stockade(host: hostPort[0], port: port)
        case "redis": self = .redis(host: hostPort[0], port: port)
        default: return nil
        }
    }

    public var host: String {
        switch self { case .stockade(let h, _), .redis(let h, _): h }
    }

    public var port: Int {
        switch self { case .stockade(_, let p), .redis(_, let p): p }
    }

    public var isRedis: Bool { if case .redis = self { true } else { false } }

    public var description: String {
        switch self {
        case .stockade(let h, let p): "stockade://\(h):\(p)"
        case .redis(let h, let p): "redis://\(h):\(p)"
        }
    }

    public var name: String { isRedis ? "Redis + Lua" : "Stockade" }
}

/// What one reservation attempt came to.
enum Outcome: Equatable {
    case success(order: String?)
    case soldOut
    case limit
    case other(String)

    var label: String {
        switch self {
        // A Stockade RESERVE places a hold (not a sale); the Redis script deducts (a sale).
        case .success(let order): order == nil ? "sold" : "held"
        case .soldOut: "SOLDOUT"
        case .limit: "LIMIT"
        case .other(let code): code
        }
    }
}

/// The widely used Redis stock script, with a per-user limit kept in the same script:
/// KEYS[1] = stock counter, KEYS[2] = hash of units bought per user; ARGV = user, limit, quantity.
/// Returns 1 deducted, 0 not enough stock, -1 no such SKU, -2 over the user's limit.
let redisStockScript = """
local stock = tonumber(redis.call('GET', KEYS[1]))
if stock == nil then return -1 end
local qty = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
if limit > 0 then
  local bought = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  if bought + qty > limit then return -2 end
end
if stock < qty then return 0 end
redis.call('DECRBY', KEYS[1], qty)
if limit > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], qty) end
return 1
"""

/// The commands of a scenario for one target.
struct Dialect: Sendable {
    let target: BenchTarget
    /// Set after SCRIPT LOAD (Redis).
    var scriptSHA = ""

    /// Hold TTL for Stockade reservations; nil: the server's default.
    var ttlMillis: Int?

    func reserve(user: String, sku: String, limit: Int) -> [String] {
        if target.isRedis {
            return ["EVALSHA", scriptSHA, "2", "stock:\(sku)", "bought:\(sku)", user, String(limit), "1"]
        }
        if let ttlMillis { return ["RESERVE", user, sku, "1", "TTL", String(ttlMillis)] }
        return ["RESERVE", user, sku, "1"]
    }

    func classify(_ reply: RESPReply) -> Outcome {
        switch reply {
        case .bulk(let id?) where !target.isRedis: return .success(order: id)
        case .integer(1) where target.isRedis: return .success(order: nil)
        case .integer(0) where target.isRedis: return .soldOut
        case .integer(-2) where target.isRedis: return .limit
        case .integer(-1) where target.isRedis: return .other("NOSKU")
        case .error:
            switch reply.errorCode {
            case "SOLDOUT": return .soldOut
            case "LIMIT": return .limit
            case let code?: return .other(code)
            default: return .other("ERR")
            }
        default: return .other("UNEXPECTED")
        }
    }
}
