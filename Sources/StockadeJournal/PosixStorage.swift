#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// ``Storage`` on real files: POSIX calls, nothing in between. What the server runs on.
public final class PosixStorage: Storage {
    /// The one instance; it holds no state.
    public static let shared = PosixStorage()

    private init() {}

    static func error(_ what: String, _ path: String, _ code: Int32 = errno) -> JournalError {
        JournalError(.io, "\(what) \(path): \(String(cString: strerror(code)))")
    }

    public func open(_ path: String, _ access: FileAccess) throws(JournalError) -> any StorageFile {
        let flags: Int32
        switch access {
        case .read: flags = O_RDONLY | O_CLOEXEC
        case .update: flags = O_RDWR | O_CLOEXEC
        case .create: flags = O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC
        }
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw Self.error("cannot open", path) }
        return PosixFile(path: path, fd: fd)
    }

    public func readAll(_ path: String) throws(JournalError) -> [UInt8] {
        let file = try open(path, .read)
        defer { file.close() }
        let size = try file.size()
        let bytes = try file.read(at: 0, count: size)
        guard bytes.count == size else { throw JournalError(.io, "short read of \(path): \(bytes.count) of \(size) bytes") }
        return bytes
    }

    public func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public func list(_ directory: String) throws(JournalError) -> [String] {
        guard let dir = opendir(directory) else { throw Self.error("cannot list", directory) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public func makeDirectory(_ path: String) throws(JournalError) {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw Self.error("cannot create directory", path) }
    }

    public func remove(_ path: String) throws(JournalError) {
        guard unlink(path) == 0 || errno == ENOENT else { throw Self.error("cannot remove", path) }
    }

    public func rename(_ from: String, to: String) throws(JournalError) {
        guard Glibc.rename(from, to) == 0 else { throw Self.error("cannot rename \(from) to", to) }
    }

    public func syncDirectory(_ path: String) throws(JournalError) {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Self.error("cannot open directory", path) }
        defer { _ = Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw Self.error("fsync failed on directory", path) }
    }

    /// `flock(LOCK_EX | LOCK_NB)` on the lock file, which then holds the holder's process id. The lock
    /// belongs to the open file description, so it also excludes a second opener in the same process,
    /// and the kernel drops it when the process dies however it dies: a stale file never blocks.
    public func lock(_ lockPath: String) throws(JournalError) -> any StorageLock {
        let fd = Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Self.error("cannot open lock file", lockPath) }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EINTR { continue }
            var holder = [UInt8](repeating: 0, count: 32)
            let n = holder.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            _ = Glibc.close(fd)
            guard code == EWOULDBLOCK else { throw Self.error("cannot lock", lockPath, code) }
            let pid = String(decoding: holder.prefix(max(0, n)), as: UTF8.self).split(separator: "\n").first.map(String.init) ?? "?"
            throw DataDirectory.inUse(lockPath: lockPath, holder: pid.isEmpty ? "?" : pid)
        }
        let text = Array("\(getpid())\n".utf8)
        let written = text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        guard ftruncate(fd, off_t(text.count)) == 0, written == text.count else {
            let failure = Self.error("cannot write the process id into", lockPath)
            _ = Glibc.close(fd)
            throw failure
        }
        return PosixLock(fd: fd)
    }
}

/// A held `flock`; closing the descriptor releases it.
final class PosixLock: StorageLock, @unchecked Sendable {
    // Guarded by being closed once: `release` is called by the owner, `deinit` only after it.
    private var fd: Int32

    init(fd: Int32) { self.fd = fd }

    func release() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    deinit { release() }
}

/// A POSIX file descriptor; every call that fails throws a ``JournalError`` naming the file.
final class PosixFile: StorageFile {
    let path: String
    private var fd: Int32

    init(path: String, fd: Int32) {
        self.path = path
        self.fd = fd
    }

    deinit { close() }

    func append(_ bytes: UnsafeRawBufferPointer) throws(JournalError) {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw PosixStorage.error("write failed on", path)
            }
            offset += n
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(JournalError) {
        var done = 0
        while done < bytes.count {
            let n = Glibc.pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw PosixStorage.error("pwrite failed on", path)
            }
            done += n
        }
    }

    func read(at offset: Int, count: Int) throws(JournalError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { Glibc.pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw PosixStorage.error("read failed on", path)
            }
            if n == 0 { break }
            done += n
        }
        if done < count { bytes.removeSubrange(done...) }
        return bytes
    }

    func size() throws(JournalError) -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw PosixStorage.error("fstat failed on", path) }
        return Int(st.st_size)
    }

    func truncate(to length: Int) throws(JournalError) {
        guard ftruncate(fd, off_t(length)) == 0 else { throw PosixStorage.error("cannot truncate", path) }
    }

    /// Zeros that ``preallocate(to:)`` writes from, a chunk at a time: never written to.
    private nonisolated(unsafe) static let zeros: UnsafeRawBufferPointer = {
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(bytes)
    }()

    /// Writes the zeros rather than `posix_fallocate`: space that `fallocate` allocates is left
    /// *unwritten* on ext4, and the fdatasync of a batch that lands in it must also record the
    /// conversion of those blocks to written, a metadata write as a new file length would be. Over
    /// zeros already written, the sync writes the batch's data and nothing else (BENCHMARKS.md, "Log
    /// segments written over zeros"). The zeros reach the disk with the next sync.
    func preallocate(to length: Int) throws(JournalError) -> Bool {
        var end = try size()
        while end < length {
            let n = Glibc.pwrite(fd, Self.zeros.baseAddress!, min(length - end, Self.zeros.count), off_t(end))
            if n < 0 {
                switch errno {
                case EINTR: continue
                // The disk or a quota is full, or the file may not grow that far (with SIGXFSZ
                // ignored): the file has grown partway, and grows with each write from here.
                case ENOSPC, EDQUOT, EFBIG: return false
                default: throw PosixStorage.error("cannot write zeros ahead in", path)
                }
            }
            guard n > 0 else { return false }
            end += n
        }
        return true
    }

    func dataSync() throws(JournalError) {
        guard fdatasync(fd) == 0 else { throw PosixStorage.error("fdatasync failed on", path) }
    }

    func sync() throws(JournalError) {
        guard fsync(fd) == 0 else { throw PosixStorage.error("fsync failed on", path) }
    }

    func close() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }
}
