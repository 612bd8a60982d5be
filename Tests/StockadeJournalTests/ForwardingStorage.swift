@testable import StockadeJournal

/// A test's ``Storage`` that changes one or two operations and forwards the rest to `base`.
protocol ForwardingStorage: Storage {
    var base: any Storage { get }
}

extension ForwardingStorage {
    func open(_ path: String, _ access: FileAccess) throws(JournalError) -> any StorageFile { try base.open(path, access) }
    func readAll(_ path: String) throws(JournalError) -> [UInt8] { try base.readAll(path) }
    func exists(_ path: String) -> Bool { base.exists(path) }
    func list(_ directory: String) throws(JournalError) -> [String] { try base.list(directory) }
    func makeDirectory(_ path: String) throws(JournalError) { try base.makeDirectory(path) }
    func remove(_ path: String) throws(JournalError) { try base.remove(path) }
    func rename(_ from: String, to: String) throws(JournalError) { try base.rename(from, to: to) }
    func syncDirectory(_ path: String) throws(JournalError) { try base.syncDirectory(path) }
    func lock(_ lockPath: String) throws(JournalError) -> any StorageLock { try base.lock(lockPath) }
}
