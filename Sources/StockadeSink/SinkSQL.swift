/// A value bound to a statement parameter. Arrays go to `unnest`, so a batch of any size is a fixed
/// number of statements (and round trips).
public enum SinkValue: Equatable, Sendable {
    case int64(Int64)
    /// NULL when nil.
    case optionalInt64(Int64?)
    case int64s([Int64])
    case texts([String])
    case byteas([[UInt8]])
    case bools([Bool])
}

/// One statement and its parameters. Every statement the sink checks returns one row with one
/// count; ``expectedCount`` is what a database that followed the log answers.
public struct SinkStatement: Sendable {
    public var sql: String
    public var binds: [SinkValue]
    /// nil: the statement returns nothing to check.
    public var expectedCount: Int64?
    /// What it means when the count differs.
    public var mismatch: SinkError?
}

/// The sink's tables and the statements that apply a ``BatchPlan``. Pure: text and values only.
public enum SinkSQL {
    /// Migrations, in order, each a list of statements: version N of the schema is the first N
    /// applied. They run in one transaction with the rows that record them in
    /// `stockade_schema_version`. Never edit one that has shipped: add the next.
    public static let migrations: [[String]] = [
        [
            """
            CREATE TABLE stockade_sink_position (
                id integer PRIMARY KEY CHECK (id = 1),
                position bigint NOT NULL CHECK (position >= 0),
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            "INSERT INTO stockade_sink_position (id, position) VALUES (1, 0)",
            """
            CREATE TABLE skus (
                sku_bytes bytea PRIMARY KEY,
                sku text,
                total bigint NOT NULL,
                available bigint NOT NULL,
                reserved bigint NOT NULL,
                sold bigint NOT NULL,
                per_user_limit bigint NOT NULL,
                paused boolean NOT NULL,
                added_position bigint NOT NULL,
                changed_position bigint NOT NULL,
                added_at timestamptz NOT NULL,
                changed_at timestamptz NOT NULL,
                CHECK (available + reserved + sold = total)
            )
            """,
            "CREATE INDEX skus_sku ON skus (sku)",
            """
            CREATE TABLE orders (
                id numeric(20, 0) PRIMARY KEY,
                user_bytes bytea NOT NULL,
                user_id text,
                state text NOT NULL CHECK (state IN ('PENDING', 'PAID', 'CANCELLED', 'EXPIRED')),
                deadline_ms bigint NOT NULL,
                deadline timestamptz GENERATED ALWAYS AS (to_timestamp(deadline_ms / 1000.0)) STORED,
                created_position bigint NOT NULL,
                changed_position bigint NOT NULL,
                created_at timestamptz NOT NULL,
                changed_at timestamptz NOT NULL
            )
            """,
            "CREATE INDEX orders_user_bytes ON orders (user_bytes)",
            "CREATE INDEX orders_user_id ON orders (user_id)",
            """
            CREATE TABLE order_items (
                order_id numeric(20, 0) NOT NULL REFERENCES orders (id),
                sku_bytes bytea NOT NULL REFERENCES skus (sku_bytes),
                sku text,
                quantity bigint NOT NULL CHECK (quantity > 0),
                PRIMARY KEY (order_id, sku_bytes)
            )
            """,
            "CREATE INDEX order_items_sku_bytes ON order_items (sku_bytes)",
            """
            CREATE TABLE events (
                position bigint PRIMARY KEY,
                type text NOT NULL,
                sku_bytes bytea,
                order_id numeric(20, 0),
                user_bytes bytea,
                amount bigint,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """,
        ],
        // 2: the fingerprint of the last event applied (see ``BatchPlan/lastFingerprint``), and its
        // position (which stays when an operator moves `position` back). NULL: nothing to compare.
        // Every row already records the last event that changed it (changed_position and the
        // like); from version 2 on the statements use it to make replays no-ops per row.
        [
            "ALTER TABLE stockade_sink_position ADD COLUMN last_event_position bigint, ADD COLUMN last_event_fingerprint bigint",
        ],
        // 3: the server's term in force at last_event_position (``BatchPlan/lastTerm``): its epoch
        // and the position it began at, both 0 before any term. NULL: unknown. (No CHECK keeps
        // counts at zero or above: PostgreSQL checks one after each statement, and within a batch a
        // hold taken again after its release is counted before the release. The batch's last
        // statement checks it instead.)
        [
            "ALTER TABLE stockade_sink_position ADD COLUMN last_event_epoch bigint, ADD COLUMN last_event_epoch_start bigint",
        ],
        // 4: a CHECK that an earlier build's version 3 added, which stopped the sink on a batch
        // that releases a hold and takes it again (see above): dropped where present.
        [
            "ALTER TABLE skus DROP CONSTRAINT IF EXISTS skus_counts_not_negative",
        ],
    ]

    /// The schema version this sink writes.
    public static var schemaVersion: Int { migrations.count }

    /// Creates the version table if missing. It runs, with the migrations, under an advisory lock, so
    /// two sinks starting together neither collide creating it nor both apply one migration.
    public static let createVersionTable = """
        CREATE TABLE IF NOT EXISTS stockade_schema_version (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """

    /// Empties the sink's tables (`--reset`); run in one transaction with the position set to 0.
    public static let reset = "TRUNCATE events, order_items, orders, skus"

    /// Any fixed number, the same for every sink: serialises migrations.
    public static let migrationLockKey: Int64 = 0x53_54_4F_43_4B_41_44_45  // "STOCKADE"

    /// The statements of one batch, in the order they must run inside its transaction. The position
    /// comes first: its row lock makes a second sink on the same database wait, and then find the
    /// position moved and roll back, instead of applying the same events again.
    ///
    /// Each statement is a no-op for rows that already hold its events (a replay after the stored
    /// position was moved back): SKUs and orders are inserted unless present (and must then have
    /// been added or created by the same event), a SKU's changes apply only after its
    /// `changed_position`, an order ends only while PENDING, an event row is inserted once. The SKU
    /// changes run before the transitions, which raise `changed_position` of the SKUs they move:
    /// each event is guarded by one row's position, read before this batch touched it.
    ///
    /// `replay`: whether rows may already hold events of this batch (the stored position is below
    /// the highest ever applied, `last_event_position`). Only then do the inserts skip rows that
    /// exist and the counts accept rows that already hold their event; otherwise the inserts are
    /// plain (a row already there is a broken key: the database does not follow the log), which
    /// costs PostgreSQL about half as much as the guarded form.
    public static func statements(for plan: BatchPlan, replay: Bool = true) -> [SinkStatement] {
        var out: [SinkStatement] = []
        /// The guarded insert's tail, or nothing.
        func onConflict(_ key: String, returning: Bool = false) -> String {
            replay ? "ON CONFLICT (\(key)) DO NOTHING" + (returning ? " RETURNING 1" : "") : (returning ? "RETURNING 1" : "")
        }
        let range = "\(plan.previousPosition + 1)-\(plan.lastPosition)"
        let elsewhere = "it does not follow this server's log (another server's database, or changed by hand)"
        out.append(SinkStatement(
            sql: """
                WITH moved AS (UPDATE stockade_sink_position SET position = $2,
                                      last_event_fingerprint = CASE WHEN $2 >= coalesce(last_event_position, 0) THEN $3
                                                                    ELSE last_event_fingerprint END,
                                      last_event_epoch = CASE WHEN $2 >= coalesce(last_event_position, 0) THEN $4::int8
                                                              ELSE last_event_epoch END,
                                      last_event_epoch_start = CASE WHEN $2 >= coalesce(last_event_position, 0) THEN $5::int8
                                                                    ELSE last_event_epoch_start END,
                                      last_event_position = GREATEST(coalesce(last_event_position, 0), $2), updated_at = now()
                               WHERE id = 1 AND position = $1 RETURNING 1)
                SELECT count(*) FROM moved
                """,
            binds: [.int64(position(plan.previousPosition)), .int64(position(plan.lastPosition)), .int64(plan.lastFingerprint),
                    .optionalInt64(plan.lastTerm.map { Int64(bitPattern: $0.epoch) }), .optionalInt64(plan.lastTerm.map { position($0.start) })],
            expectedCount: 1,
            mismatch: SinkError(.concurrentSink, "the stored position is no longer \(plan.previousPosition): another sink is writing to this database")))
        if !plan.newSkus.isEmpty {
            let rows = plan.newSkus
            out.append(SinkStatement(
                sql: """
                    WITH n AS (SELECT * FROM unnest($1::bytea[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) AS n(b, t, total, lim, added)),
                         ins AS (INSERT INTO skus (sku_bytes, sku, total, available, reserved, sold, per_user_limit, paused,
                                                   added_position, changed_position, added_at, changed_at)
                                 SELECT b, NULLIF(t, ''), total, total, 0, 0, lim, false, added, added, now(), now() FROM n
                                 \(onConflict("sku_bytes", returning: true)))
                    SELECT (SELECT count(*) FROM ins)\(replay ? " + (SELECT count(*) FROM n JOIN skus s ON s.sku_bytes = n.b AND s.added_position = n.added)" : "")
                    """,
                binds: [.byteas(rows.map(\.sku.bytes)), .texts(rows.map { $0.sku.text ?? "" }), .int64s(rows.map(\.total)),
                        .int64s(rows.map(\.limit)), .int64s(rows.map { position($0.addedPosition) })],
                expectedCount: Int64(rows.count),
                mismatch: SinkError(.diverged, "the events of positions \(range) add SKUs the database already has from other events: \(elsewhere)")))
        }
        if !plan.skuChanges.isEmpty {
            let rows = plan.skuChanges
            out.append(SinkStatement(
                sql: """
                    WITH c AS (SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
                                        AS c(b, pos, total, available, reserved, sold, paused)),
                         d AS (SELECT c.b, sum(c.total) AS total, sum(c.available) AS available, sum(c.reserved) AS reserved,
                                      sum(c.sold) AS sold, max(c.pos) AS pos,
                                      (array_agg(c.paused ORDER BY c.pos DESC) FILTER (WHERE c.paused >= 0))[1] AS paused
                               FROM c JOIN skus s ON s.sku_bytes = c.b WHERE c.pos > s.changed_position GROUP BY c.b),
                         moved AS (UPDATE skus s SET total = s.total + d.total, available = s.available + d.available,
                                          reserved = s.reserved + d.reserved, sold = s.sold + d.sold,
                                          paused = CASE d.paused WHEN 0 THEN false WHEN 1 THEN true ELSE s.paused END,
                                          changed_position = d.pos, changed_at = now()
                                   FROM d WHERE s.sku_bytes = d.b RETURNING 1)
                    SELECT count(DISTINCT c.b) FROM c JOIN skus s ON s.sku_bytes = c.b
                    """,
                binds: [.byteas(rows.map(\.sku.bytes)), .int64s(rows.map { position($0.position) }), .int64s(rows.map(\.total)),
                        .int64s(rows.map(\.available)), .int64s(rows.map(\.reserved)), .int64s(rows.map(\.sold)),
                        .int64s(rows.map { $0.paused.map { $0 ? 1 : 0 } ?? -1 })],
                expectedCount: Int64(Set(rows.map(\.sku)).count),
                mismatch: SinkError(.diverged, "the events of positions \(range) change SKUs the database does not have: \(elsewhere)")))
        }
        if !plan.newOrders.isEmpty {
            let rows = plan.newOrders
            out.append(SinkStatement(
                sql: """
                    WITH n AS (SELECT id::numeric AS id, u, ut, dl, created
                               FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[], $5::int8[]) AS n(id, u, ut, dl, created)),
                         ins AS (INSERT INTO orders (id, user_bytes, user_id, state, deadline_ms, created_position, changed_position, created_at, changed_at)
                                 SELECT id, u, NULLIF(ut, ''), 'PENDING', dl, created, created, now(), now() FROM n
                                 \(onConflict("id", returning: true)))
                    SELECT (SELECT count(*) FROM ins)\(replay ? " + (SELECT count(*) FROM n JOIN orders o ON o.id = n.id AND o.created_position = n.created)" : "")
                    """,
                binds: [.texts(rows.map { String($0.id) }), .byteas(rows.map(\.user.bytes)), .texts(rows.map { $0.user.text ?? "" }),
                        .int64s(rows.map(\.deadlineMillis)), .int64s(rows.map { position($0.createdPosition) })],
                expectedCount: Int64(rows.count),
                mismatch: SinkError(.diverged, "the events of positions \(range) create orders the database already has from other events: \(elsewhere)")))
            let items = rows.flatMap { row in row.items.map { (row.id, $0) } }
            out.append(SinkStatement(
                sql: """
                    INSERT INTO order_items (order_id, sku_bytes, sku, quantity)
                    SELECT id::numeric, b, NULLIF(t, ''), q FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[]) AS i(id, b, t, q)
                    \(onConflict("order_id, sku_bytes"))
                    """,
                binds: [.texts(items.map { String($0.0) }), .byteas(items.map(\.1.sku.bytes)), .texts(items.map { $0.1.sku.text ?? "" }),
                        .int64s(items.map(\.1.quantity))]))
        }
        if !plan.transitions.isEmpty {
            let rows = plan.transitions
            out.append(SinkStatement(
                sql: """
                    WITH t AS (SELECT id::numeric AS id, state, pos FROM unnest($1::text[], $2::text[], $3::int8[]) AS t(id, state, pos)),
                         changed AS (UPDATE orders o SET state = t.state, changed_position = t.pos, changed_at = now()
                                     FROM t WHERE o.id = t.id AND o.state = 'PENDING' AND o.changed_position < t.pos
                                     RETURNING o.id, o.state, t.pos),
                         d AS (SELECT i.sku_bytes, sum(i.quantity) AS released,
                                      sum(CASE WHEN c.state = 'PAID' THEN i.quantity ELSE 0 END) AS sold, max(c.pos) AS pos
                               FROM changed c JOIN order_items i ON i.order_id = c.id GROUP BY i.sku_bytes),
                         moved AS (UPDATE skus s SET reserved = s.reserved - d.released, sold = s.sold + d.sold,
                                          available = s.available + d.released - d.sold,
                                          changed_position = GREATEST(s.changed_position, d.pos), changed_at = now()
                                   FROM d WHERE s.sku_bytes = d.sku_bytes RETURNING 1)
                    SELECT (SELECT count(*) FROM changed)\(replay ? " + (SELECT count(*) FROM t JOIN orders o ON o.id = t.id AND o.state = t.state AND o.changed_position = t.pos)" : "")
                    """,
                binds: [.texts(rows.map { String($0.order) }), .texts(rows.map(\.state.rawValue)), .int64s(rows.map { position($0.position) })],
                expectedCount: Int64(rows.count),
                mismatch: SinkError(.diverged, "the events of positions \(range) end orders the database does not hold as PENDING: \(elsewhere)")))
        }
        // Last: no count of a SKU the batch changed went below zero (no server logs that). Checked at
        // the end, not per statement: the holds and deductions of a batch are counted before its
        // releases, so a hold released and taken again in one batch is negative in between.
        let changed = Set(plan.skuChanges.map(\.sku)).union(plan.newSkus.map(\.sku))
        if !changed.isEmpty {
            out.append(SinkStatement(
                sql: "SELECT count(*) FROM skus WHERE sku_bytes = ANY($1::bytea[]) AND (available < 0 OR reserved < 0 OR sold < 0)",
                binds: [.byteas(changed.map(\.bytes).sorted { $0.lexicographicallyPrecedes($1) })],
                expectedCount: 0,
                mismatch: SinkError(.badEvent, "the events of positions \(range) take a SKU's counts below zero: no server logs that; the sink stops rather than store them")))
        }
        if !plan.events.isEmpty {
            let rows = plan.events.map(eventRow)
            out.append(SinkStatement(
                sql: """
                    INSERT INTO events (position, type, sku_bytes, order_id, user_bytes, amount)
                    SELECT p, ty, NULLIF(b, ''::bytea), NULLIF(o, '')::numeric, NULLIF(u, ''::bytea), CASE WHEN has THEN a END
                    FROM unnest($1::int8[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::int8[], $7::bool[])
                         AS e(p, ty, b, o, u, a, has)
                    \(onConflict("position"))
                    """,
                binds: [.int64s(rows.map(\.position)), .texts(rows.map(\.type)), .byteas(rows.map(\.sku)), .texts(rows.map(\.order)),
                        .byteas(rows.map(\.user)), .int64s(rows.map(\.amount)), .bools(rows.map(\.hasAmount))]))
        }
        return out
    }

    /// The `events` row of an event: empty bytes or text stand for NULL (ids are never empty).
    /// `amount`: the total of sku-added, the delta of restocked, the quantity of deducted and created.
    private static func eventRow(_ event: SinkEvent) -> (position: Int64, type: String, sku: [UInt8], order: String, user: [UInt8], amount: Int64, hasAmount: Bool) {
        let p = position(event.position)
        return switch event.change {
        case let .skuAdded(sku, total, _): (p, event.type, sku.bytes, "", [], total, true)
        case let .restocked(sku, delta): (p, event.type, sku.bytes, "", [], delta, true)
        case let .pausedChanged(sku, _): (p, event.type, sku.bytes, "", [], 0, false)
        case let .deducted(sku, quantity): (p, event.type, sku.bytes, "", [], quantity, true)
        // A basket's total units; wrapping, never a trap (quantities are 1 to 10^9 from a server, and
        // an absurd sum only lands in this informational column).
        case let .created(order, user, _, items): (p, event.type, [], String(order), user.bytes, items.reduce(0) { $0 &+ $1.quantity }, true)
        case .paid(let order), .cancelled(let order), .expired(let order): (p, event.type, [], String(order), [], 0, false)
        case .epoch(let epoch): (p, event.type, [], "", [], Int64(bitPattern: epoch), true)
        }
    }

    /// A log position as the bigint it is stored as; positions count records, far below 2^63.
    static func position(_ value: UInt64) -> Int64 {
        precondition(value <= UInt64(Int64.max), "log position \(value) does not fit a bigint")
        return Int64(value)
    }
}
