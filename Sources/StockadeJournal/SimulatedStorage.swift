import Foundation
import StockadeCore

#if canImport(Glibc)
import Glibc
#endif

/// An in-memory ``Storage`` that behaves like a disk with a page cache, driven by a seed: what the
/// tests and the deterministic simulator run the journal, snapshots and recovery on.
///
/// The model:
/// - Every file has the bytes the process sees and the bytes that are *synced* (on the medium). A
///   write changes only the first; `fsync`/`fdatasync` copies them to the second.
/// - Directory entries (a file created, renamed, removed) are durable only after
///   ``Storage/syncDirectory(_:)`` of their directory. Directories themselves are always durable.
/// - ``crash()`` is a power cut: every file goes back to its synced bytes, plus (with
///   ``FaultPlan/crashKeepsTornPrefix``) a random prefix of the bytes changed since the last sync,
///   from the first changed byte on, whether they were appended or written in place over synced
///   bytes (a preallocated log segment), as a disk that wrote some sectors of a write does; entries
///   not synced into their directory vanish; locks are dropped; every file handle from before the
///   crash fails from then on.
/// - ``FaultPlan`` makes operations fail at random (EIO, ENOSPC, torn writes, slow syncs), and
///   ``failNext(_:errno:pathContaining:)`` fails exactly the next matching operation.
/// - ``flipBit(_:at:bit:)`` and ``flipRandomBit(_:)`` damage the medium (synced and visible bytes alike).
///
/// Every random choice comes from one ``SplitMix64`` seeded at ``init(seed:faults:)``, so a run that
/// makes the same calls in the same order makes the same choices. Thread-safe (one lock), so a
/// journal with its writer thread runs on it too; a deterministic driver sets
/// ``Journal/Options/writerThread`` off instead.
///
/// A simulator's loop, in short (the real journal, store and recovery on the simulated disk, in
/// place of an in-memory change log):
///
///     let disk = SimulatedStorage(seed: seed)
///     let directory = DataDirectory("/sim/data", storage: disk)
///     var options = Store.Options(shardCount: 4)
///     options.journal.writerThread = false       // no thread: the driver decides when to write
///     var store = try Store(directory: directory, options: options)
///     store.journal.onWaiting { ... }            // a reply is parked waiting for durability
///     disk.faults.syncEIO = 0.01                 // faults on while the engine runs
///     ... run commands; store.journal.writePending() writes + syncs one batch, answering its waiters ...
///     disk.crash()                               // power cut: unsynced bytes go, handles die
///     disk.faults = .init()                      // faults off for recovery (or not)
///     store = try Store(directory: directory, options: options)   // recovery, under a fresh lock
///     ... check every acknowledged change is there, or that start-up refused with a located error ...
public final class SimulatedStorage: Storage, @unchecked Sendable {
    /// Random faults, each a probability per matching operation (0: never). All off by default.
    public struct FaultPlan: Sendable {
        /// A write (append or positioned) fails with EIO, storing nothing.
        public var writeEIO = 0.0
        /// A write fails with ENOSPC, storing nothing.
        public var writeENOSPC = 0.0
        /// A write stores a random prefix of its bytes (possibly none), then fails with EIO.
        public var tornWrite = 0.0
        /// An fsync or fdatasync (of a file or a directory) fails with EIO, syncing nothing.
        public var syncEIO = 0.0
        /// A rename fails with EIO, changing nothing.
        public var renameEIO = 0.0
        /// A sync is slow: ``SimulatedStorage/onSlowSync`` is called (a simulator advances its clock
        /// or yields there) and ``Counters/slowSyncs`` counts it. Nothing really sleeps.
        public var slowSync = 0.0
        /// At ``SimulatedStorage/crash()``, keep a random prefix of each file's bytes changed since its
        /// last sync, appended or written in place (a torn write), instead of none.
        public var crashKeepsTornPrefix = true
        /// A ``StorageFile/preallocate(to:)`` answers false (a full disk, a file size limit) after
        /// growing the file by some part of the request, maybe none, so the file grows with each write.
        public var preallocationRefused = 0.0
        /// Only paths containing this are affected by the random faults (nil: every path).
        public var pathContaining: String?
        public init() {}
    }

    /// Operations ``failNext(_:errno:pathContaining:)`` can target.
    public enum Operation: Sendable, Equatable {
        case open, write, sync, syncDirectory, rename, remove, truncate
    }

    /// What happened so far, for a simulator's report.
    public struct Counters: Sendable {
        public var writes = 0
        public var syncs = 0
        public var directorySyncs = 0
        public var slowSyncs = 0
        public var injectedFaults = 0
        public var crashes = 0
        /// Processes killed (``SimulatedStorage/processKilled()``).
        public var kills = 0
        public var bitFlips = 0
    }

    /// The random faults in force; change them at any time.
    public var faults: FaultPlan {
        get { locked { plan } }
        set { locked { plan = newValue } }
    }
    /// Counts of operations and injected faults.
    public var counters: Counters { locked { count } }
    /// Called (outside the storage's lock) with the path of every sync that ``FaultPlan/slowSync`` made slow.
    public var onSlowSync: (@Sendable (String) -> Void)? {
        get { locked { slowSyncHook } }
        set { locked { slowSyncHook = newValue } }
    }
    /// The process id written into lock files and named when a lock is refused.
    public let processID: Int

    final class Inode {
        var data: [UInt8] = []
        var synced: [UInt8] = []
    }

    private let mutex = NSLock()
    private var rng: SplitMix64
    private var plan: FaultPlan
    private var count = Counters()
    private var slowSyncHook: (@Sendable (String) -> Void)?
    private var names: [String: Inode] = [:]
    private var durableNames: [String: Inode] = [:]
    private var directories: Set<String> = ["/", "."]
    private var lockHolders: [String: ObjectIdentifier] = [:]
    private var oneShots: [(operation: Operation, errno: Int32, pathContaining: String?, keepBytes: Int?)] = []
    /// Bumped by every crash: handles from an older generation belong to a dead process.
    private(set) var generation = 0

    /// A storage holding nothing, its random choices seeded by `seed`.
    public init(seed: UInt64, faults: FaultPlan = FaultPlan(), processID: Int = 4242) {
        rng = SplitMix64(seed: seed)
        plan = faults
        self.processID = processID
    }

    func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        mutex.lock()
        defer { mutex.unlock() }
        return try body()
    }

    // MARK: Fault control

    /// Makes the next operation of kind `operation` (on a path containing `pathContaining`, if given)
    /// fail with `errno`. Queued one-shots fire in order.
    public func failNext(_ operation: Operation, errno code: Int32 = EIO, pathContaining: String? = nil) {
        locked { oneShots.append((operation, code, pathContaining, nil)) }
    }

    /// Makes the next write (on a path containing `pathContaining`, if given) store only its first
    /// `bytes` bytes and then fail with EIO: a write torn at exactly that byte.
    public func tearNextWrite(keeping bytes: Int, pathContaining: String? = nil) {
        precondition(bytes >= 0)
        locked { oneShots.append((.write, EIO, pathContaining, bytes)) }
    }

    /// A power cut. See the type's documentation for what survives.
    public func crash() {
        locked {
            count.crashes += 1
            endProcess()
            names = durableNames
            var seen = Set<ObjectIdentifier>()
            // In path order: the random torn prefixes must not depend on the dictionary's hash seed.
            for (_, inode) in names.sorted(by: { $0.key < $1.key }) where seen.insert(ObjectIdentifier(inode)).inserted {
                let survivor = plan.crashKeepsTornPrefix ? Self.tornSurvivor(inode, &rng) : inode.synced
                inode.data = survivor
                inode.synced = survivor
            }
        }
    }

    /// The process is killed (`kill -9`), the machine keeps running: its locks are dropped and its
    /// file handles die, but the page cache keeps every byte written and every entry made, synced or
    /// not, and the next process reads them as they are (a later ``crash()`` still takes back what
    /// nobody synced).
    public func processKilled() {
        locked {
            count.kills += 1
            endProcess()
        }
    }

    /// What any end of the process does, under the lock: its file handles die (a new generation), its
    /// locks are dropped, and faults armed for its next operations die with it.
    private func endProcess() {
        generation += 1
        lockHolders = [:]
        oneShots.removeAll()
    }

    /// What a power cut leaves of a file whose bytes changed since its last sync: the synced bytes with
    /// a random prefix of the change, which runs from its first changed byte to its last (to the end
    /// of what the process sees, when that grew). Appended bytes extend the file by as many as the
    /// prefix holds; bytes written in place replace the synced ones as far as it reaches, the rest
    /// staying as synced. A file cut shorter since its sync goes back to its synced bytes whole.
    static func tornSurvivor(_ inode: Inode, _ rng: inout SplitMix64) -> [UInt8] {
        let data = inode.data, synced = inode.synced
        guard data.count >= synced.count else { return synced }
        var first = 0
        while first < synced.count && data[first] == synced[first] { first += 1 }
        guard first < data.count else { return synced }
        var end = data.count
        if end == synced.count {
            while end > first && data[end - 1] == synced[end - 1] { end -= 1 }
        }
        let kept = first + Int(rng.next() % UInt64(end - first + 1))
        return Array(data[..<kept]) + (kept < synced.count ? synced[kept...] : [])
    }

    /// Flips bit `bit` (0-7) of byte `offset` of a file, on the medium and in what the process sees.
    public func flipBit(_ path: String, at offset: Int, bit: Int) {
        locked {
            guard let inode = names[path] ?? durableNames[path] else { preconditionFailure("no file \(path)") }
            precondition(offset < inode.data.count || offset < inode.synced.count, "offset \(offset) past the end of \(path)")
            if offset < inode.data.count { inode.data[offset] ^= UInt8(1) << bit }
            if offset < inode.synced.count { inode.synced[offset] ^= UInt8(1) << bit }
            count.bitFlips += 1
        }
    }

    /// Flips one random bit of a file (headers included); returns the byte offset and bit.
    @discardableResult
    public func flipRandomBit(_ path: String) -> (offset: Int, bit: Int) {
        let (offset, bit) = locked { () -> (Int, Int) in
            let size = max(names[path]?.data.count ?? 0, durableNames[path]?.synced.count ?? 0)
            precondition(size > 0, "no bytes in \(path)")
            return (Int(rng.next() % UInt64(size)), Int(rng.next() % 8))
        }
        flipBit(path, at: offset, bit: bit)
        return (offset, bit)
    }

    /// The bytes of a file as the process sees them (nil: no such file).
    public func contents(_ path: String) -> [UInt8]? { locked { names[path]?.data } }

    /// Replaces a file's bytes, synced, with its entry durable: for setting up a test.
    public func setContents(_ path: String, _ bytes: [UInt8]) {
        locked {
            let inode = names[path] ?? Inode()
            inode.data = bytes
            inode.synced = bytes
            names[path] = inode
            durableNames[path] = inode
        }
    }

    /// A random number from the storage's generator (for a driver that wants one stream of choices).
    public func random(below bound: UInt64) -> UInt64 { locked { bound == 0 ? 0 : rng.next() % bound } }

    // MARK: Storage

    public func open(_ path: String, _ access: FileAccess) throws(JournalError) -> any StorageFile {
        try locked { () throws(JournalError) -> any StorageFile in
            try injectOneShot(.open, path)
            guard directories.contains(Self.parent(of: path)) else { throw Self.error("cannot open", path, ENOENT) }
            switch access {
            case .read, .update:
                guard let inode = names[path] else { throw Self.error("cannot open", path, ENOENT) }
                return SimulatedFile(storage: self, path: path, inode: inode, generation: generation, writable: access == .update)
            case .create:
                let inode = names[path] ?? Inode()
                inode.data = []
                names[path] = inode
                return SimulatedFile(storage: self, path: path, inode: inode, generation: generation, writable: true)
            }
        }
    }

    public func readAll(_ path: String) throws(JournalError) -> [UInt8] {
        try locked { () throws(JournalError) -> [UInt8] in
            guard let inode = names[path] else { throw Self.error("cannot open", path, ENOENT) }
            return inode.data
        }
    }

    public func exists(_ path: String) -> Bool { locked { names[path] != nil || directories.contains(path) } }

    public func list(_ directory: String) throws(JournalError) -> [String] {
        try locked { () throws(JournalError) -> [String] in
            guard directories.contains(directory) else { throw Self.error("cannot list", directory, ENOENT) }
            let prefix = directory == "/" ? "/" : directory + "/"
            let files = names.keys.filter { $0.hasPrefix(prefix) && !$0.dropFirst(prefix.count).contains("/") }
            let subdirectories = directories.filter { $0.hasPrefix(prefix) && $0 != directory && !$0.dropFirst(prefix.count).contains("/") }
            return (files + subdirectories).map { String($0.dropFirst(prefix.count)) }.sorted()
        }
    }

    public func makeDirectory(_ path: String) throws(JournalError) {
        try locked { () throws(JournalError) in
            guard directories.contains(Self.parent(of: path)) else { throw Self.error("cannot create directory", path, ENOENT) }
            guard names[path] == nil else { throw Self.error("cannot create directory", path, EEXIST) }
            directories.insert(path)
        }
    }

    public func remove(_ path: String) throws(JournalError) {
        try locked { () throws(JournalError) in
            try injectOneShot(.remove, path)
            names[path] = nil
        }
    }

    public func rename(_ from: String, to: String) throws(JournalError) {
        try locked { () throws(JournalError) in
            try injectOneShot(.rename, from)
            try inject(plan.renameEIO, EIO, "cannot rename \(from) to", to)
            guard let inode = names[from] else { throw Self.error("cannot rename \(from) to", to, ENOENT) }
            names[to] = inode
            names[from] = nil
        }
    }

    public func syncDirectory(_ path: String) throws(JournalError) {
        let slow = try locked { () throws(JournalError) -> (@Sendable (String) -> Void)? in
            count.directorySyncs += 1
            try injectOneShot(.syncDirectory, path)
            try inject(plan.syncEIO, EIO, "fsync failed on directory", path)
            let prefix = path == "/" ? "/" : path + "/"
            let inDirectory = { (name: String) in name.hasPrefix(prefix) && !name.dropFirst(prefix.count).contains("/") }
            for name in durableNames.keys where inDirectory(name) && names[name] == nil { durableNames[name] = nil }
            for (name, inode) in names where inDirectory(name) { durableNames[name] = inode }
            return slowSyncDue(path)
        }
        slow?(path)
    }

    public func lock(_ lockPath: String) throws(JournalError) -> any StorageLock {
        try locked { () throws(JournalError) -> any StorageLock in
            guard lockHolders[lockPath] == nil else {
                throw DataDirectory.inUse(lockPath: lockPath, holder: String(processID))
            }
            let lock = SimulatedLock(storage: self, path: lockPath, generation: generation)
            lockHolders[lockPath] = ObjectIdentifier(lock)
            let inode = names[lockPath] ?? Inode()
            inode.data = Array("\(processID)\n".utf8)
            names[lockPath] = inode
            return lock
        }
    }

    // MARK: For the file and lock handles

    func release(_ lock: SimulatedLock) {
        locked {
            if lock.generation == generation, lockHolders[lock.path] == ObjectIdentifier(lock) { lockHolders[lock.path] = nil }
        }
    }

    /// Runs one operation of a handle under the lock, after checking the handle outlived no crash.
    func withFile<T>(_ file: SimulatedFile, _ body: () throws(JournalError) -> T) throws(JournalError) -> T {
        mutex.lock()
        defer { mutex.unlock() }
        guard file.generation == generation else {
            throw JournalError(.io, "\(file.path): the simulated process crashed; this file handle is dead")
        }
        return try body()
    }

    /// One write's fate: stored whole, or failed (after storing a prefix for a torn write).
    /// Returns how many bytes to store and the error to throw after storing them. Under the lock.
    func writeFate(_ path: String, byteCount: Int) throws(JournalError) -> (bytes: Int, error: JournalError?) {
        count.writes += 1
        if let index = oneShotIndex(.write, path), let keep = oneShots[index].keepBytes {
            oneShots.remove(at: index)
            count.injectedFaults += 1
            return (min(keep, byteCount), Self.error("write failed on", path, EIO))
        }
        try injectOneShot(.write, path)
        try inject(plan.writeEIO, EIO, "write failed on", path)
        try inject(plan.writeENOSPC, ENOSPC, "write failed on", path)
        if applies(path), chance(plan.tornWrite) {
            count.injectedFaults += 1
            return (Int(rng.next() % UInt64(byteCount + 1)), Self.error("write failed on", path, EIO))
        }
        return (byteCount, nil)
    }

    /// A sync's fate; returns the slow-sync hook to call (outside the lock) when it is slow. Under the lock.
    func syncFate(_ path: String) throws(JournalError) -> (@Sendable (String) -> Void)? {
        count.syncs += 1
        try injectOneShot(.sync, path)
        try inject(plan.syncEIO, EIO, "fdatasync failed on", path)
        return slowSyncDue(path)
    }

    func truncateFate(_ path: String) throws(JournalError) { try injectOneShot(.truncate, path) }

    /// How many of `wanted` bytes a preallocation adds: all of them, or, refused
    /// (``FaultPlan/preallocationRefused``), some prefix of them (zeros written until the disk was
    /// full), maybe none. Under the lock.
    func preallocationGrowth(_ path: String, wanted: Int) -> (bytes: Int, refused: Bool) {
        guard applies(path) && chance(plan.preallocationRefused) else { return (wanted, false) }
        return (Int(rng.next() % UInt64(wanted + 1)), true)
    }

    private func slowSyncDue(_ path: String) -> (@Sendable (String) -> Void)? {
        guard applies(path), chance(plan.slowSync) else { return nil }
        count.slowSyncs += 1
        return slowSyncHook ?? { _ in }
    }

    private func applies(_ path: String) -> Bool { plan.pathContaining.map { path.contains($0) } ?? true }

    private func chance(_ probability: Double) -> Bool {
        probability > 0 && Double(rng.next() >> 11) / Double(1 << 53) < probability
    }

    private func inject(_ probability: Double, _ code: Int32, _ what: String, _ path: String) throws(JournalError) {
        if applies(path), chance(probability) {
            count.injectedFaults += 1
            throw Self.error(what, path, code)
        }
    }

    private func injectOneShot(_ operation: Operation, _ path: String) throws(JournalError) {
        let what: String
        switch operation {
        case .open: what = "cannot open"
        case .write: what = "write failed on"
        case .sync: what = "fdatasync failed on"
        case .syncDirectory: what = "fsync failed on directory"
        case .rename: what = "cannot rename"
        case .remove: what = "cannot remove"
        case .truncate: what = "cannot truncate"
        }
        guard let index = oneShotIndex(operation, path) else { return }
        let shot = oneShots.remove(at: index)
        count.injectedFaults += 1
        throw Self.error(what, path, shot.errno)
    }

    private func oneShotIndex(_ operation: Operation, _ path: String) -> Int? {
        oneShots.firstIndex { $0.operation == operation && ($0.pathContaining.map { path.contains($0) } ?? true) }
    }

    static func error(_ what: String, _ path: String, _ code: Int32) -> JournalError {
        JournalError(.io, "\(what) \(path): \(String(cString: strerror(code))) (simulated)")
    }
}

/// A lock held on a ``SimulatedStorage``; a crash drops it.
final class SimulatedLock: StorageLock, @unchecked Sendable {
    let path: String
    let generation: Int
    private weak var storage: SimulatedStorage?

    init(storage: SimulatedStorage, path: String, generation: Int) {
        self.storage = storage
        self.path = path
        self.generation = generation
    }

    func release() { storage?.release(self) }
    deinit { release() }
}

/// A file handle on a ``SimulatedStorage``.
final class SimulatedFile: StorageFile {
    let path: String
    let generation: Int
    private let storage: SimulatedStorage
    private let inode: SimulatedStorage.Inode
    private let writable: Bool
    private var isOpen = true

    init(storage: SimulatedStorage, path: String, inode: SimulatedStorage.Inode, generation: Int, writable: Bool) {
        self.storage = storage
        self.path = path
        self.inode = inode
        self.generation = generation
        self.writable = writable
    }

    private func checkOpen(writing: Bool) throws(JournalError) {
        guard isOpen else { throw JournalError(.io, "\(path): file is closed") }
        if writing && !writable { throw SimulatedStorage.error("write failed on", path, EBADF) }
    }

    func append(_ bytes: UnsafeRawBufferPointer) throws(JournalError) {
        try checkOpen(writing: true)
        try storage.withFile(self) { () throws(JournalError) in
            let fate = try storage.writeFate(path, byteCount: bytes.count)
            inode.data.append(contentsOf: bytes.prefix(fate.bytes))
            if let error = fate.error { throw error }
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(JournalError) {
        try checkOpen(writing: true)
        try storage.withFile(self) { () throws(JournalError) in
            let fate = try storage.writeFate(path, byteCount: bytes.count)
            if inode.data.count < offset + fate.bytes {
                inode.data.append(contentsOf: repeatElement(0, count: offset + fate.bytes - inode.data.count))
            }
            inode.data.replaceSubrange(offset..<offset + fate.bytes, with: bytes.prefix(fate.bytes))
            if let error = fate.error { throw error }
        }
    }

    func read(at offset: Int, count: Int) throws(JournalError) -> [UInt8] {
        try checkOpen(writing: false)
        return try storage.withFile(self) { () throws(JournalError) -> [UInt8] in
            guard offset < inode.data.count else { return [] }
            return Array(inode.data[offset..<min(inode.data.count, offset + count)])
        }
    }

    func size() throws(JournalError) -> Int {
        try checkOpen(writing: false)
        return try storage.withFile(self) { () throws(JournalError) -> Int in inode.data.count }
    }

    func truncate(to length: Int) throws(JournalError) {
        try checkOpen(writing: true)
        try storage.withFile(self) { () throws(JournalError) in
            try storage.truncateFate(path)
            if length < inode.data.count {
                inode.data.removeSubrange(length...)
            } else {
                inode.data.append(contentsOf: repeatElement(0, count: length - inode.data.count))
            }
        }
    }

    func preallocate(to length: Int) throws(JournalError) -> Bool {
        try checkOpen(writing: true)
        return try storage.withFile(self) { () throws(JournalError) -> Bool in
            guard length > inode.data.count else { return true }
            let growth = storage.preallocationGrowth(path, wanted: length - inode.data.count)
            inode.data.append(contentsOf: repeatElement(0, count: growth.bytes))
            return !growth.refused
        }
    }

    func dataSync() throws(JournalError) { try sync() }

    func sync() throws(JournalError) {
        try checkOpen(writing: false)
        let slow = try storage.withFile(self) { () throws(JournalError) -> (@Sendable (String) -> Void)? in
            let slow = try storage.syncFate(path)
            inode.synced = inode.data
            return slow
        }
        slow?(path)
    }

    func close() { isOpen = false }
}
