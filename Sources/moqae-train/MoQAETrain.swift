import ArgumentParser
import Foundation
import MoQAERouter
import MoQAEStore
import MoQAETraining
import Synchronization

@main
struct MoQAETrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moqae-train",
        abstract: "Train MoQAE routers that pick a KV-cache bit-width for every chunk of tokens.",
        version: projectVersion,
        subcommands: [Train.self, Export.self, Evaluate.self, Inspect.self, Synth.self],
        defaultSubcommand: Train.self)

    /// Parses and runs the command. A usage error (unknown option, missing or malformed value) is one
    /// `error:` line on stderr with exit status 64; errors in data and config are one line with status 1
    /// (`reportingErrors`); `--help` prints the usage and exits 0.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let exit as ExitCode {
            Self.exit(withError: exit)
        } catch {
            guard exitCode(for: error) != .success else { Self.exit(withError: error) }   // --help
            let message = message(for: error).split(separator: "\n").first.map(String.init) ?? "invalid arguments"
            FileHandle.standardError.write(Data("error: \(message) (moqae-train --help for usage)\n".utf8))
            Self.exit(withError: ExitCode.validationFailure)
        }
    }
}

/// Runs `body`, turning any error into one line on stderr and exit status 1. A write past the
/// file-size limit (`ulimit -f`) fails with an error instead of killing the process (SIGXFSZ ignored).
func reportingErrors(_ body: () throws -> Void) throws {
    signal(SIGXFSZ, SIG_IGN)
    do {
        try body()
    } catch let exit as ExitCode {
        throw exit
    } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        throw ExitCode.failure
    }
}

/// `--config` and `--set`, shared by `train` and `eval`.
struct ConfigOptions: ParsableArguments {
    @Option(help: "YAML config file (eval: for an export; a checkpoint brings its own).")
    var config: String = "configs/default.yaml"

    @Option(name: .customLong("set"), help: ArgumentHelp("Override a config key, e.g. --set train.lr=1e-4 (repeatable).", valueName: "KEY=VALUE"))
    var overrides: [String] = []
}

/// The weight type of an export, as `--dtype` names it.
enum ExportDType: String, CaseIterable, ExpressibleByArgument {
    case f16, f32

    var weightType: RouterExport.WeightType { self == .f16 ? .binary16 : .binary32 }
}

/// The input dtype of a synthetic store, as `--dtype` names it.
enum InputDType: String, CaseIterable, ExpressibleByArgument {
    case f16, bf16, f32

    var dtype: DType {
        switch self {
        case .f16: return .f16
        case .bf16: return .bf16
        case .f32: return .f32
        }
    }
}

// MARK: - train

/// Set by SIGINT or SIGTERM (to the signal's number): the loop finishes its step, writes a checkpoint
/// and exits 128 + the signal (130, 143).
let interruptSignal = Atomic<Int32>(0)

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Train routers on a calibration store (the default command).")

    @OptionGroup var options: ConfigOptions

    @Option(help: ArgumentHelp("Continue a run: 'latest' (newest checkpoint of run_dir that verifies) or a checkpoint file.", valueName: "latest|PATH"))
    var resume: String?

    // .unconditional: a negative value ("-1") is this option's value, refused by validate(), not a missing one.
    @Option(parsing: .unconditional,
            help: "Stop after this many steps in all (same as --set train.max_steps=N); 0 writes the initial checkpoint and exits.")
    var maxSteps: Int?

    func validate() throws {
        if let maxSteps, maxSteps < 0 || maxSteps > Int(Int32.max) {
            throw ValidationError("--max-steps must be in 0...\(Int32.max), got \(maxSteps)")
        }
    }

    func run() throws {
        try reportingErrors {
            let overrides = options.overrides + (maxSteps.map { ["train.max_steps=\($0)"] } ?? [])
            let config = try TrainingConfig.load(file: options.config, overrides: overrides)
            reportMappedFileFaults(naming: config.storePath)
            let progress = ProgressReporter()
            progress.report("effective config (\(options.config)\(overrides.isEmpty ? "" : " with --set")):\n"
                            + config.yaml.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
            let trainer = try Trainer(config: config, configSource: options.config,
                                      resume: resume.map { $0 == "latest" ? .latest : .path($0) }, progress: progress)
            if config.maxSteps == 0 {
                progress.log("initial checkpoint (step \(trainer.state.step)): \(try trainer.writeCheckpoint())")
                return
            }
            var stopSignals = sigset_t()
            sigemptyset(&stopSignals)
            for stop in [SIGINT, SIGTERM] {
                sigaddset(&stopSignals, stop)
                signal(stop) { received in           // a second signal of the same kind stops at once
                    interruptSignal.store(received, ordering: .relaxed)
                    signal(received, SIG_DFL)
                }
            }
            sigprocmask(SIG_UNBLOCK, &stopSignals, nil)   // a parent may have left them blocked
            let outcome = try trainer.run { interruptSignal.load(ordering: .relaxed) != 0 }
            if outcome == .interrupted { throw ExitCode(128 + interruptSignal.load(ordering: .relaxed)) }
        }
    }
}

// MARK: - export

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write a checkpoint's routers as an MQAE export (about 1.6 KB per router).")

    @Argument(help: "A checkpoint file, or a run directory (its newest checkpoint that verifies).")
    var checkpoint: String

    @Option(help: "Output file (default router.bin).")
    var out: String?

    @Option(help: ArgumentHelp("A model directory to write the export into, as moqae-router.bin (checked against its config.json); "
                               + "MoQAECache.from_pretrained finds it there.", valueName: "MODEL_DIR"))
    var into: String?

    @Option(help: "Weight type: f16 (binary16) or f32 (binary32).")
    var dtype: ExportDType = .f16

    func validate() throws {
        if out != nil && into != nil { throw ValidationError("--out and --into name the output twice; give one") }
    }

    func run() throws {
        try reportingErrors {
            let model = try into.map { path throws(ModelDirectoryError) in try ModelDirectory(path: path) }
            let (checkpoint, path) = try loadCheckpoint(self.checkpoint)
            try model?.check(checkpoint.setup)
            let out = model?.routerPath ?? self.out ?? "router.bin"
            // Replace an export, never another file (a checkpoint of the run, say).
            if let existing = try? MappedFile(path: out), existing.bytes.count > 0, !existing.bytes.starts(with: RouterExport.magic) {
                throw FileError(path: out, refusal: "exists and is not an MQAE export (a checkpoint, or another file); export replaces only an export")
            }
            let export = RouterExport(parameters: checkpoint.parameters, setup: checkpoint.setup,
                                      weightType: dtype.weightType)
            let bytes = export.serialized()
            try AtomicFile.write(bytes, to: out)
            print("wrote \(out): \(bytes.count) bytes, \(checkpoint.parameters.routers) router(s), step \(checkpoint.step) of \(path)")
        }
    }
}

/// A checkpoint file, or the newest verifying checkpoint of a run directory.
func loadCheckpoint(_ path: String) throws -> (Checkpoint, String) {
    guard isDirectory(path) else { return (try Checkpoint.load(path: path), path) }
    let directory = CheckpointDirectory(path: path)
    guard let found = directory.latest() else { throw CheckpointError(path: path, reason: .noVerifiedCheckpoint) }
    if let summary = CheckpointDirectory.skippedSummary(found.skipped) { FileHandle.standardError.write(Data((summary + "\n").utf8)) }
    return (found.checkpoint, found.path)
}

// MARK: - eval

struct Evaluate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Print the validation report for a checkpoint or an export.",
        discussion: "A checkpoint is evaluated with its stored config; an export with --config. --set overrides either (e.g. store=DIR).")

    @Argument(help: "A checkpoint, a run directory, or an MQAE export.")
    var file: String

    @OptionGroup var options: ConfigOptions

    @Flag(help: "Print the report as JSON.")
    var json = false

    func run() throws {
        try reportingErrors {
            let parameters: RouterParameters
            var config: TrainingConfig
            let source: String
            var export: RouterExport?
            // Sniff the magic through a mapping: a checkpoint is read once, by Checkpoint.load.
            if !isDirectory(file), let mapped = try? MappedFile(path: file),
               withExtendedLifetime(mapped, { mapped.bytes.starts(with: RouterExport.magic) }) {
                let parsed = try RouterExport.parse(try readFileBytes(file, limit: FileSizeLimit.export), path: file)
                config = try TrainingConfig.load(file: options.config, overrides: options.overrides)
                parameters = parsed.parameters
                source = options.config
                export = parsed
            } else {
                let (checkpoint, path) = try loadCheckpoint(file)
                config = checkpoint.config
                for override in options.overrides { try config.apply(override: override) }
                parameters = checkpoint.parameters
                source = "\(path) (stored config)"
            }
            reportMappedFileFaults(naming: config.storePath)
            let report = try evaluationReport(parameters: parameters, config: config, source: source,
                                              export: export.map { ($0, file) })
            print(json ? report.json.serialized : report.text)
        }
    }
}

// MARK: - inspect

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Summarise and verify a store, a checkpoint or an export; exits non-zero on a damaged file.")

    @Argument(help: "A store directory, a checkpoint, an MQAE export, or a safetensors file.")
    var file: String

    @Flag(help: "For a store: skip reading every input value (structure and delta_nll are still checked).")
    var quick = false

    func run() throws {
        try reportingErrors {
            if isDirectory(file) {
                try inspectStore()
                return
            }
            let mapped = try MappedFile(path: file)
            try withExtendedLifetime(mapped) { try inspectFile(mapped.bytes) }
        }
    }

    /// A checkpoint, an export or a safetensors file, mapped.
    private func inspectFile(_ bytes: UnsafeRawBufferPointer) throws {
        if bytes.starts(with: RouterExport.magic) {
            let export = try RouterExport.parse(try readFileBytes(file, limit: FileSizeLimit.export), path: file)
            let experts = export.expertBits.map { "k\($0.keyBits)v\($0.valueBits)" }.joined(separator: ", ")
            print("""
            \(file): MQAE router export version \(export.version), OK (CRC-32 verified)
              \(bytes.count) bytes, weights \(export.weightType == .binary16 ? "binary16" : "binary32")
              \(export.parameters.routers) router(s), D = \(export.parameters.inputDim) (router input \(export.routerInput.rawValue)), experts: \(experts)
              \(export.layers) layers, \(export.heads) KV heads, chunk \(export.chunkSize), group \(export.groupSize), first chunk \(export.freezeFirstChunk ? "frozen" : "routed"), pooling \(export.pooling.rawValue), hidden width \(export.parameters.hidden)\(export.version == 3 ? String(format: ", bits price %+.6f nats/bit", export.bitsPrice) : "")
            """)
            return
        }
        let parsed = Result { () throws(SafeTensorsError) in try SafeTensorsHeader(file: bytes) }
        let header: SafeTensorsHeader
        switch parsed {
        case let .success(parsedHeader): header = parsedHeader
        case let .failure(error): throw StoreError.shard(path: file, error)
        }
        if header.metadata["format"] == Checkpoint.format {
            let checkpoint = try Checkpoint.load(path: file)
            let layout = checkpoint.setup.layout
            print("""
            \(file): moqae checkpoint, OK (checksum verified)
              step \(checkpoint.step), epoch \(checkpoint.epoch), batch \(checkpoint.position) of the epoch, AdamW step \(checkpoint.optimizer.step)
              \(layout.routers) router(s) × \(checkpoint.parameters.values.count / max(1, layout.routers)) parameters; experts \(checkpoint.setup.experts.map(\.name).joined(separator: ", "))
              store: \(checkpoint.config.storePath) (fingerprint \(String(checkpoint.storeFingerprint, radix: 16))), \(layout.layers) layers × \(layout.heads) heads × \(layout.tokens) tokens × \(layout.inputDim) dims (router input \(checkpoint.setup.routerInput.rawValue))
            """)
        } else {
            print("\(file): safetensors, OK: \(header.tensors.count) tensors, \(bytes.count) bytes")
            for tensor in header.tensors.prefix(20) { print("  \(tensor.name) \(tensor.dtype.rawValue) \(tensor.shape)") }
        }
    }

    private func inspectStore() throws {
        reportMappedFileFaults(naming: file)
        let store = try CalibrationStore(path: file)
        let manifest = store.manifest
        if !quick {
            for sequence in store.sequences { try store.checkInputsFinite(sequence) }
        }
        let shards = Set(manifest.sequences.map(\.shard)).count
        print("""
        \(file): moqae-calibration store version \(manifest.version), OK (\(quick ? "structure and delta_nll verified" : "every tensor verified"))
          model \(manifest.model.name): \(manifest.model.numLayers) layers, \(manifest.model.numKVHeads) KV heads, head_dim \(manifest.model.headDim)
          \(store.sequences.count) sequences of \(manifest.seqLen) tokens in \(shards) shard(s), router input \(manifest.routerInput.rawValue) (\(manifest.inputWidth) dims, \(store.sequences.first.map { $0.inputs.dtype.rawValue } ?? "?"))
          chunk \(manifest.chunkSize), value_group \(manifest.valueGroup), sensitivity \(manifest.sensitivity), experts \(manifest.experts.map(\.description).joined(separator: ", "))
          selection: seed \(manifest.selectionSeed), fraction \(manifest.selectionFraction) of \(manifest.numSequences) corpus sequences
          delta_nll measured around \(manifest.background.map { "a background: layers at \($0.experts.map { manifest.experts[$0].name }.joined(separator: ",")), chunks before \($0.frozenChunks) at 16 bits" } ?? "fp16")
          fingerprint \(String(store.fingerprint, radix: 16))
        """)
        if manifest.holdsPartialLayers {
            let partial = manifest.firstHeldChunks.enumerated().filter { $0.element > 0 }.map { "layer \($0.offset) from chunk \($0.element)" }
            print("  sliding layers' caches hold only their last chunks: \(partial.joined(separator: ", ")); the other layers hold every chunk")
        }
    }
}

// MARK: - synth

struct Synth: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a synthetic store in a real model's shape (random inputs; for tests and benchmarks only).")

    @Option(help: "A real model's shape.")
    var shape: SyntheticStore.Shape = SyntheticStore.shapes[0]

    @Option(parsing: .unconditional, help: "Number of sequences.")
    var sequences: Int = 64

    @Option(help: "Output store directory (must not exist).")
    var out: String

    @Option(help: "Selection seed of the store.")
    var seed: UInt64 = 0

    @Option(help: "Input dtype.")
    var dtype: InputDType = .f16

    @Option(help: "Router input the store claims (key+value is twice the head dim wide).")
    var routerInput: RouterInput = .key

    func validate() throws {
        guard sequences >= 1 else { throw ValidationError("--sequences must be at least 1, got \(sequences)") }
    }

    func run() throws {
        try reportingErrors {
            guard !fileExists(out) else { throw ValidationError("\(out) already exists; synth writes a new store") }
            let progress = ProgressReporter()
            progress.begin(total: sequences, done: 0, unit: "sequence")
            try SyntheticStore.write(shape: shape, sequences: sequences, to: out, seed: seed,
                                     inputDType: dtype.dtype, routerInput: routerInput) {
                progress.update(done: $0, status: "")
            }
            progress.finish()
            print("wrote synthetic store \(out): \(sequences) sequences of shape \(shape.name)")
        }
    }
}

extension RouterInput: ExpressibleByArgument {}

extension SyntheticStore.Shape: ExpressibleByArgument {
    public init?(argument: String) {
        guard let shape = SyntheticStore.shapes.first(where: { $0.name == argument }) else { return nil }
        self = shape
    }

    public static var allValueStrings: [String] { SyntheticStore.shapes.map(\.name) }
    public var defaultValueDescription: String { name }
}
