import StockadeCore

/// A data directory on some ``Storage``: its file names, its listing, and its lock.
///
/// `wal-<first LSN, 20 digits>.log` segments, `snap-<LSN, 20 digits>.snap` snapshots, and the lock
/// file `LOCK` (which holds the process id of the process that has the directory open).
public struct DataDirectory: Sendable {
    public let path: String
    /// Where the files are: real files unless a test or the simulator says otherwise.
    public let storage: any Storage

    public init(_ path: String, storage: any Storage = PosixStorage.shared) {
        self.path = path
        self.storage = storage
    }

    /// Creates the directory and any missing parents (`mkdir -p`), fsyncing each new entry's parent.
    public func create() throws(JournalError) { try storage.makeDirectories(path) }

    public func segmentPath(firstLSN: UInt64) -> String { "\(path)/wal-\(Self.digits(firstLSN)).log" }
    public func snapshotPath(lsn: UInt64) -> String { "\(path)/snap-\(Self.digits(lsn)).snap" }
    /// The lock file: `flock`ed by the process that has the directory open, holding its process id.
    public var lockPath: String { "\(path)/LOCK" }

    static func digits(_ n: UInt64) -> String {
        let s = String(n)
        return String(repeating: "0", count: max(0, 20 - s.count)) + s
    }

    /// Takes the directory's exclusive lock, held until the returned lock is released (``Store`` holds
    /// it from before recovery until ``Store/close()``). A second opener, in this process or another,
    /// fails at once with ``JournalError/Code/locked`` naming the holder's process id.
    public func lock() throws(JournalError) -> any StorageLock {
        try storage.lock(lockPath)
    }

    /// The error a second opener gets.
    static func inUse(lockPath: String, holder: String) -> JournalError {
        JournalError(
            .locked,
            "the data directory is in use by process \(holder) (lock file \(lockPath)); two processes writing one "
                + "directory destroy each other's log. Stop that process first, or use another --data-dir.")
    }

    /// A file whose presence says the directory has held a replica's log (docs/REPLICATION.md, "Terms
    /// in the log"): a start as primary then begins a term of its own even over a log without terms,
    /// so the records it writes are told apart from those of the primary it followed.
    public var replicatedMarkerPath: String { "\(path)/REPLICATED" }

    /// Whether ``replicatedMarkerPath`` is present.
    public var isMarkedReplicated: Bool { storage.exists(replicatedMarkerPath) }

    /// Creates ``replicatedMarkerPath`` (synced, with its directory entry) unless present.
    public func markReplicated() throws(JournalError) {
        guard !isMarkedReplicated else { return }
        let file = try storage.open(replicatedMarkerPath, .create)
        let text = Array("This directory has held a replica's log: a start as primary begins a term.\n".utf8)
        var failure: JournalError?
        text.withUnsafeBytes { raw in
            do throws(JournalError) { try file.append(raw) } catch { failure = error }
        }
        if let failure { throw failure }
        try file.dataSync()
        file.close()
        try storage.syncDirectory(path)
    }

    /// Segments present, oldest first: (first LSN, path).
    public func segments() throws(JournalError) -> [(firstLSN: UInt64, path: String)] {
        try entries(prefix: "wal-", suffix: ".log").map { (firstLSN: $0.0, path: $0.1) }
    }

    /// Snapshots present, oldest first: (covered LSN, path).
    public func snapshots() throws(JournalError) -> [(lsn: UInt64, path: String)] {
        try entries(prefix: "snap-", suffix: ".snap").map { (lsn: $0.0, path: $0.1) }
    }

    /// Snapshots a crash interrupted while they were being written (`snap-*.snap.tmp`).
    public func unfinishedSnapshots() throws(JournalError) -> [String] {
        guard storage.exists(path) else { return [] }
        return try storage.list(path).filter { $0.hasPrefix("snap-") && $0.hasSuffix(".snap.tmp") }.map { "\(path)/\($0)" }
    }

    private func entries(prefix: String, suffix: String) throws(JournalError) -> [(UInt64, String)] {
        guard storage.exists(path) else { return [] }
        return try storage.list(path).compactMap { name in
            guard name.hasPrefix(prefix), name.hasSuffix(suffix) else { return nil }
            let digits = name.dropFirst(prefix.count).dropLast(suffix.count)
            guard digits.count == 20, let n = UInt64(digits) else { return nil }
            return (n, "\(path)/\(name)")
        }.sorted { $0.0 < $1.0 }
    }
}

/// The first 32 bytes of every log segment.
public struct SegmentHeader: Equatable, Sendable {
    public static let magic: [UInt8] = Array("STOCKWAL".utf8)
    public static let version: UInt32 = 1
    public static let size = 32

    public var shardCount: Int
    public var firstLSN: UInt64

    func encode() -> [UInt8] {
        var out = Self.magic
        out.appendLE(Self.version); out.appendLE(UInt32(shardCount)); out.appendLE(firstLSN)
        out.appendLE(CRC32C.checksum(out)); out.appendLE(UInt32(0))
        return out
    }

    enum Parsed {
        case header(SegmentHeader)
        case truncated
        case invalid(String)
    }

    static func parse(_ bytes: UnsafeRawBufferPointer) -> Parsed {
        guard bytes.count >= size else { return .truncated }
        guard Array(bytes[0..<8]) == magic else { return .invalid("not a Stockade log segment (bad magic)") }
        var r = ByteReader(bytes, offset: 8)
        let version: UInt32 = (try? r.read()) ?? 0
        let shards: UInt32 = (try? r.read()) ?? 0
        let first: UInt64 = (try? r.read()) ?? 0
        let crc: UInt32 = (try? r.read()) ?? 0
        guard crc == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<24])) else {
            return .invalid("segment header checksum mismatch")
        }
        guard version == Self.version else { return .invalid("segment format version \(version), this build reads \(Self.version)") }
        guard shards >= 1, shards <= UInt32(Limits.shardCountMax) else { return .invalid("shard count \(shards)") }
        return .header(SegmentHeader(shardCount: Int(shards), firstLSN: first))
    }
}
