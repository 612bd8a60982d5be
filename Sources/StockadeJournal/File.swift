#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A thin owner of a POSIX file descriptor: every call that fails throws a ``JournalError`` naming
/// the file and the system's reason.
final class File: @unchecked Sendable {
    let path: String
    private(set) var fd: Int32

    private init(path: String, fd: Int32) {
        self.path = path
        self.fd = fd
    }

    deinit { if fd >= 0 { _ = Glibc.close(fd) } }

    static func error(_ what: String, _ path: String) -> JournalError {
        JournalError(.io, "\(what) \(path): \(String(cString: strerror(errno)))")
    }

    /// Opens for appending, creating (and truncating) when asked.
    static func open(_ path: String, create: Bool, truncate: Bool = false) throws(JournalError) -> File {
        var flags = O_RDWR | O_CLOEXEC
        if create { flags |= O_CREAT }
        if truncate { flags |= O_TRUNC }
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw error("cannot open", path) }
        return File(path: path, fd: fd)
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws(JournalError) {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw Self.error("write failed on", path)
            }
            offset += n
        }
    }

    func write(_ bytes: [UInt8]) throws(JournalError) {
        try typed { try bytes.withUnsafeBytes { try write($0) } }
    }

    func pwrite(_ bytes: [UInt8], at offset: Int) throws(JournalError) {
        let n = bytes.withUnsafeBytes { Glibc.pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        guard n == bytes.count else { throw Self.error("pwrite failed on", path) }
    }

    func dataSync() throws(JournalError) {
        guard fdatasync(fd) == 0 else { throw Self.error("fdatasync failed on", path) }
    }

    func sync() throws(JournalError) {
        guard fsync(fd) == 0 else { throw Self.error("fsync failed on", path) }
    }

    func close() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    // MARK: Whole-file and directory helpers

    static func readAll(_ path: String) throws(JournalError) -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw error("cannot open", path) }
        defer { _ = Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw error("fstat failed on", path) }
        let size = Int(st.st_size)
        var bytes = [UInt8](repeating: 0, count: size)
        var offset = 0
        while offset < size {
            let n = bytes.withUnsafeMutableBytes { Glibc.pread(fd, $0.baseAddress! + offset, size - offset, off_t(offset)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw error("read failed on", path) }
            offset += n
        }
        return bytes
    }

    static func truncate(_ path: String, to length: Int) throws(JournalError) {
        guard Glibc.truncate(path, off_t(length)) == 0 else { throw error("cannot truncate", path) }
    }

    static func remove(_ path: String) throws(JournalError) {
        guard unlink(path) == 0 || errno == ENOENT else { throw error("cannot remove", path) }
    }

    static func rename(_ from: String, _ to: String) throws(JournalError) {
        guard Glibc.rename(from, to) == 0 else { throw error("cannot rename \(from) to", to) }
    }

    /// fsync of a directory, so that a created, renamed or removed entry survives a crash.
    static func syncDirectory(_ path: String) throws(JournalError) {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw error("cannot open directory", path) }
        defer { _ = Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw error("fsync failed on directory", path) }
    }

    static func makeDirectory(_ path: String) throws(JournalError) {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw error("cannot create directory", path) }
    }

    static func list(_ directory: String) throws(JournalError) -> [String] {
        guard let dir = opendir(directory) else { throw error("cannot list", directory) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }
}
