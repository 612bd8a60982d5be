// swift-tools-version: 6.1
import PackageDescription

/// Stockade: an in-memory, sharded order engine for flash sales.
///
/// Data flows one way through the modules:
/// socket -> ``StockadeWire`` (parse RESP) -> ``StockadeServer`` (route, admit, batch)
///        -> ``StockadeCore`` (shards decide, emit records) -> ``StockadeJournal`` (blocks, fsync, snapshots).
/// The request path's modules skip the run-time exclusivity checks in release builds: they cost 5-8% of
/// the server's CPU on small commands (`swift_beginAccess` in `perf`), and debug builds, which every
/// test runs on, keep them, so a conflicting access still fails there.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "Stockade",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "stockade", targets: ["stockade"]),
        .executable(name: "stockade-ceiling", targets: ["stockade-ceiling"]),
        .executable(name: "stockade-sink", targets: ["stockade-sink"]),
        .library(name: "StockadeCore", targets: ["StockadeCore"]),
        .library(name: "StockadeJournal", targets: ["StockadeJournal"]),
        .library(name: "StockadeServer", targets: ["StockadeServer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        // The coordinator's etcd client (its v3 JSON gateway over HTTP).
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        // Only for the sink (StockadeSink, stockade-sink): the server binary never links it.
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // C shims: Debian's liblz4 and jemalloc, a hardware CRC32C, and the CPU's prefetch hint.
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CJemalloc", pkgConfig: "jemalloc", providers: [.apt(["libjemalloc-dev"])]),
        .target(name: "CCRC32C"),
        .target(name: "CPrefetch"),

        // The pure, deterministic engine: domain, shard state machines, record encoding.
        .target(
            name: "StockadeCore",
            dependencies: ["CPrefetch", .product(name: "Atomics", package: "swift-atomics")],
            swiftSettings: hotPath
        ),
        // Durability: the LZ4 block log, group commit, snapshots, recovery.
        .target(
            name: "StockadeJournal",
            dependencies: ["StockadeCore", "CLZ4", "CCRC32C"],
            swiftSettings: hotPath
        ),
        // The deterministic simulator: the engine and its log under a seeded clock, clients and faults,
        // checked against a reference model after every step.
        .target(name: "StockadeSimulator", dependencies: ["StockadeCore", "StockadeJournal"]),
        // RESP2: the incremental request parser and reply encoding. No sockets.
        .target(
            name: "StockadeWire",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: hotPath
        ),
        // The TCP front: connections, command table, admission control, events, metrics.
        .target(
            name: "StockadeServer",
            dependencies: [
                "StockadeCore", "StockadeJournal", "StockadeWire", "CJemalloc",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ],
            swiftSettings: hotPath
        ),
        // `stockade bench`: a pipelined SwiftNIO load client, flash-sale scenarios, audits, Redis + Lua comparison.
        .target(
            name: "StockadeBench",
            dependencies: [
                "StockadeWire", "StockadeCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        .executableTarget(
            name: "stockade",
            dependencies: [
                "StockadeCore", "StockadeJournal", "StockadeServer", "StockadeBench", "StockadeSimulator", "CJemalloc",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // The ceiling for scripts/compare.py: a bare SwiftNIO server answering +PONG per request, one flush
        // per read. Under Sources/, not Benchmarks/: the benchmark plugin takes every executable target
        // directly under Benchmarks/ for a benchmark suite and would try to run it in `make bench`.
        .executableTarget(
            name: "stockade-ceiling",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // `stockade sink`: follows EVENTS and applies it to PostgreSQL exactly once. Its own target and
        // product, so the server (`make run`) never builds PostgresNIO and what it pulls in.
        .target(
            name: "StockadeSink",
            dependencies: [
                "StockadeWire", "StockadeBench",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ]
        ),
        .executableTarget(
            name: "stockade-sink",
            dependencies: [
                "StockadeSink",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "StockadeSinkTests", dependencies: ["StockadeSink"]),
        .testTarget(name: "StockadeBenchTests", dependencies: ["StockadeBench"]),
        .testTarget(name: "StockadeCoreTests", dependencies: ["StockadeCore", "StockadeSimulator"]),
        .testTarget(name: "StockadeSimulatorTests", dependencies: ["StockadeSimulator", "StockadeCore", "StockadeJournal"]),
        .testTarget(name: "StockadeJournalTests", dependencies: ["StockadeCore", "StockadeJournal"]),
        .testTarget(
            name: "StockadeServerTests",
            dependencies: [
                "StockadeServer", "StockadeCore", "StockadeJournal",
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "StockadeWireTests",
            dependencies: ["StockadeWire", "StockadeCore", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .executableTarget(
            name: "StockadeBenchmarks",
            dependencies: [
                "StockadeCore", "StockadeJournal", "StockadeWire", "StockadeServer", "CJemalloc",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/StockadeBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
