import Foundation
import Testing
@testable import StockadeCore
@testable import StockadeJournal

/// The `stockade` executable the Makefile builds before the tests (STOCKADE_BIN), or the debug build.
func stockadeBinary() -> String {
    if let path = ProcessInfo.processInfo.environment["STOCKADE_BIN"] { return path }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/stockade").path
}

@Suite struct CrashTests {
    /// A child process reserves under load with fsync=always and reports each acknowledged hold; it is
    /// killed with SIGKILL at a random moment, again and again. After every restart, each hold it
    /// acknowledged is there and every SKU's invariant holds.
    @Test func killNineLosesNothingAcknowledged() async throws {
        let binary = stockadeBinary()
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build \(binary) first (make test does)")
        let path = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var acknowledged: [(OrderID, String, String)] = []
        var rng = SplitMix64(seed: 99)
        for round in 0..<5 {
            let child = Process()
            child.executableURL = URL(fileURLWithPath: binary)
            child.arguments = ["crash-worker", "--data-dir", path, "--shards", "2", "--clients", "6",
                               "--snapshot-every", round % 2 == 0 ? "40" : "0"]
            let output = Pipe()
            child.standardOutput = output
            child.standardError = FileHandle.nullDevice
            try child.run()
            let reader = AckReader(output.fileHandleForReading)
            // Wait for READY, then let it run a random while under load.
            let deadline = Date().addingTimeInterval(60)
            while !reader.ready && Date() < deadline { try await Task.sleep(for: .milliseconds(10)) }
            try #require(reader.ready, "crash worker did not start")
            try await Task.sleep(for: .milliseconds(Int64.random(in: 200...900, using: &rng)))
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            #expect(child.terminationReason == .uncaughtSignal)
            let acks = reader.finish()
            #expect(acks.count > 0, "round \(round) acknowledged nothing")
            acknowledged += acks

            let (state, report) = try Recovery.recover(DataDirectory(path), options: .init(shardCount: 2, repair: true))
            let engine = Engine(state: state, log: MemoryChangeLog())
            var missing = 0
            for (id, user, sku) in acknowledged {
                let reply = await engine.execute(.order(id), now: 0)
                guard case .order(let info) = reply, info.user == Name(user), info.lines.first?.sku == Name(sku) else {
                    missing += 1
                    continue
                }
            }
            #expect(missing == 0, "round \(round): \(missing) of \(acknowledged.count) acknowledged holds lost; \(report)")
            let audit = await engine.execute(.audit(sku: nil), now: 0)
            guard case .audit(let findings) = audit else { Issue.record("\(audit)"); return }
            #expect(!findings.isEmpty && findings.allSatisfy { $0.ok })
        }
    }
}

/// Collects "ACK <order> <user> <sku>" lines from the child's stdout on a background thread.
final class AckReader: @unchecked Sendable {
    private let lock = NSLock()
    private var buffer = Data()
    private var lines: [(OrderID, String, String)] = []
    private var sawReady = false
    private let handle: FileHandle
    private let finished = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        self.handle = handle
        Thread {
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                self.consume(chunk)
            }
            self.finished.signal()
        }.start()
    }

    var ready: Bool { lock.withLock { sawReady } }

    private func consume(_ chunk: Data) {
        lock.withLock {
            buffer.append(chunk)
            while let newline = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex...newline)
                if line == "READY" { sawReady = true; continue }
                let parts = line.split(separator: " ")
                // A partial last line (killed mid-write) has no complete fields and is not counted.
                if parts.count == 4, parts[0] == "ACK", let id = UInt64(parts[1]) {
                    lines.append((OrderID(rawValue: id), String(parts[2]), String(parts[3])))
                }
            }
        }
    }

    /// Waits for end of output (the child is dead) and returns the complete lines.
    func finish() -> [(OrderID, String, String)] {
        finished.wait()
        return lock.withLock { lines }
    }
}
