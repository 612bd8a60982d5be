/// The file operations the journal, snapshots, recovery and the log reader use, and nothing more:
/// the seam between Stockade's durability code and a disk.
///
/// Two implementations: ``PosixStorage`` (real files; what the server runs on) and
/// ``SimulatedStorage`` (in memory, seeded, with injected faults and crashes; what the tests and the
/// simulator run on). Every type that touches files takes its storage through ``DataDirectory``, so
/// ``Journal``, ``Store``, ``Recovery``, ``SnapshotFile``, ``LogReader`` and ``Inspector`` run over
/// either without change.
///
/// Paths are plain strings; a directory is named by its path and a file by `directory + "/" + name`.
/// Every failure throws a ``JournalError`` naming the file and the system's reason.
public protocol Storage: AnyObject, Sendable {
    /// Opens a file. See ``FileAccess`` for what each mode creates or requires.
    func open(_ path: String, _ access: FileAccess) throws(JournalError) -> any StorageFile
    /// The whole content of a file, as the process sees it now.
    func readAll(_ path: String) throws(JournalError) -> [UInt8]
    /// Whether a file or directory exists at `path`.
    func exists(_ path: String) -> Bool
    /// Names (not paths) of the entries of a directory, sorted, without `.` and `..`.
    func list(_ directory: String) throws(JournalError) -> [String]
    /// Creates one directory (its parent must exist); an existing one is fine.
    func makeDirectory(_ path: String) throws(JournalError)
    /// Removes a file; a missing one is fine.
    func remove(_ path: String) throws(JournalError)
    /// Renames a file atomically, replacing `to`.
    func rename(_ from: String, to: String) throws(JournalError)
    /// fsync of a directory: makes entries created, renamed or removed in it survive a crash.
    func syncDirectory(_ path: String) throws(JournalError)
    /// Takes the exclusive lock of a data directory (the file `lockPath`) for as long as the returned
    /// object is not released; fails at once, naming the holder's process id, when another holds it.
    func lock(_ lockPath: String) throws(JournalError) -> any StorageLock
}

/// How ``Storage/open(_:_:)`` opens a file.
public enum FileAccess: Sendable {
    /// Read only; the file must exist.
    case read
    /// Read and write an existing file (recovery cutting a torn tail).
    case update
    /// Create the file, or empty an existing one, for writing (a new segment, a snapshot being written).
    case create
}

/// An open file. Not Sendable: one thread owns it (the journal's writer, a snapshot writer).
public protocol StorageFile: AnyObject {
    var path: String { get }
    /// Appends all of `bytes` at the end of the file (one `write` on POSIX; retried on a short write).
    func append(_ bytes: UnsafeRawBufferPointer) throws(JournalError)
    /// Writes all of `bytes` at `offset` (a snapshot's header, filled in last).
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(JournalError)
    /// Up to `count` bytes from `offset`; fewer at the end of the file.
    func read(at offset: Int, count: Int) throws(JournalError) -> [UInt8]
    /// The file's length now.
    func size() throws(JournalError) -> Int
    /// Cuts the file to `length` bytes.
    func truncate(to length: Int) throws(JournalError)
    /// Extends the file to `length` bytes of zeros, written (not `posix_fallocate`, whose space a
    /// later sync must also mark written), and returns true; returns false where the disk is full or
    /// the file may not grow that far (`RLIMIT_FSIZE`): the file then grows with each write, as
    /// before, and its length may have grown partway (read ``size()``). A `length` at or below the
    /// file's changes nothing. The log writes its segments over such zeros: an fdatasync that need
    /// not record a new file length or newly written blocks costs less.
    func preallocate(to length: Int) throws(JournalError) -> Bool
    /// fdatasync: the file's bytes (not necessarily its metadata other than the length) are durable.
    func dataSync() throws(JournalError)
    /// fsync: the file's bytes and metadata are durable.
    func sync() throws(JournalError)
    /// Closes the file; later calls fail. Closing twice is fine.
    func close()
}

extension StorageFile {
    func append(_ bytes: [UInt8]) throws(JournalError) {
        try typed { try bytes.withUnsafeBytes { try append($0) } }
    }

    func write(_ bytes: [UInt8], at offset: Int) throws(JournalError) {
        try typed { try bytes.withUnsafeBytes { try write($0, at: offset) } }
    }
}

/// A held data-directory lock; released by ``release()`` or when the object goes away.
public protocol StorageLock: AnyObject, Sendable {
    /// Gives the lock up. Releasing twice is fine.
    func release()
}

extension Storage {
    /// Creates `path` and any missing parents (`mkdir -p`), fsyncing the parent of each directory it
    /// created so that the new entries survive a crash.
    func makeDirectories(_ path: String) throws(JournalError) {
        guard !exists(path) else { return }
        let parent = Self.parent(of: path)
        if parent != path { try makeDirectories(parent) }
        try makeDirectory(path)
        try syncDirectory(parent)
    }

    /// The directory holding `path` (`.` for a bare name, `/` for a top-level one).
    static func parent(of path: String) -> String {
        var trimmed = Substring(path)
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        guard let slash = trimmed.lastIndex(of: "/") else { return "." }
        if slash == trimmed.startIndex { return "/" }
        return String(trimmed[..<slash])
    }
}
