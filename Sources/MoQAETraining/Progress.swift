import Foundation

/// Progress on stderr: a bar redrawn in place on a terminal, plain periodic lines otherwise.
/// Reports and logs go through it so they never collide with the bar.
public final class ProgressReporter {
    /// Steps in all; set when the work is known.
    public var total: Int
    private let interactive: Bool
    private var start = Date()
    private var lastPlainLine = Date.distantPast
    private var lastDraw = Date.distantPast
    private var barVisible = false

    public init(total: Int = 0, interactive: Bool = isatty(STDERR_FILENO) == 1) {
        self.total = total
        self.interactive = interactive
    }

    /// Starts timing `total` units of work, of which `done` are already done.
    public func begin(total: Int, done: Int, unit: String = "step") {
        self.total = total
        self.unit = unit
        self.start = Date()
        self.startDone = done
    }

    private var startDone = 0
    private var unit = "step"

    /// Shows `done` of `total` steps with a short status.
    public func update(done: Int, status: String) {
        let elapsed = Date().timeIntervalSince(start)
        let total = max(1, self.total)
        let remaining = done > startDone ? elapsed / Double(done - startDone) * Double(total - done) : 0
        if interactive {
            guard done == total || Date().timeIntervalSince(lastDraw) >= 0.1 else { return }
            lastDraw = Date()
            let width = 30
            let filled = width * done / total
            let bar = String(repeating: "=", count: filled) + (filled < width ? ">" : "") + String(repeating: " ", count: max(0, width - filled - 1))
            FileHandle.standardError.write(Data("\r\u{1B}[2K[\(bar)] \(done)/\(total) \(status) ETA \(formatDuration(remaining))".utf8))
            barVisible = true
        } else if done == total || done == startDone + 1 || Date().timeIntervalSince(lastPlainLine) >= 10 {
            lastPlainLine = Date()
            FileHandle.standardError.write(Data("\(unit) \(done)/\(total) \(status) elapsed \(formatDuration(elapsed)) ETA \(formatDuration(remaining))\n".utf8))
        }
    }

    /// A line to stderr.
    public func log(_ message: String) { write(message, to: FileHandle.standardError) }

    /// A report to stdout.
    public func report(_ message: String) { write(message, to: FileHandle.standardOutput) }

    private func write(_ message: String, to handle: FileHandle) {
        if barVisible {
            FileHandle.standardError.write(Data("\r\u{1B}[2K".utf8))
            barVisible = false
        }
        handle.write(Data((message + "\n").utf8))
    }

    public func finish() {
        if barVisible {
            FileHandle.standardError.write(Data("\n".utf8))
            barVisible = false
        }
    }
}

func formatDuration(_ seconds: Double) -> String {
    let s = Int(seconds.rounded())
    return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%02d:%02d", s / 60, s % 60)
}
