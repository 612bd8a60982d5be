// swift-tools-version: 6.1
import PackageDescription

/// Stockade: an in-memory, sharded order engine for flash sales.
///
/// Data flows one way through the modules:
/// `stockade` (CLI) -> ``StockadeCore`` (shards decide, emit records) -> ``StockadeJournal`` (blocks, fsync, snapshots).
let package = Package(
    name: "Stockade",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "stockade", targets: ["stockade"]),
        .library(name: "StockadeCore", targets: ["StockadeCore"]),
        .library(name: "StockadeJournal", targets: ["StockadeJournal"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // C shims: Debian's liblz4 and jemalloc, and a hardware CRC32C.
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CJemalloc", pkgConfig: "jemalloc", providers: [.apt(["libjemalloc-dev"])]),
        .target(name: "CCRC32C"),

        // The pure, deterministic engine: domain, shard state machines, record encoding.
        .target(
            name: "StockadeCore",
            dependencies: [.product(name: "Atomics", package: "swift-atomics")]
        ),
        // Durability: the LZ4 block log, group commit, snapshots, recovery.
        .target(
            name: "StockadeJournal",
            dependencies: ["StockadeCore", "CLZ4", "CCRC32C"]
        ),
        .executableTarget(
            name: "stockade",
            dependencies: [
                "StockadeCore", "StockadeJournal", "CJemalloc",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "StockadeCoreTests", dependencies: ["StockadeCore"]),
        .testTarget(name: "StockadeJournalTests", dependencies: ["StockadeCore", "StockadeJournal"]),
        .executableTarget(
            name: "StockadeBenchmarks",
            dependencies: [
                "StockadeCore", "StockadeJournal", "CJemalloc",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/StockadeBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
