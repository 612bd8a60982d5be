import Testing
@testable import StockadeServer

/// `serve`'s flags: ranges and the loopback guard (#7 C21, C22).
@Suite struct ConfigurationTests {
    @Test func defaultsServe() {
        #expect(ServerConfiguration().problem() == nil)
    }

    /// `--replica-of`, `--advertise`: an IPv6 address needs brackets (`a:b:c:7379` was taken for the
    /// host `a:b:c`).
    @Test func hostAndPortNeedBracketsForIPv6() {
        #expect(ServerConfiguration.hostAndPort("127.0.0.1:7379")! == ("127.0.0.1", 7379))
        #expect(ServerConfiguration.hostAndPort("[::1]:7379")! == ("::1", 7379))
        #expect(ServerConfiguration.hostAndPort("a:b:c:7379") == nil)
        #expect(ServerConfiguration.hostAndPort("host:0") == nil)
        #expect(ServerConfiguration.hostAndPort("host:65536") == nil)
        #expect(ServerConfiguration.hostAndPort(":7379") == nil)
        #expect(ServerConfiguration.hostAndPort("host") == nil)
    }

    @Test(arguments: ["127.0.0.1", "127.0.0.2", "::1", "localhost", "::ffff:127.0.0.1"])
    func loopbackNamesAndAddressesAreLoopback(host: String) throws {
        let address = try ListenAddress.resolve(host).get()
        #expect(address.isLoopback, "\(host) resolved to \(address.numeric)")
    }

    @Test(arguments: ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1"])
    func otherAddressesAreNot(host: String) throws {
        #expect(!(try ListenAddress.resolve(host).get()).isLoopback)
        var config = ServerConfiguration()
        config.host = host
        #expect(config.problem()?.contains("without a password") == true)
        config.requirePassword = "secret"
        #expect(config.problem() == nil)
    }

    /// The old guard was `host.hasPrefix("127.")`: a name is decided by what it resolves to.
    @Test func aNameThatLooksLikeLoopbackIsResolved() {
        var config = ServerConfiguration()
        config.host = "127.nonexistent.invalid"
        #expect(config.problem()?.contains("cannot resolve") == true)
    }

    @Test func metricsOnANetworkNeedAPassword() {
        var config = ServerConfiguration()
        config.metricsPort = 9379
        config.metricsHost = "0.0.0.0"
        #expect(config.problem()?.contains("metrics") == true)
        config.metricsHost = "localhost"
        #expect(config.problem() == nil)
    }

    @Test func extremesAreRefused() {
        let cases: [(String, (inout ServerConfiguration) -> Void)] = [
            ("--max-inline-bytes", { $0.parserLimits.inlineBytesMax = .max }),
            ("--max-bulk-bytes", { $0.parserLimits.bulkBytesMax = .max }),
            ("--max-arguments", { $0.parserLimits.argumentsMax = 0 }),
            ("--port", { $0.port = 99_999 }),
            ("--port", { $0.port = -1 }),
            ("--client-stall-seconds", { $0.clientStallSeconds = .max }),
            ("--snapshot-every-seconds", { $0.snapshotEverySeconds = .max }),
            ("--snapshot-every-changes", { $0.snapshotEveryChanges = .max }),
            ("--max-output-bytes", { $0.clientOutputBytesMax = .min }),
            ("--maxclients", { $0.maxClients = 0 }),
            ("--rate-limit", { $0.rateLimitPerSecond = -1 }),
            ("--events-retention-segments", { $0.eventsRetentionSegments = .max }),
            ("--log-preallocate-bytes", { $0.logPreallocateBytes = -1 }),
            ("--io-threads", { $0.ioThreads = 65 }),
            ("--shards", { $0.shards = 0 }),
            ("--metrics-port", { $0.metricsPort = 70_000 }),
            ("--max-partial-request-bytes", { $0.partialRequestBytesMax = .max }),
            // Out of its range, the request limit is refused before the partial bound is compared
            // with it (doubling it overflowed and trapped).
            ("--max-request-bytes", { $0.parserLimits.requestBytesMax = .max }),
            ("--max-request-bytes", { $0.parserLimits.requestBytesMax = 1 << 62 }),
            // Below twice the largest request, that request's buffers alone could pass it.
            ("--max-partial-request-bytes", { $0.partialRequestBytesMax = 2 * $0.parserLimits.requestBytesMax - 1 }),
        ]
        for (flag, change) in cases {
            var config = ServerConfiguration()
            change(&config)
            #expect(config.problem()?.hasPrefix(flag) == true, "\(flag): \(config.problem() ?? "accepted")")
        }
    }

    /// The smallest bound on unfinished requests the flags allow is one the server can run with (a
    /// first form of the budget trapped at start-up for bounds under 64 KiB that the checks accepted),
    /// and it is 1 MiB: below about 2 KiB, one request split across two reads passed it alone.
    @Test func theSmallestPartialRequestBoundServes() {
        var config = ServerConfiguration()
        config.parserLimits.requestBytesMax = ServerConfiguration.Range.requestBytes.lowerBound
        config.partialRequestBytesMax = ServerConfiguration.Range.partialRequestBytes.lowerBound
        #expect(config.problem() == nil)
        var budget = PartialRequestBudget<Int, Int>(bound: config.partialRequestBytesMax)
        #expect(budget.set(1, from: 0, to: config.partialRequestBytesMax + 1, restart: true, holder: 1).map(\.0) == [1])
    }
}
