#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file-system failure, naming the path and the errno text, or a file that is not what a reader accepts.
public struct FileError: Error, CustomStringConvertible, Equatable {
    public let path: String
    public let operation: String
    public let code: Int32
    /// Set for a file refused before it is read (not a regular file, too large): replaces the errno text.
    public let refusal: String?

    public init(path: String, operation: String, code: Int32 = errno) {
        self.path = path
        self.operation = operation
        self.code = code
        self.refusal = nil
    }

    public init(path: String, refusal: String) {
        self.path = path
        self.operation = "open"
        self.code = EINVAL
        self.refusal = refusal
    }

    public var description: String {
        refusal.map { "\(path): \($0)" } ?? "\(path): \(operation) failed: \(String(cString: strerror(code)))"
    }
}

/// What a file of this mode is, for the refusal of a non-regular file.
private func fileKind(_ mode: mode_t) -> String {
    switch mode & S_IFMT {
    case S_IFDIR: "a directory"
    case S_IFIFO: "a FIFO"
    case S_IFCHR: "a character device"
    case S_IFBLK: "a block device"
    case S_IFSOCK: "a socket"
    case S_IFLNK: "a symbolic link"
    default: "not a regular file"
    }
}

/// A read-only memory mapping of a whole file. Pages are read on demand; `release` drops pages the
/// process no longer needs, so resident memory does not grow with the amount of data streamed.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let bytes: UnsafeRawBufferPointer
    /// The first byte of `bytes` (of a one-byte allocation for an empty file): offsets into the file add to it.
    public let start: UnsafeRawPointer
    /// The mapping; nil for an empty file.
    private let base: UnsafeMutableRawPointer?

    /// Maps a regular file. Opening never blocks (O_NONBLOCK: a FIFO without a writer is refused at once
    /// instead of waiting for one); anything but a regular file, or one larger than `limit` bytes, is refused
    /// before a byte is read.
    public init(path: String, limit: Int = .max) throws(FileError) {
        self.path = path
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw FileError(path: path, operation: "open") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw FileError(path: path, operation: "stat") }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw FileError(path: path, refusal: "is \(fileKind(info.st_mode)), expected a regular file")
        }
        let size = Int(info.st_size)
        guard size <= limit else {
            throw FileError(path: path, refusal: "is \(size) bytes, more than the \(limit) this file may hold")
        }
        if size == 0 {
            base = nil
            start = UnsafeRawPointer(UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 16))
            bytes = UnsafeRawBufferPointer(start: start, count: 0)
            return
        }
        let pointer = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let pointer, pointer != MAP_FAILED else { throw FileError(path: path, operation: "mmap") }
        base = pointer
        start = UnsafeRawPointer(pointer)
        bytes = UnsafeRawBufferPointer(start: pointer, count: size)
    }

    /// Tells the kernel the range will be read soon.
    public func willNeed(_ range: Range<Int>) { advise(range, MADV_WILLNEED) }

    /// Maps the range's pages into the process now (Linux: `MADV_POPULATE_READ`), so that the first
    /// reads of them do not fault and CPU prefetches of them are not dropped. Waits for pages that are
    /// not yet in the page cache; elsewhere a no-op.
    public func populate(_ range: Range<Int>) {
        #if os(Linux)
        advise(range, MADV_POPULATE_READ)
        #endif
    }

    /// Drops the pages around the range from this process; the page cache keeps them. The range is
    /// widened to 2 MiB boundaries because the kernel may map a file's large folios a huge page at a
    /// time: a small read can map far more than it touched.
    public func release(_ range: Range<Int>) { advise(range, MADV_DONTNEED, granularity: 2 << 20) }

    private func advise(_ range: Range<Int>, _ advice: Int32, granularity: Int = Int(sysconf(Int32(_SC_PAGESIZE)))) {
        guard let base, !range.isEmpty else { return }
        let start = range.lowerBound / granularity * granularity
        let end = min(bytes.count, (range.upperBound + granularity - 1) / granularity * granularity)
        _ = madvise(base + start, end - start, advice)
    }

    deinit {
        if let base { munmap(base, bytes.count) } else { UnsafeMutableRawPointer(mutating: start).deallocate() }
    }
}

/// The line a SIGBUS prints: a mapped file that shrank under the process (another program truncated it)
/// faults on the first page read past its new end. Stores check their shards' sizes before each block,
/// so the fault is the backstop for a truncation that lands between a check and a read.
nonisolated(unsafe) private var mappedFileFaultLine: UnsafeMutablePointer<CChar>?

/// Turns a SIGBUS into `error: <what> …` on stderr and exit status 1 instead of a crash.
public func reportMappedFileFaults(naming what: String) {
    let previous = mappedFileFaultLine
    mappedFileFaultLine = strdup("error: \(what): a memory-mapped file shrank while in use (read past its new end); the store was modified during the run\n")
    free(previous)
    signal(SIGBUS) { _ in
        if let line = mappedFileFaultLine { _ = write(2, line, strlen(line)) }
        _exit(1)
    }
}

/// Where `AtomicFile.write(to:_:)` sends a file's bytes.
public struct FileSink {
    fileprivate let fd: Int32
    fileprivate let path: String

    /// Writes all of `bytes`, retrying short writes.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(FileError) {
        guard let start = bytes.baseAddress else { return }   // nothing to write
        var written = 0
        while written < bytes.count {
            let result = Glibc.write(fd, start + written, bytes.count - written)
            if result < 0 {
                if errno == EINTR { continue }
                throw FileError(path: path, operation: "write")
            }
            written += result
        }
    }

    public func write(_ bytes: [UInt8]) throws(FileError) {
        var failure: FileError?
        bytes.withUnsafeBytes { buffer in
            do throws(FileError) { try write(buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}

public enum AtomicFile {
    /// Writes `bytes` to `path` so that a reader sees either the old file or the complete new one.
    public static func write(_ bytes: [UInt8], to path: String) throws(FileError) {
        try write(to: path) { (sink) throws(FileError) in try sink.write(bytes) }
    }

    /// Streams a file to `path` so that a reader sees either the old file or the complete new one:
    /// `produce` writes into a temporary file in the same directory, then fsync, rename over the
    /// target, fsync of the directory. On failure the temporary file is removed and the target is untouched.
    /// A target that exists and is not a regular file (a device node, a FIFO, a directory, a symbolic link) is
    /// refused: the rename would replace it.
    public static func write(to path: String, _ produce: (FileSink) throws(FileError) -> Void) throws(FileError) {
        var info = stat()
        if lstat(path, &info) == 0, (info.st_mode & S_IFMT) != S_IFREG {
            throw FileError(path: path, refusal: "is \(fileKind(info.st_mode)), expected a regular file or a new name")
        }
        let directory = parentDirectory(of: path)
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw FileError(path: path, operation: "create") }
        var failure: FileError?
        do { try produce(FileSink(fd: fd, path: path)) } catch { failure = error }
        if failure == nil, fsync(fd) != 0 { failure = FileError(path: path, operation: "fsync") }
        if close(fd) != 0, failure == nil { failure = FileError(path: path, operation: "close") }
        if failure == nil, let delay = testDelayBeforeRename { usleep(delay) }
        if failure == nil, rename(temporary, path) != 0 { failure = FileError(path: path, operation: "rename") }
        if let failure {
            unlink(temporary)
            throw failure
        }
        try syncDirectory(directory)
    }

    /// For crash tests only: `MOQAE_TEST_DELAY_BEFORE_RENAME_MS` holds every finished temporary file
    /// that long before it is renamed into place, widening the window in which a kill leaves one behind.
    private static let testDelayBeforeRename: useconds_t? = getenv("MOQAE_TEST_DELAY_BEFORE_RENAME_MS")
        .flatMap { useconds_t(String(cString: $0)) }.map { min($0, 60_000) * 1000 }

    /// Flushes a directory entry change (rename, unlink) to disk.
    public static func syncDirectory(_ directory: String) throws(FileError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw FileError(path: directory, operation: "open directory") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw FileError(path: directory, operation: "fsync directory") }
    }

    public static func parentDirectory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let parent = String(path[..<slash])
        return parent.isEmpty ? "/" : parent
    }
}

/// Reads a whole regular file of at most `limit` bytes into memory.
public func readFileBytes(_ path: String, limit: Int) throws(FileError) -> [UInt8] {
    let file = try MappedFile(path: path, limit: limit)
    return Array(file.bytes)
}

/// Caps on the size of files read whole, so that a damaged or hostile file cannot exhaust memory.
public enum FileSizeLimit {
    /// A YAML config.
    public static let config = 1 << 20
    /// A store's manifest.json (about 300 bytes per sequence: a million sequences fit).
    public static let manifest = 256 << 20
    /// A router export (a thousand routers of D = 512, M = 8 in binary32 fit).
    public static let export = 64 << 20
}

public func fileExists(_ path: String) -> Bool { access(path, F_OK) == 0 }

public func isRegularFile(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
}

public func isDirectory(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
}

/// Creates a directory and its parents (like `mkdir -p`).
public func makeDirectories(_ path: String) throws(FileError) {
    if isDirectory(path) { return }
    let parent = AtomicFile.parentDirectory(of: path)
    if parent != path, !parent.isEmpty, parent != "." { try makeDirectories(parent) }
    guard mkdir(path, 0o755) == 0 || errno == EEXIST else { throw FileError(path: path, operation: "mkdir") }
}

/// Names of the entries in a directory, sorted.
public func listDirectory(_ path: String) throws(FileError) -> [String] {
    guard let dir = opendir(path) else { throw FileError(path: path, operation: "open directory") }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}
