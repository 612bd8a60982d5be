import NIOCore
import StockadeCore
import StockadeJournal
import StockadeWire

/// Engine replies as RESP2, or RESP3 after HELLO 3: then STOCK, ORDER and EVENTS entries are maps of the
/// same fields (RESP2 keeps the flat field/value arrays). Every business outcome has a stable error
/// code as its first word (docs/PROTOCOL.md); a client branches on it.
package enum ReplyEncoding {
    /// Writes `reply`, the engine's answer to `command` (which says which bound an error names).
    package static func write(_ reply: Reply, to command: Command? = nil, resp3: Bool = false, into out: inout ByteBuffer) {
        switch reply {
        case .done:
            out.writeRESPSimple("OK")
        case .stock(let info):
            writeStock(info, resp3: resp3, into: &out)
        case .reserved(let id, _, _):
            out.writeRESPBulkDecimal(id.rawValue)
        case .orderState(_, let state):
            out.writeRESPSimple(state.description)
        case .order(let info):
            writeOrder(info, resp3: resp3, into: &out)
        case .orders(let list):
            writePage(count: list.count, into: &out) { writeOrder(list[$0], resp3: resp3, into: &$1) }
        case .deducted(let result):
            out.writeRESPInteger(Int64(result))
        case .audit(let findings):
            out.writeRESPArrayHeader(findings.count * 2)
            for slice in findings.slices { writeFindings(slice, into: &out) }
        case .rejected(let rejection):
            out.writeRESPError(errorText(rejection, to: command))
        }
    }

    private static func writeFindings(_ findings: [AuditFinding], into out: inout ByteBuffer) {
        for finding in findings {
            out.writeRESPBulk(finding.sku)
            out.writeRESPBulk(finding.ok ? "OK" : finding.problem)
        }
    }

    /// Encodes the replies among `replies` too large to encode in one turn (an AUDIT of more SKUs
    /// than one slice of the engine's, ``Engine/auditChunk``) a slice of findings at a time, into buffers of their own (no
    /// buffer of megabytes grows and copies itself), and returns them by index with the time spent.
    /// Each such reply is taken out of `replies` (left empty: its outcome stays "ok") and its slices
    /// let go of as they are encoded: a million findings destroyed at once would hold the loop too.
    /// Between slices it awaits `later` with the time the slice took (in the server: a later turn of
    /// the loop, once it polled its sockets). Every other reply is encoded by
    /// ``write(_:to:resp3:into:)`` when the round's replies are written.
    package static func encodeUnbounded(
        _ replies: inout [Reply], resp3: Bool, allocator: ByteBufferAllocator, later: (_ busyNanos: UInt64) async -> Void
    ) async -> (encoded: [Int: [ByteBuffer]], nanos: UInt64) {
        var encoded: [Int: [ByteBuffer]] = [:]
        var nanos: UInt64 = 0
        for index in replies.indices {
            guard case .audit(var findings) = replies[index], findings.count > Engine.auditChunk else { continue }
            replies[index] = .audit(AuditFindings())  // `findings` is now the only reference
            var buffers: [ByteBuffer] = []
            var started = monotonicNanos()
            var out = allocator.buffer(capacity: 0)
            out.writeRESPArrayHeader(findings.count * 2)
            while let slice = findings.popFirstSlice() {
                writeFindings(slice, into: &out)
                // A buffer holds about a slice's worth (the engine's slices end with each shard).
                guard out.readableBytes >= bufferBytesMin || findings.isEmpty else { continue }
                buffers.append(out)
                let busy = monotonicNanos() - started
                nanos += busy
                if !findings.isEmpty {
                    out = allocator.buffer(capacity: out.readableBytes + out.readableBytes / 8)
                    await later(busy)
                    started = monotonicNanos()
                }
            }
            encoded[index] = buffers
        }
        return (encoded, nanos)
    }

    /// A buffer of an AUDIT's reply encoded apart is written once it holds this many bytes.
    private static let bufferBytesMin = 64 << 10

    /// Replies encoded apart, by index, and the loop time that took.
    struct Unbounded: Sendable {
        var encoded: [Int: [ByteBuffer]] = [:]
        var nanos: UInt64 = 0
    }

    /// ``encodeUnbounded(_:resp3:allocator:later:)`` on `loop`, pausing between slices until a later
    /// turn of it (``ConnectionHandler/laterTurn(on:busyNanos:)``).
    static func encodeUnbounded(_ replies: inout [Reply], resp3: Bool, on loop: EventLoop) async -> Unbounded {
        let (encoded, nanos) = await encodeUnbounded(&replies, resp3: resp3, allocator: ByteBufferAllocator()) { busyNanos in
            await ConnectionHandler.laterTurn(on: loop, busyNanos: busyNanos)
        }
        return Unbounded(encoded: encoded, nanos: nanos)
    }

    /// The most bytes the reply to `command` can take, from the bounds on what it returns: ids of
    /// at most ``Limits/nameBytesMax`` bytes, baskets of at most ``Limits/itemsPerOrderMax`` SKUs,
    /// pages of ORDERS. A connection admits commands into a round while the sum stays bounded, so
    /// one read cannot make the server build an unbounded pile of replies. `nil`: unbounded (AUDIT
    /// of every SKU), so the command gets a round of its own.
    static func replyBytesMax(_ command: Command) -> Int? {
        switch command {
        case .orders(_, _, let count): 16 + min(count * orderBytesMax, Limits.pageBytesMax + orderBytesMax)
        case .order: orderBytesMax
        case .audit(let sku): sku == nil ? nil : 256 + errorBytesMax
        default: smallReplyBytesMax
        }
    }

    /// The bound of every reply but ORDER's, ORDERS' and AUDIT's of every SKU: a STOCK array or an error.
    static let smallReplyBytesMax = stockBytesMax + errorBytesMax

    /// Writes an array of up to `count` entries, `entry(i, &buffer)` writing the i-th, while the
    /// entries written so far take less than ``Limits/pageBytesMax`` (so at least one; the page of
    /// an EVENTS, and a second guard on ORDERS, whose engine bounds its pages the same way).
    /// Returns how many were written.
    @discardableResult
    package static func writePage(count: Int, into out: inout ByteBuffer, entry: (Int, inout ByteBuffer) -> Void) -> Int {
        // The count comes first on the wire, so the entries go to a buffer of their own first (but
        // for a page of one entry, which always fits).
        guard count > 1 else {
            out.writeRESPArrayHeader(count)
            if count == 1 { entry(0, &out) }
            return count
        }
        var entries = ByteBufferAllocator().buffer(capacity: 1024)
        var written = 0
        while written < count && entries.readableBytes < Limits.pageBytesMax {
            entry(written, &entries)
            written += 1
        }
        out.writeRESPArrayHeader(written)
        out.writeBuffer(&entries)
        return written
    }

    /// An error line: a code, numbers, a reason (a log failure's text is the longest).
    static let errorBytesMax = 1024
    /// The STOCK array: 14 elements, one an id.
    static let stockBytesMax = 512
    /// One ORDER array: 10 elements, ids, and a basket of up to 64 SKUs and quantities.
    static let orderBytesMax = orderBytesMax(items: Limits.itemsPerOrderMax)
    /// An ORDER array (or an order's event, with its position and type) of a basket of `items` SKUs.
    static func orderBytesMax(items: Int) -> Int { 256 + items * (Limits.nameBytesMax + 40) }
    /// The most bytes the event of `record` can take (``writeEvent``).
    static func eventBytesMax(_ record: Record) -> Int {
        switch record {
        case .orderCreated(let created): orderBytesMax(items: created.items.count)
        default: 256 + Limits.nameBytesMax
        }
    }

    /// `sku <id> total n available n reserved n sold n limit n paused 0|1`: a flat field/value array,
    /// or a map of those 7 fields under RESP3.
    static func writeStock(_ info: SkuInfo, resp3: Bool = false, into out: inout ByteBuffer) {
        writeRecordHeader(fields: 7, resp3: resp3, into: &out)
        out.writeRESPBulk("sku"); out.writeRESPBulk(info.sku)
        out.writeRESPBulk("total"); out.writeRESPInteger(info.total)
        out.writeRESPBulk("available"); out.writeRESPInteger(info.available)
        out.writeRESPBulk("reserved"); out.writeRESPInteger(info.reserved)
        out.writeRESPBulk("sold"); out.writeRESPInteger(info.sold)
        out.writeRESPBulk("limit"); out.writeRESPInteger(info.limit)
        out.writeRESPBulk("paused"); out.writeRESPInteger(info.paused ? 1 : 0)
    }

    /// `id <id> user <u> state <S> deadline <ms> items [sku qty ...]`; under RESP3 a map of those 5
    /// fields whose `items` is a map of SKU to quantity (a basket names each SKU once).
    static func writeOrder(_ info: OrderInfo, resp3: Bool = false, into out: inout ByteBuffer) {
        writeRecordHeader(fields: 5, resp3: resp3, into: &out)
        out.writeRESPBulk("id"); out.writeRESPBulkDecimal(info.id.rawValue)
        out.writeRESPBulk("user"); out.writeRESPBulk(info.user)
        out.writeRESPBulk("state"); out.writeRESPBulk(info.state.description)
        out.writeRESPBulk("deadline"); out.writeRESPInteger(info.deadlineMillis)
        out.writeRESPBulk("items")
        writeRecordHeader(fields: info.lines.count, resp3: resp3, into: &out)
        for line in info.lines {
            out.writeRESPBulk(line.sku)
            out.writeRESPInteger(line.quantity)
        }
    }

    /// The error line of a rejection: a stable code, then details naming the bound that applies.
    /// Only ``Rejection/badQuantity`` reads the command (a connection passes it for that one alone).
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
        case .replicatedTooLate(let wanted):
            "NOREPLICAS the change is durable on this primary, but its \(wanted) replicas acknowledged it only after this node stopped taking changes (its lease lapsed, or it stepped down): a newer primary may not have it"
        }
    }

    /// The metrics outcome label of a reply: "ok", or a rejection's error code in lower case (the first
    /// word of ``errorText(_:to:)``, which `ReplyEncodingTests` checks for every case). String literals:
    /// this runs for every engine reply, so no string is built, and ``Tally`` compares literals by pointer.
    static func outcome(_ reply: Reply) -> String {
        guard case .rejected(let rejection) = reply else { return "ok" }
        return switch rejection {
        case .soldOut: "soldout"
        case .insufficient: "insufficient"
        case .limitReached: "limit"
        case .noSuchSku: "nosku"
        case .paused: "paused"
        case .badQuantity: "badqty"
        case .badArgument: "err"
        case .skuExists: "exists"
        case .belowCommitted: "belowcommitted"
        case .noSuchOrder: "noorder"
        case .expired: "expired"
        case .wrongState: "wrongstate"
        case .requestInFlight: "inflight"
        case .requestConflict: "reqconflict"
        case .busy: "busy"
        case .unavailable: "unavailable"
        case .readOnly: "readonly"
        case .notReplicated, .replicatedTooLate: "noreplicas"
        }
    }

    /// A field/value record: a flat array of `fields * 2` elements (RESP2), or a map (RESP3).
    static func writeRecordHeader(fields: Int, resp3: Bool, into out: inout ByteBuffer) {
        if resp3 { out.writeRESP3MapHeader(fields) } else { out.writeRESPArrayHeader(fields * 2) }
    }

    /// One event: `[position, type, fields...]` (RESP2), or under RESP3 a map with `position`,
    /// `type` and the same fields by name. SKUs are named by id (looked up from the engine).
    static func writeEvent(position: UInt64, record: Record, skuName: (Int, UInt32) -> Name, resp3: Bool = false, into out: inout ByteBuffer) {
        /// The header and the first two fields; the names of the rest are written by `field` under RESP3 only.
        func begin(_ type: String, fields: Int) {
            if resp3 {
                out.writeRESP3MapHeader(fields + 2)
                out.writeRESPBulk("position"); out.writeRESPInteger(Int64(position))
                out.writeRESPBulk("type"); out.writeRESPBulk(type)
            } else {
                out.writeRESPArrayHeader(fields + 2)
                out.writeRESPInteger(Int64(position)); out.writeRESPBulk(type)
            }
        }
        func field(_ name: String) { if resp3 { out.writeRESPBulk(name) } }
        switch record {
        case let .skuAdded(_, _, sku, total, limit):
            begin("sku-added", fields: 3)
            field("sku"); out.writeRESPBulk(sku)
            field("total"); out.writeRESPInteger(total)
            field("limit"); out.writeRESPInteger(limit)
        case let .restocked(shard, index, delta):
            begin("restocked", fields: 2)
            field("sku"); out.writeRESPBulk(skuName(shard, index))
            field("delta"); out.writeRESPInteger(delta)
        case let .pausedChanged(shard, index, paused):
            begin(paused ? "paused" : "resumed", fields: 1)
            field("sku"); out.writeRESPBulk(skuName(shard, index))
        case let .deducted(shard, index, quantity):
            begin("deducted", fields: 2)
            field("sku"); out.writeRESPBulk(skuName(shard, index))
            field("quantity"); out.writeRESPInteger(quantity)
        case let .orderCreated(created):
            begin("created", fields: 4)
            field("order"); out.writeRESPBulkDecimal(created.id.rawValue)
            field("user"); out.writeRESPBulk(created.user)
            field("deadline"); out.writeRESPInteger(created.deadlineMillis)
            field("items")
            writeRecordHeader(fields: created.items.count, resp3: resp3, into: &out)
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
            begin(type, fields: 1)
            field("order"); out.writeRESPBulkDecimal(id.rawValue)
        case let .epochStarted(epoch):
            begin("epoch", fields: 1)
            field("epoch"); out.writeRESPInteger(Int64(truncatingIfNeeded: epoch))
        }
    }
}

extension ByteBuffer {
    /// An id as a bulk string, byte for byte.
    mutating func writeRESPBulk(_ name: Name) {
        name.withBytes { writeRESPBulk(bytes: $0) }
    }
}
