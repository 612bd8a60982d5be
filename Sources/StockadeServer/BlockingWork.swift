import NIOPosix

/// A task executor on a few dedicated threads (a ``NIOThreadPool``) for work that must stay off the
/// event loops: snapshots (they rebuild the state from the log and write a file) and EVENTS log
/// reads. A task hops here with `withTaskExecutorPreference` and hops back to its loop when the
/// closure returns, so the loop only ever waits for the result, never for the disk.
final class BlockingWorkExecutor: TaskExecutor {
    /// Snapshots run one at a time, so one thread is theirs at most; the others serve EVENTS reads,
    /// which are short. Four threads keep a slow snapshot from delaying EVENTS readers.
    static let threadCount = 4

    private let pool: NIOThreadPool

    init(threads: Int) {
        pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedTaskExecutor()
        pool.submit { _ in job.runSynchronously(on: executor) }
    }

    /// Stops the threads once the work already submitted has run.
    func shutdown() async throws { try await pool.shutdownGracefully() }
}
