import StockadeCore

/// A data directory on some ``Storage``: its file names, its listing, and its lock.
///
/// `wal-<first LSN, 20 digits>.log` segments, `snap-<LSN, 20 digits>.snap` snapshots, the lock
/// file `LOCK` (which holds the process id of the process that has the directory open), and
/// `diverged-<epoch>-<unix-ms>/` subdirectories holding logs set aside (``setAside(into:)``), which
/// nothing here reads.
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
        try writeMarker(replicatedMarkerPath, "This directory has held a replica's log: a start as primary begins a term.\n")
    }

    /// Writes a small marker file, durably: its bytes and its directory entry.
    private func writeMarker(_ markerPath: String, _ text: String) throws(JournalError) {
        let file = try storage.open(markerPath, .create)
        var failure: JournalError?
        Array(text.utf8).withUnsafeBytes { raw in
            do throws(JournalError) { try file.append(raw) } catch { failure = error }
        }
        if let failure { throw failure }
        try file.dataSync()
        file.close()
        try storage.syncDirectory(path)
    }

    /// A file naming the coordinated cluster whose history this directory holds (docs/REPLICATION.md,
    /// "How it decides"): written when the node is elected its primary or links to its primary. Under
    /// a coordinator, a node whose directory names another cluster (or none) does not stand.
    public var clusterMarkerPath: String { "\(path)/CLUSTER" }

    /// The cluster ``clusterMarkerPath`` names, or nil without one.
    public func clusterRecorded() -> String? {
        guard let bytes = try? storage.readAll(clusterMarkerPath) else { return nil }
        return String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Records `cluster` in ``clusterMarkerPath`` (durably) unless it is there already. A crash while
    /// it is rewritten leaves none: the node then stands only once it has linked to the primary again.
    public func recordCluster(_ cluster: String) throws(JournalError) {
        guard clusterRecorded() != cluster else { return }
        try storage.remove(clusterMarkerPath)
        try writeMarker(clusterMarkerPath, cluster + "\n")
    }

    /// A file whose presence says the node is starting over as a replica (docs/REPLICATION.md,
    /// "Rejoining"): written before its log is set aside, removed once a link after that follows the
    /// primary. A start finding it does not serve the (empty or partial) state as a primary's.
    public var startingOverMarkerPath: String { "\(path)/STARTING-OVER" }

    /// Whether ``startingOverMarkerPath`` is present.
    public var isStartingOver: Bool { storage.exists(startingOverMarkerPath) }

    /// Creates ``startingOverMarkerPath`` (synced, with its directory entry) unless present.
    public func markStartingOver() throws(JournalError) {
        guard !isStartingOver else { return }
        try writeMarker(startingOverMarkerPath, "This node is starting over as a replica: start it with --replica-of (or its --coordinator).\n")
    }

    /// Removes ``startingOverMarkerPath`` (and syncs the directory) if present.
    public func clearStartingOver() throws(JournalError) {
        guard isStartingOver else { return }
        try storage.remove(startingOverMarkerPath)
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

    // MARK: Setting a diverged log aside

    /// Subdirectories that keep a log set aside (``setAside(into:)``) start with this: nothing that
    /// reads the data directory (recovery, the journal, snapshots, the log reader) looks inside them.
    public static let setAsidePrefix = "diverged-"
    /// The file in a set-aside directory while files are still being moved into it: from the moment
    /// it is durable, the move is decided, and an interrupted one is finished at the next open
    /// (``finishSettingAside()``).
    public static let setAsideUnfinishedMarker = "MOVING"

    /// What ``setAside(into:)`` moved.
    public struct SetAside: Sendable {
        /// The subdirectory the files are in now.
        public var path: String
        /// Their names (segments and snapshots).
        public var files: [String]
    }

    /// The set-aside subdirectories this directory holds now, by name.
    public func setAsideNames() throws(JournalError) -> [String] {
        try storage.list(path).filter { $0.hasPrefix(Self.setAsidePrefix) }
    }

    /// A subdirectory name for a log set aside at `epoch` at wall-clock time `unixMillis`, free in this
    /// directory: `diverged-<epoch>-<unix-ms>` (a millisecond later if that one is taken).
    public func freeSetAsideName(epoch: UInt64, unixMillis: Int64) -> String {
        var millis = unixMillis
        while storage.exists("\(path)/\(Self.setAsidePrefix)\(epoch)-\(millis)") { millis += 1 }
        return "\(Self.setAsidePrefix)\(epoch)-\(millis)"
    }

    /// Moves every log segment and snapshot into the new subdirectory `name` (renames, no copy),
    /// leaving a directory that recovers to an empty state. A crash at any point leaves either the
    /// old directory (before the marker is durable) or the empty one: the subdirectory is created with
    /// the marker ``setAsideUnfinishedMarker`` in it first, and an open that finds the marker moves
    /// the rest (``finishSettingAside()``). The files are renamed with the target directory synced
    /// before the source one, so a crash in between shows a file twice, never nowhere.
    ///
    /// The caller makes sure nothing writes the files meanwhile (a journal with nothing pending, no
    /// snapshot under way); the journal's open segment may be among them (it then writes nothing
    /// more to it: see ``Journal/restart(at:)``).
    public func setAside(into name: String) throws(JournalError) -> SetAside {
        precondition(name.hasPrefix(Self.setAsidePrefix) && !name.contains("/"), "a set-aside directory is named diverged-...")
        let target = "\(path)/\(name)"
        guard !storage.exists(target) else { throw JournalError(.io, "cannot set the log aside into \(target): it exists") }
        try storage.makeDirectory(target)
        let marker = try storage.open("\(target)/\(Self.setAsideUnfinishedMarker)", .create)
        defer { marker.close() }
        try marker.sync()
        try storage.syncDirectory(target)
        try storage.syncDirectory(path)
        // Decided: from here on, the next open finishes the move.
        let files = try moveLogFiles(into: target)
        try storage.remove("\(target)/\(Self.setAsideUnfinishedMarker)")
        try storage.syncDirectory(target)
        return SetAside(path: target, files: files)
    }

    /// Finishes every move into a set-aside subdirectory that a crash interrupted (its marker is
    /// there): the segments and snapshots still here are moved too. Run under the directory's lock,
    /// before recovery. Returns the subdirectories finished.
    public func finishSettingAside() throws(JournalError) -> [String] {
        guard storage.exists(path) else { return [] }
        var finished: [String] = []
        for name in try storage.list(path) where name.hasPrefix(Self.setAsidePrefix) {
            let target = "\(path)/\(name)"
            let marker = "\(target)/\(Self.setAsideUnfinishedMarker)"
            guard storage.exists(marker) else { continue }
            _ = try moveLogFiles(into: target)
            try storage.remove(marker)
            try storage.syncDirectory(target)
            finished.append(target)
        }
        return finished
    }

    /// Renames every segment and snapshot into `target`, then syncs `target` and this directory (in
    /// that order). Returns the names moved.
    private func moveLogFiles(into target: String) throws(JournalError) -> [String] {
        let files = try snapshots().map(\.path) + segments().map(\.path)
        var names: [String] = []
        for file in files {
            let name = String(file.dropFirst(path.count + 1))
            try storage.rename(file, to: "\(target)/\(name)")
            names.append(name)
        }
        try storage.syncDirectory(target)
        try storage.syncDirectory(path)
        return names
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
