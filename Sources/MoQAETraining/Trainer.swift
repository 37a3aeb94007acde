import Foundation
import MoQAERouter
import MoQAEStore

/// Why training stopped before it could start or finish.
public enum TrainingError: Error, CustomStringConvertible {
    /// What the trainer writes in a run directory, for a name that is not a regular file.
    public enum RunFile: String, Sendable {
        case log
        case checkpoint
    }

    case config(ConfigError)
    case store(StoreError)
    case checkpoint(CheckpointError)
    case file(FileError)
    /// Another trainer holds the run directory's lock; `pid` as its lock file names it (nil: unnamed).
    case runDirectoryInUse(directory: String, pid: String?)
    /// `--resume latest` found checkpoints, but none that verifies.
    case noVerifiedCheckpoint(directory: String)
    /// A fresh run in a directory that holds a checkpoint or a log.
    case runAlreadyExists(directory: String)
    case runDirectoryIsAFile(path: String)
    /// A name the trainer writes (a log or a checkpoint) is something other than a regular file.
    case notARegularFile(path: String, role: RunFile)
    /// A model-shaping or data-order key differs from the checkpoint's.
    case incompatibleCheckpoint(key: String, checkpoint: ConfigValue, config: ConfigValue)
    /// The checkpoint's routers read another input than the store holds.
    case routerInputChanged(checkpoint: RouterInput, store: String, stored: RouterInput)
    /// The store's layout, experts, value group or head dimension differ from the checkpoint's.
    case storeShapeChanged(checkpoint: RoutingLayout, store: RoutingLayout)
    /// The checkpoint's position in its epoch lies beyond the calibration split.
    case positionBeyondSplit(position: Int, calibrationSequences: Int)
    /// A step's loss or gradient is not finite.
    case nonFiniteStep(step: Int, sequences: [UInt64], store: String)

    public var description: String {
        switch self {
        case let .config(error): "\(error)"
        case let .store(error): "\(error)"
        case let .checkpoint(error): "\(error)"
        case let .file(error): "\(error)"
        case let .runDirectoryInUse(directory, pid):
            "\(directory): another moqae-train (process \(pid ?? "?")) is using this run directory; wait for it to finish or stop it"
        case let .noVerifiedCheckpoint(directory): "\(directory): no checkpoint that verifies to resume from"
        case let .runAlreadyExists(directory):
            "\(directory) already holds a run; pass --resume latest to continue it, or set run_dir to a new directory"
        case let .runDirectoryIsAFile(path): "\(path): run_dir is a file, expected a directory (or a path to create)"
        case let .notARegularFile(path, role): "\(path): not a regular file, where moqae-train writes its \(role.rawValue)"
        case let .incompatibleCheckpoint(key, checkpoint, config):
            "cannot resume: \(key) is \(config.yaml) but the checkpoint was trained with \(checkpoint.yaml)"
        case let .routerInputChanged(checkpoint, store, stored):
            "cannot resume: the checkpoint's routers read router_input \(checkpoint.rawValue), the store \(store) holds \(stored.rawValue)"
        case let .storeShapeChanged(old, new):
            "cannot resume: store shape changed: the checkpoint has \(old.layers) layers × \(old.heads) heads × \(old.tokens) tokens × \(old.inputDim) dims, the store \(new.layers) × \(new.heads) × \(new.tokens) × \(new.inputDim)"
        case let .positionBeyondSplit(position, sequences):
            "cannot resume: the checkpoint is \(position) batches into an epoch, but the store's calibration split has only \(sequences) sequences"
        case let .nonFiniteStep(step, sequences, store): "step \(step): loss or gradient is not finite on sequences \(sequences) of \(store)"
        }
    }
}

/// Where to continue from.
public enum ResumeSource: Equatable, Sendable {
    /// The newest checkpoint of the run directory whose checksum holds.
    case latest
    case path(String)
}

public enum TrainingOutcome: Equatable, Sendable {
    case finished
    /// Stopped on request after a step; a checkpoint of that step was written.
    case interrupted
}

/// The training loop: batches of the calibration split in a seeded order, the paper's loss, AdamW,
/// per-step metrics, periodic validation reports and checkpoints.
public final class Trainer {
    public let config: TrainingConfig
    public let data: RoutedStore
    /// Streams batches and validation sequences through the routers.
    public let streamer: SequenceStreamer
    /// The state a checkpoint would hold now.
    public private(set) var state: Checkpoint
    private var random: RandomGenerator
    private var order: [Int]
    /// `router.target_bits`, when set: λ then follows the budget.
    private let budget: BitsBudget?
    private let progress: ProgressReporter
    private let metricsPath: String
    private let evalPath: String
    /// Held from the first write into the run directory until the trainer goes away.
    private let lock: RunLock?

    public var stepsPerEpoch: Int { (data.calibration.count + config.batchSize - 1) / config.batchSize }
    public var totalSteps: Int { min(config.maxSteps ?? Int.max, config.epochs * stepsPerEpoch) }

    /// Opens the store, checks the config against it, and either starts fresh or resumes.
    public init(config: TrainingConfig, configSource: String, resume: ResumeSource?, progress: ProgressReporter) throws(TrainingError) {
        self.config = config
        self.progress = progress
        let store: CalibrationStore
        do { store = try CalibrationStore(path: config.storePath) } catch { throw .store(error) }
        do { data = try RoutedStore(store: store, config: config, source: configSource) } catch { throw .config(error) }
        streamer = SequenceStreamer(data: data, workers: config.threads)
        let runDirectory = config.runDirectory
        metricsPath = runDirectory + "/metrics.jsonl"
        evalPath = runDirectory + "/eval.jsonl"
        // Everything the config and the run directory can be refused for is checked before anything is written.
        budget = config.targetBits.map { BitsBudget(targetBits: $0, rate: config.budgetRate) }
        if let budget {
            let reachable = BitsBudget.reachableBits(setup: data.setup)
            guard reachable.contains(budget.targetBits) else {
                throw .config(ConfigError(location: configSource, key: "router.target_bits",
                                          reason: .unreachableTargetBits(budget.targetBits, reachable: reachable, experts: config.expertNames,
                                                                         freezeFirstChunk: config.freezeFirstChunk)))
            }
        }
        try Trainer.checkRunDirectory(runDirectory)

        var resume = resume
        if resume == .latest, CheckpointDirectory(path: runDirectory).candidates().isEmpty, !fileExists(metricsPath) {
            progress.log("\(runDirectory) holds no checkpoint and no log yet: starting the run")
            resume = nil
        }
        if let resume {
            // Locked before the checkpoint is chosen, so that a second trainer says nothing but that it is refused.
            var held = isDirectory(runDirectory) ? try RunLock(directory: runDirectory) : nil
            let checkpoint: Checkpoint
            switch resume {
            case .latest:
                guard let found = CheckpointDirectory(path: runDirectory).latest() else {
                    throw .noVerifiedCheckpoint(directory: runDirectory)
                }
                if let summary = CheckpointDirectory.skippedSummary(found.skipped) { progress.log(summary) }
                progress.log("resuming from \(found.path) (step \(found.checkpoint.step))")
                checkpoint = found.checkpoint
            case let .path(path):
                do { checkpoint = try Checkpoint.load(path: path) } catch { throw .checkpoint(error) }
                progress.log("resuming from \(path) (step \(checkpoint.step))")
            }
            try Trainer.checkCompatible(checkpoint, with: config, data: data, progress: progress)
            state = checkpoint
            state.config = config
            state.optimizer.settings = config.optimizer
            do { try makeDirectories(runDirectory) } catch { throw .file(error) }
            if held == nil { held = try RunLock(directory: runDirectory) }
            lock = held
            try Trainer.removeInterruptedWrites(runDirectory, progress: progress)
            do {
                try Trainer.truncateLog(metricsPath, afterStep: checkpoint.step)
                try Trainer.truncateLog(evalPath, afterStep: checkpoint.step)
            } catch { throw .file(error) }
        } else {
            if !CheckpointDirectory(path: runDirectory).candidates().isEmpty || fileExists(metricsPath) {
                throw .runAlreadyExists(directory: runDirectory)
            }
            do { try makeDirectories(runDirectory) } catch { throw .file(error) }
            lock = try RunLock(directory: runDirectory)
            try Trainer.removeInterruptedWrites(runDirectory, progress: progress)
            var random = RandomGenerator(seed: config.seed)
            let layout = data.layout
            let parameters = RouterParameters.initialized(routers: layout.routers, inputDim: layout.inputDim,
                                                          experts: data.experts.count, hidden: data.setup.hiddenWidth, random: &random)
            state = Checkpoint(parameters: parameters,
                               optimizer: AdamW(settings: config.optimizer, parameterCount: parameters.values.count),
                               step: 0, epoch: 0, position: 0, epochRandom: random, lambda: config.lambda, config: config, setup: data.setup,
                               storeFingerprint: store.fingerprint)
        }
        random = state.epochRandom
        order = random.permutation(data.calibration.count)
    }

    private static func removeInterruptedWrites(_ directory: String, progress: ProgressReporter) throws(TrainingError) {
        do {
            for name in try CheckpointDirectory(path: directory).removeInterruptedWrites() {
                progress.log("removed \(name), left by a write that a crash interrupted")
            }
        } catch { throw .file(error) }
    }

    /// Refuses a run directory that is not a directory, or that holds something other than a regular file
    /// where the trainer writes one (a checkpoint or a log).
    static func checkRunDirectory(_ path: String) throws(TrainingError) {
        guard fileExists(path) else { return }
        guard isDirectory(path) else { throw .runDirectoryIsAFile(path: path) }
        let names: [String]
        do { names = try listDirectory(path) } catch { throw .file(error) }
        for name in names where name == "metrics.jsonl" || name == "eval.jsonl" || CheckpointDirectory.step(ofFileNamed: name) != nil {
            guard isRegularFile(path + "/" + name) else {
                throw .notARegularFile(path: path + "/" + name, role: name.hasSuffix(".jsonl") ? .log : .checkpoint)
            }
        }
    }

    private static func checkCompatible(_ checkpoint: Checkpoint, with config: TrainingConfig, data: RoutedStore,
                                        progress: ProgressReporter) throws(TrainingError) {
        for key in TrainingConfig.modelShapingKeys + TrainingConfig.dataOrderKeys where checkpoint.config.value(key) != config.value(key) {
            throw .incompatibleCheckpoint(key: key, checkpoint: checkpoint.config.value(key), config: config.value(key))
        }
        let (old, new) = (checkpoint.setup.layout, data.layout)
        guard checkpoint.setup.routerInput == data.setup.routerInput else {
            throw .routerInputChanged(checkpoint: checkpoint.setup.routerInput, store: data.store.path, stored: data.setup.routerInput)
        }
        guard old == new, checkpoint.setup.experts == data.experts, checkpoint.setup.valueGroup == data.setup.valueGroup,
              checkpoint.setup.headDim == data.setup.headDim else {
            throw .storeShapeChanged(checkpoint: old, store: new)
        }
        for key in config.changedKeys(from: checkpoint.config) {
            progress.log("resuming with changed \(key): \(checkpoint.config.value(key).yaml) -> \(config.value(key).yaml)")
        }
        guard checkpoint.position * config.batchSize < data.calibration.count else {
            throw .positionBeyondSplit(position: checkpoint.position, calibrationSequences: data.calibration.count)
        }
        if checkpoint.storeFingerprint != data.store.fingerprint {
            progress.log("warning: the store's content differs from the one the checkpoint trained on (fingerprint \(String(checkpoint.storeFingerprint, radix: 16)) -> \(String(data.store.fingerprint, radix: 16)))")
        }
    }

    /// Whether eval.jsonl holds a validation report of `step`, reading its tail only.
    private func hasValidationReport(atStep step: Int) throws(TrainingError) -> Bool {
        guard fileExists(evalPath) else { return false }
        do {
            return try Trainer.lastLine(of: evalPath) { $0 <= step }?.step == step
        } catch { throw .file(error) }
    }

    /// Bytes of a log's tail that resuming reads at most: far more than the lines one checkpoint interval writes.
    static let logTailLimit = 64 << 20

    /// The last line of a JSON-lines log whose "step" satisfies `accepts`, scanning from the end over at most
    /// `logTailLimit` bytes (lines without a step, such as a crash's partial last line, are passed over): its step
    /// and the offset just after it; nil when no line does.
    static func lastLine(of path: String, where accepts: (Int) -> Bool) throws(FileError) -> (step: Int, end: Int)? {
        let file = try MappedFile(path: path)
        return try withExtendedLifetime(file) { () throws(FileError) -> (step: Int, end: Int)? in
            let bytes = file.bytes
            var end = bytes.count                                               // the end of a line, before its newline
            while end > 0, bytes[end - 1] == UInt8(ascii: "\n") { end -= 1 }
            while end > 0 {
                guard bytes.count - end <= logTailLimit else {
                    throw FileError(path: path, refusal: "no line of an earlier step in its last \(logTailLimit >> 20) MiB; not this run's log?")
                }
                var start = end - 1
                while start > 0, bytes[start - 1] != UInt8(ascii: "\n") { start -= 1 }
                if let lineStep = (try? JSON.parse(Array(bytes[start..<end])))?["step"]?.intValue, accepts(lineStep) {
                    return (lineStep, end)
                }
                end = start
                while end > 0, bytes[end - 1] == UInt8(ascii: "\n") { end -= 1 }
            }
            return nil
        }
    }

    /// Keeps the lines of a JSON-lines log up to its last one whose "step" is at most `step` (drops what a crash
    /// left behind after it), reading and cutting only the tail.
    static func truncateLog(_ path: String, afterStep step: Int) throws(FileError) {
        guard fileExists(path) else { return }
        let keep = (try lastLine(of: path) { $0 <= step })?.end ?? 0        // just before the kept line's newline
        guard truncate(path, off_t(keep)) == 0 else { throw FileError(path: path, operation: "truncate") }
        if keep > 0 { try appendLine("", to: path) }                          // its newline again
    }

    /// Writes the current state as a checkpoint and prunes old ones.
    @discardableResult
    public func writeCheckpoint() throws(TrainingError) -> String {
        let path = config.runDirectory + "/" + Checkpoint.fileName(step: state.step)
        do {
            try state.write(to: path)
            let skipped = try CheckpointDirectory(path: config.runDirectory).prune(keep: config.keepLast)
            if let summary = CheckpointDirectory.skippedSummary(skipped) { progress.log(summary + " (left in place, not counted among those kept)") }
        } catch { throw .file(error) }
        return path
    }

    /// Runs until `totalSteps` or until `shouldStop` answers true after a step.
    public func run(shouldStop: () -> Bool = { false }) throws(TrainingError) -> TrainingOutcome {
        let layout = data.layout
        guard state.step < totalSteps else {
            if try hasValidationReport(atStep: state.step) {
                progress.log("the run is already at step \(state.step) of \(totalSteps): nothing to train (moqae-train eval shows its report)")
            } else {
                progress.log("the run is at step \(state.step) of \(totalSteps) but its final validation report is missing: writing it")
                try evaluate()
            }
            return .finished
        }
        // Step 0 is checkpointed before any step, so that a run stopped before its first periodic
        // checkpoint can always be resumed.
        var lastCheckpointStep = -1
        if state.step == 0 {
            try writeCheckpoint()
            lastCheckpointStep = 0
        }
        progress.begin(total: totalSteps, done: state.step)
        progress.log("training \(layout.routers) router(s) on \(data.calibration.count) calibration sequences (\(stepsPerEpoch) steps per epoch), validating on \(data.validation.count); \(state.parameters.values.count) parameters")
        while state.step < totalSteps {
            try step()
            if config.evalEvery > 0, state.step % config.evalEvery == 0, state.step < totalSteps { try evaluate() }
            if state.step % config.checkpointEvery == 0 {
                try writeCheckpoint()
                lastCheckpointStep = state.step
            }
            if shouldStop() {
                if lastCheckpointStep != state.step { try writeCheckpoint() }
                progress.finish()
                progress.log("interrupted: checkpoint of step \(state.step) written to \(config.runDirectory)")
                return .interrupted
            }
        }
        progress.finish()
        try evaluate()
        if lastCheckpointStep != state.step { progress.log("final checkpoint: \(try writeCheckpoint())") }
        return .finished
    }

    private func step() throws(TrainingError) {
        let started = Date()
        let epoch = state.epoch
        let B = config.batchSize, n = data.calibration.count
        let batchIndices = order[(state.position * B)..<min(n, (state.position + 1) * B)]
        let sequences = batchIndices.map { data.calibration[$0] }
        let upcoming = order[min(n, (state.position + 1) * B)..<min(n, (state.position + 2) * B)].map { data.calibration[$0] }
        if let budget, state.step == 0 {
            state.lambda = budget.startingLambda(sensitivities: sequences.map(data.sensitivity), setup: data.setup)
            progress.log(String(format: "bits budget %.3f: λ starts at %.4g, where the first batch's best per-unit allocation meets it", budget.targetBits, state.lambda))
        }
        let loss = LossSettings(kind: config.lossKind, lambda: state.lambda)
        let (gradient, figures, _): ([Float], BatchFigures, [[[Int]]])
        do { (gradient, figures, _) = try streamer.batchGradient(sequences, upcoming: upcoming, parameters: state.parameters, loss: loss) } catch { throw .store(error) }
        let gradientNorm = gradient.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        guard figures.loss.isFinite, gradientNorm.isFinite else {
            throw .nonFiniteStep(step: state.step + 1, sequences: sequences.map(\.id), store: data.store.path)
        }
        var optimizer = state.optimizer
        optimizer.update(&state.parameters.values, gradient: gradient)
        state.optimizer = optimizer
        if let budget { state.lambda = budget.nextLambda(after: loss.lambda, bits: figures.payloadBits) }
        state.step += 1
        state.position += 1
        if state.position == stepsPerEpoch {
            state.epoch += 1
            state.position = 0
            state.epochRandom = random
            order = random.permutation(n)
        }
        let seconds = Date().timeIntervalSince(started)
        let vectors = Double(sequences.count * data.layout.unitsPerSequence * data.layout.chunkSize)
        let totalDecisions = Double(max(1, figures.decisionCounts.reduce(0, +)))
        let line = JSON.object([
            ("step", .int(state.step)), ("epoch", .int(epoch)),
            ("sequence_ids", .array(sequences.map { .int($0.id) })),
            ("loss", .double(figures.loss)), ("l_model", .double(figures.modelTerm)), ("l_mem", .double(figures.memoryTerm)),
            ("mean_l_nll", .double(figures.meanEstimatedNLL)), ("avg_bits", .double(figures.payloadBits)),
            ("expert_fractions", .object(zip(data.experts, figures.decisionCounts).map { ($0.name, .double(Double($1) / totalDecisions)) })),
            ("lambda", .double(loss.lambda)), ("lr", .double(config.optimizer.learningRate)), ("grad_norm", .double(gradientNorm)),
            ("step_seconds", .double(seconds)), ("vectors_per_second", .double(vectors / max(seconds, 1e-9))),
        ])
        do { try appendLine(line.serialized, to: metricsPath) } catch { throw .file(error) }
        progress.update(done: state.step, status: String(format: "loss %.5f bits %.2f %.0f vec/s", figures.loss, figures.payloadBits, vectors / max(seconds, 1e-9)))
    }

    /// Prints the validation report and appends it to `eval.jsonl`.
    public func evaluate() throws(TrainingError) {
        let found: ValidationReport?
        do { found = try validationReport(streamer: streamer, parameters: state.parameters) } catch { throw .store(error) }
        guard let report = found else {
            progress.log("no validation sequences (data.validation_fraction selects none): no validation report")
            return
        }
        var text = "step \(state.step) " + report.text
        var budgetFields: [(String, JSON)] = []
        if let budget {
            let bits = report.router.memory.payloadBits
            text += String(format: "\n  bits budget: target %.3f payload bits, validation %.3f (%+.3f); λ now %.4g", budget.targetBits, bits,
                           bits - budget.targetBits, state.lambda)
            budgetFields = [("target_bits", .double(budget.targetBits)), ("lambda", .double(state.lambda))]
        }
        progress.report(text)
        guard case let .object(fields) = report.json else { return }
        do { try appendLine(JSON.object([("step", .int(state.step))] + budgetFields + fields).serialized, to: evalPath) } catch { throw .file(error) }
    }
}

/// Appends one line to a file, creating it if needed.
func appendLine(_ line: String, to path: String) throws(FileError) {
    guard let file = fopen(path, "a") else { throw FileError(path: path, operation: "open for append") }
    defer { fclose(file) }
    guard fputs(line + "\n", file) >= 0, fflush(file) == 0 else { throw FileError(path: path, operation: "write") }
}
