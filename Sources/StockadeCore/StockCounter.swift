import Atomics
import Synchronization

/// A SKU's available stock, published by its shard after every change so that any thread can read it
/// without entering the shard: stock queries and the sold-out fast path. The atomic is stored inline
/// (one object a SKU, not two): a reader on another loop touches no reference count of its own.
public final class StockCounter: Sendable {
    private let value: Atomic<Int64>

    public init(_ available: Int64) { value = Atomic(available) }

    /// The last published available count. Lock-free; may trail the shard by the change being made.
    @inlinable public var available: Int64 { load() }

    @usableFromInline func load() -> Int64 { value.load(ordering: .acquiring) }

    /// Only the owning shard publishes.
    @inline(__always) func publish(_ available: Int64) { value.store(available, ordering: .releasing) }
}

/// A shard's SKU ids mapped to their counters, readable from any thread without a lock: the shard
/// (single writer) publishes a new immutable map when it adds a SKU, readers load the current one.
public final class SkuDirectory: Sendable {
    final class Map: AtomicReference, Sendable {
        let counters: [Name: StockCounter]
        /// SKU ids by index, for naming SKUs that records refer to by index.
        let names: [Name]
        init(_ counters: [Name: StockCounter], _ names: [Name]) {
            self.counters = counters
            self.names = names
        }
    }

    private let current = ManagedAtomic(Map([:], []))

    public init() {}

    /// The counter of `sku`, or nil when this shard has no such SKU (yet).
    public func counter(_ sku: Name) -> StockCounter? {
        current.load(ordering: .acquiring).counters[sku]
    }

    /// The id of the SKU at `index` in this shard, if it exists yet.
    public func name(at index: Int) -> Name? {
        let names = current.load(ordering: .acquiring).names
        return index >= 0 && index < names.count ? names[index] : nil
    }

    /// Every SKU id of this shard, in index order.
    public var names: [Name] { current.load(ordering: .acquiring).names }

    /// Replaces every counter (a replica that loaded a full copy).
    func replaceAll(_ all: [(Name, StockCounter)]) {
        current.store(Map(Dictionary(all, uniquingKeysWith: { first, _ in first }), all.map(\.0)), ordering: .releasing)
    }

    /// Adds counters of newly added SKUs, in index order. Copies the map (SKU adds are rare; reads are not).
    func publish(_ additions: [(Name, StockCounter)]) {
        let map = current.load(ordering: .acquiring)
        var counters = map.counters
        var names = map.names
        for (sku, counter) in additions {
            counters[sku] = counter
            names.append(sku)
        }
        current.store(Map(counters, names), ordering: .releasing)
    }
}
