import NIOCore

/// Runs tasks on a SwiftNIO event loop. A connection's round task prefers its own loop, so the
/// shard actors it enters (default actors follow the task's preferred executor) and the resumption
/// after the log's fsync run on that loop's thread, instead of hopping through the global pool.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: EventLoop

    init(loop: EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedTaskExecutor()
        loop.execute { job.runSynchronously(on: executor) }
    }
}
