#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MoQAEStore

/// An exclusive lock on a run directory, held from the trainer's first write until the process exits
/// (the kernel drops it when the process dies, however it dies). The lock file `.moqae-lock` holds the
/// holder's process id, so that a second trainer can name it.
public final class RunLock {
    public static let fileName = ".moqae-lock"
    private let fd: Int32

    public init(directory: String) throws(TrainingError) {
        let path = directory + "/" + RunLock.fileName
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw .file(FileError(path: path, operation: "open lock")) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let failure = errno
            var holder = [UInt8](repeating: 0, count: 32)
            let count = pread(fd, &holder, holder.count, 0)
            close(fd)
            guard failure == EWOULDBLOCK else { throw .file(FileError(path: path, operation: "lock", code: failure)) }
            let pid = String(decoding: holder.prefix(max(0, count)), as: UTF8.self).trimmingTrailingNewline
            throw .runDirectoryInUse(directory: directory, pid: pid.isEmpty ? nil : pid)
        }
        let text = Array("\(getpid())\n".utf8)
        guard ftruncate(fd, 0) == 0, pwrite(fd, text, text.count, 0) == text.count else {
            let failure = FileError(path: path, operation: "write")
            close(fd)
            throw .file(failure)
        }
        self.fd = fd
    }

    deinit { close(fd) }
}

private extension String {
    var trimmingTrailingNewline: String { hasSuffix("\n") ? String(dropLast()) : self }
}
