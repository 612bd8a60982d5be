import NIOCore
import StockadeCore
import StockadeWire

/// Engine replies as RESP2. Every business outcome has a stable error code as its first word
/// (docs/PROTOCOL.md); a client branches on it.
package enum ReplyEncoding {
    /// Writes `reply`, the engine's answer to `command` (which says which bound an error names).
    package static func write(_ reply: Reply, to command: Command? = nil, into out: inout ByteBuffer) {
        switch reply {
        case .done:
            out.writeRESPSimple("OK")
        case .stock(let info):
            writeStock(info, into: &out)
        case .reserved(let id, _, _):
            out.writeRESPBulk(id.description)
        case .orderState(_, let state):
            out.writeRESPSimple(state.description)
        case .order(let info):
            writeOrder(info, into: &out)
        case .orders(let list):
            out.writeRESPArrayHeader(list.count)
            for info in list { writeOrder(info, into: &out) }
        case .deducted(let result):
            out.writeRESPInteger(Int64(result))
        case .audit(let findings):
            out.writeRESPArrayHeader(findings.count * 2)
            for finding in findings {
                out.writeRESPBulk(finding.sku)
                out.writeRESPBulk(finding.ok ? "OK" : finding.problem)
            }
        case .rejected(let rejection):
            out.writeRESPError(errorText(rejection, to: command))
        }
    }

    /// The most bytes the reply to `command` can take, from the bounds on what it returns: ids of
    /// at most ``Limits/nameBytesMax`` bytes, baskets of at most ``Limits/itemsPerOrderMax`` SKUs,
    /// pages of ORDERS. A connection admits commands into a round while the sum stays bounded, so
    /// one read cannot make the server build an unbounded pile of replies. `nil`: unbounded (AUDIT
    /// of every SKU), so the command gets a round of its own.
    static func replyBytesMax(_ command: Command) -> Int? {
        switch command {
        case .orders(_, _, let count): 16 + count * orderBytesMax
        case .order: orderBytesMax
        case .audit(let sku): sku == nil ? nil : 256 + errorBytesMax
        default: stockBytesMax + errorBytesMax
        }
    }

    /// An error line: a code, numbers, a reason (a log failure's text is the longest).
    static let errorBytesMax = 1024
    /// The STOCK array: 14 elements, one an id.
    static let stockBytesMax = 512
    /// One ORDER array: 10 elements, ids, and a basket of up to 64 SKUs and quantities.
    static let orderBytesMax = 256 + Limits.itemsPerOrderMax * (Limits.nameBytesMax + 40)

    /// `sku <id> total n available n reserved n sold n limit n paused 0|1`: a flat field/value array.
    static func writeStock(_ info: SkuInfo, into out: inout ByteBuffer) {
        out.writeRESPArrayHeader(14)
        out.writeRESPBulk("sku"); out.writeRESPBulk(info.sku)
        out.writeRESPBulk("total"); out.writeRESPInteger(info.total)
        out.writeRESPBulk("available"); out.writeRESPInteger(info.available)
        out.writeRESPBulk("reserved"); out.writeRESPInteger(info.reserved)
        out.writeRESPBulk("sold"); out.writeRESPInteger(info.sold)
        out.writeRESPBulk("limit"); out.writeRESPInteger(info.limit)
        out.writeRESPBulk("paused"); out.writeRESPInteger(info.paused ? 1 : 0)
    }

    /// `id <id> user <u> state <S> deadline <ms> items [sku qty ...]`.
    static func writeOrder(_ info: OrderInfo, into out: inout ByteBuffer) {
        out.writeRESPArrayHeader(10)
        out.writeRESPBulk("id"); out.writeRESPBulk(info.id.description)
        out.writeRESPBulk("user"); out.writeRESPBulk(info.user)
        out.writeRESPBulk("state"); out.writeRESPBulk(info.state.description)
        out.writeRESPBulk("deadline"); out.writeRESPInteger(info.deadlineMillis)
        out.writeRESPBulk("items")
        out.writeRESPArrayHeader(info.lines.count * 2)
        for line in info.lines {
            out.writeRESPBulk(line.sku)
            out.writeRESPInteger(line.quantity)
        }
    }

    /// The error line of a rejection: a stable code, then details naming the bound that applies.
    static func errorText(_ rejection: Rejection, to command: Command? = nil) -> String {
        switch rejection {
        case .soldOut: "SOLDOUT"
        case .insufficient(let available): "INSUFFICIENT \(available)"
        case .limitReached(let bought, let limit): "LIMIT \(bought) \(limit)"
        case .noSuchSku: "NOSKU"
        case .paused: "PAUSED"
        case .badQuantity:
            if case .restock = command {
                "BADQTY delta must be -\(Limits.stockMax) to \(Limits.stockMax)"
            } else {
                "BADQTY quantity must be 1 to \(Limits.quantityMax)"
            }
        case .badArgument(let message): "ERR \(message)"
        case .skuExists: "EXISTS"
        case .belowCommitted(let committed): "BELOWCOMMITTED \(committed)"
        case .noSuchOrder: "NOORDER"
        case .expired: "EXPIRED"
        case .wrongState(let state): "WRONGSTATE \(state)"
        case .requestInFlight: "INFLIGHT"
        case .requestConflict(let id): "REQCONFLICT request id already used for order \(id) with other SKUs or quantities"
        case .busy: "BUSY"
        case .unavailable(let reason): "UNAVAILABLE \(reason)"
        // Redis's words, which client libraries recognise.
        case .readOnly: "READONLY You can't write against a read only replica."
        case .notReplicated(let acknowledged, let wanted):
            "NOREPLICAS the change is durable on this primary, but only \(acknowledged) of \(wanted) replicas acknowledged it in time (--min-replicas-timeout-ms); a failover before they have it loses it"
        }
    }

    /// Whether a reply counts as a business rejection (for metrics: outcome label).
    static func outcome(_ reply: Reply) -> String {
        if case .rejected(let rejection) = reply { return errorText(rejection).prefix { $0 != " " }.lowercased() }
        return "ok"
    }

    /// One event: `[position, type, fields...]`. SKUs are named by id (looked up from the engine).
    static func writeEvent(position: UInt64, record: Record, skuName: (Int, UInt32) -> Name, into out: inout ByteBuffer) {
        switch record {
        case let .skuAdded(_, _, sku, total, limit):
            out.writeRESPArrayHeader(5)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk("sku-added"); out.writeRESPBulk(sku)
            out.writeRESPInteger(total); out.writeRESPInteger(limit)
        case let .restocked(shard, index, delta):
            out.writeRESPArrayHeader(4)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk("restocked"); out.writeRESPBulk(skuName(shard, index))
            out.writeRESPInteger(delta)
        case let .pausedChanged(shard, index, paused):
            out.writeRESPArrayHeader(3)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk(paused ? "paused" : "resumed"); out.writeRESPBulk(skuName(shard, index))
        case let .deducted(shard, index, quantity):
            out.writeRESPArrayHeader(4)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk("deducted"); out.writeRESPBulk(skuName(shard, index))
            out.writeRESPInteger(quantity)
        case let .orderCreated(created):
            out.writeRESPArrayHeader(6)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk("created"); out.writeRESPBulk(created.id.description)
            out.writeRESPBulk(created.user); out.writeRESPInteger(created.deadlineMillis)
            out.writeRESPArrayHeader(created.items.count * 2)
            for item in created.items {
                out.writeRESPBulk(skuName(item.shard, item.skuIndex))
                out.writeRESPInteger(Int64(item.quantity))
            }
        case let .orderPaid(id), let .orderCancelled(id), let .orderExpired(id):
            let type = switch record {
            case .orderPaid: "paid"
            case .orderCancelled: "cancelled"
            default: "expired"
            }
            out.writeRESPArrayHeader(3)
            out.writeRESPInteger(Int64(position)); out.writeRESPBulk(type); out.writeRESPBulk(id.description)
        }
    }
}

extension ByteBuffer {
    /// An id as a bulk string, byte for byte.
    mutating func writeRESPBulk(_ name: Name) {
        name.withBytes { writeRESPBulk(bytes: $0) }
    }
}
