import ArgumentParser
import Foundation

/// `stockade sink ARGS`: runs the `stockade-sink` executable beside this one with the same
/// arguments (a git-style subcommand). The sink is its own product so the server never links
/// PostgresNIO; `make test` builds both, `make run` only the server.
struct SinkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sink",
        abstract: "Follow EVENTS into PostgreSQL, exactly once (runs stockade-sink; see stockade sink --help).",
        // Every argument, --help included, is the sink's.
        helpNames: [])

    @Argument(parsing: .captureForPassthrough, help: "Arguments for stockade-sink.")
    var arguments: [String] = []

    func run() throws {
        let path = Self.siblingPath()
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw CommandError("""
                stockade sink runs \(path), which is not there: build it with `swift build --product stockade-sink` \
                (or `swift build -c release --product stockade-sink` for a release build), next to this stockade
                """)
        }
        let argv = [path] + arguments
        var cArguments = argv.map { strdup($0) }
        cArguments.append(nil)
        execv(path, cArguments)
        throw CommandError("cannot run \(path): \(String(cString: strerror(errno)))")
    }

    /// `stockade-sink` in the directory of this executable (resolved through /proc/self/exe, so a
    /// symlink to stockade still finds its sibling).
    static func siblingPath() -> String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("stockade-sink").path
    }
}
