/// Explicit bounds on everything a client can ask for. Each value says why it is what it is.
public enum Limits {
    /// SKU ids, user ids and request ids are 1 to 64 bytes: long enough for a UUID or a composite key,
    /// short enough that a record's strings fit in a one-byte length.
    public static let nameBytesMax = 64
    /// Largest quantity in one request. Keeps `quantity * items` far from Int64 overflow and catches
    /// a client that sends a garbage number.
    public static let quantityMax: Int64 = 1_000_000_000
    /// Largest total stock of one SKU (2^40, about 1.1e12 units): sums of many SKUs still fit in Int64.
    public static let stockMax: Int64 = 1 << 40
    /// Items in one multi-SKU order. A basket is small; the bound keeps one record under 1 KiB.
    public static let itemsPerOrderMax = 64
    /// Default payment window of a hold when the client gives none: 15 minutes.
    public static let ttlMillisDefault: Int64 = 15 * 60 * 1000
    /// Longest payment window: 7 days. A longer hold is stock leaked in practice.
    public static let ttlMillisMax: Int64 = 7 * 24 * 3600 * 1000
    /// A page of ORDERS or EVENTS takes no further entry once its entries reach about 1 MiB (it
    /// holds up to the COUNT asked for, fewer past this, and at least one): a request of 50 bytes
    /// cannot make the server build tens of megabytes. The client asks for the next page from where
    /// this one ended, as after a full page.
    public static let pageBytesMax = 1 << 20
    /// Latest deadline a log record may carry: 2^52 ms, some 140,000 years of wall clock plus any
    /// TTL. Replay refuses later ones (and negative ones), so deadline arithmetic cannot overflow.
    public static let deadlineMillisMax: Int64 = 1 << 52
    /// Shards are numbered into the top byte of an order id (see ``OrderID``).
    public static let shardCountMax = 255
    /// Orders per shard: sequences are 31 bits in memory (2 billion orders per shard).
    public static let ordersPerShardMax = Int(Int32.max - 1)
}

/// Validates a client-supplied id: 1 to ``Limits/nameBytesMax`` bytes, any bytes.
@inlinable
package func isValidName(_ name: Name) -> Bool { name.isValid }
