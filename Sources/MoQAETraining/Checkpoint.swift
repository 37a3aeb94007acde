import Foundation
import MoQAEExperts
import MoQAERouter
import MoQAEStore

/// Why a checkpoint was rejected; every case names the file.
public struct CheckpointError: Error, CustomStringConvertible, Equatable {
    /// What is wrong with the file (or, for a run directory, that none of its checkpoints verifies).
    public enum Reason: Equatable, Sendable {
        case unreadable(FileError)
        /// The safetensors structure is damaged.
        case invalidSafeTensors(SafeTensorsError)
        /// Metadata `format` is not `moqae-checkpoint` (nil: absent).
        case notACheckpoint(format: String?)
        /// Metadata `version` is not one this reader knows (nil: absent).
        case unsupportedVersion(String?)
        case checksumMismatch
        /// A counter (`step`, `adam_step`, `epoch`, `position`) is absent, not an integer, or outside 0...max.
        case invalidCounter(key: String, max: Int)
        /// The stored config does not load.
        case invalidConfig(ConfigError)
        case invalidRandomState
        case missingStoreFingerprint
        case invalidLambda
        /// The tensors hold another number of values than the routing metadata implies (3 × the weights).
        case valueCountMismatch(actual: Int, expected: Int)
        /// A weight or moment tensor is absent, or not F32 of its shape.
        case invalidTensor(name: String, rows: Int, cols: Int)
        case nonFiniteTensor(name: String)
        case extraTensors
        case routingNotJSON
        /// Metadata `routing` lacks `freeze_first_chunk` or a list of 1 to 255 experts.
        case incompleteRouting
        /// A `routing` field is absent, or not an integer in 1...max.
        case invalidRoutingField(key: String, max: Int)
        case invalidRoutingExpert
        case unknownPooling
        /// `routing.first_held_chunks` is not one chunk index in 0...C per layer.
        case invalidFirstHeldChunks(layers: Int)
        case unknownRouterInput
        /// `routing.input_dim` is not the width `router_input` has at `head_dim`.
        case inputWidthMismatch(inputDim: Int, routerInput: RouterInput, headDim: Int)
        /// A run directory holds no checkpoint that verifies.
        case noVerifiedCheckpoint

        /// The reason as the command line prints it, after the path.
        public var message: String {
            switch self {
            case let .unreadable(error): "cannot read: \(error)"
            case let .invalidSafeTensors(error): "\(error)"
            case let .notACheckpoint(format): "not a moqae checkpoint (metadata format is \(format.map { "\"\($0)\"" } ?? "missing"))"
            case let .unsupportedVersion(version): "checkpoint version \(version ?? "?") is not supported (expected \(Checkpoint.version))"
            case .checksumMismatch: "checksum mismatch: the file is damaged"
            case let .invalidCounter(key, max): "metadata \(key) is not an integer in 0...\(max)"
            case let .invalidConfig(error): "\(error)"
            case .invalidRandomState: "metadata rng_state is not four hexadecimal words"
            case .missingStoreFingerprint: "metadata store_fingerprint is missing"
            case .invalidLambda: "metadata lambda_bits is not a λ in [0, 1]"
            case let .valueCountMismatch(actual, expected): "holds \(actual) values, its routing metadata implies \(expected)"
            case let .invalidTensor(name, rows, cols): "tensor \(name) is missing or is not F32 of shape [\(rows), \(cols)]"
            case let .nonFiniteTensor(name): "tensor \(name) holds a non-finite value"
            case .extraTensors: "holds tensors beyond the routers and their moments"
            case .routingNotJSON: "metadata routing is not valid JSON"
            case .incompleteRouting: "metadata routing is incomplete"
            case let .invalidRoutingField(key, max): "metadata routing.\(key) is not an integer in 1...\(max)"
            case .invalidRoutingExpert: "metadata routing.experts holds an invalid expert"
            case .unknownPooling: "metadata routing.pooling is not a known pooling"
            case let .invalidFirstHeldChunks(layers): "metadata routing.first_held_chunks is not \(layers) chunk indices, one per layer"
            case .unknownRouterInput: "metadata routing.router_input is not a known router input"
            case let .inputWidthMismatch(inputDim, routerInput, headDim):
                "metadata routing.input_dim \(inputDim) is not the width of router_input \(routerInput.rawValue) at head_dim \(headDim)"
            case .noVerifiedCheckpoint: "no checkpoint that verifies"
            }
        }
    }

    public let path: String
    public let reason: Reason
    public var description: String { "\(path): \(reason.message)" }

    public init(path: String, reason: Reason) {
        self.path = path
        self.reason = reason
    }
}

/// Everything needed to continue a run exactly: weights, AdamW moments, data position, RNG state,
/// the effective config and the store it trained on. One safetensors file; its `__metadata__` holds
/// a CRC-32 over the data section and every other metadata entry.
public struct Checkpoint: Equatable {
    public static let format = "moqae-checkpoint"
    public static let version = "1"

    public var parameters: RouterParameters
    public var optimizer: AdamW
    /// Steps taken.
    public var step: Int
    /// Epoch of the next step and how many of its batches are done.
    public var epoch: Int
    public var position: Int
    /// Generator state at the start of `epoch`: it reproduces the epoch's shuffle and everything after.
    public var epochRandom: RandomGenerator
    /// λ of the next step: `loss.lambda`, or where the bits budget has moved it.
    public var lambda: Double
    public var config: TrainingConfig
    public var setup: RouterSetup
    public var storeFingerprint: UInt64

    public static func fileName(step: Int) -> String { "ckpt-" + String(step).leftPadded(to: 9) + ".safetensors" }

    // MARK: Writing

    public func serialized() -> [UInt8] {
        var builder = SafeTensorsBuilder()
        for entry in parameters.table {
            let shape = [entry.rows, entry.cols]
            builder.add(entry.name, shape: shape, floats: Array(parameters.values[entry.range]))
            builder.add("adam.m." + entry.name, shape: shape, floats: Array(optimizer.m[entry.range]))
            builder.add("adam.v." + entry.name, shape: shape, floats: Array(optimizer.v[entry.range]))
        }
        var metadata = metadataEntries
        metadata.append(("checksum", Checkpoint.checksum(data: builder.dataSection, metadata: metadata)))
        builder.metadata = metadata
        return builder.serialized()
    }

    private var metadataEntries: [(String, String)] {
        let layout = setup.layout
        // The paper's vote pooling, hidden width M and caches that hold every chunk are implied by an absent
        // "pooling", "hidden_width" and "first_held_chunks", so their checkpoints stay as before.
        let routing = JSON.object([
            ("layers", .int(layout.layers)), ("heads", .int(layout.heads)), ("tokens", .int(layout.tokens)),
            ("input_dim", .int(layout.inputDim)), ("chunk_size", .int(layout.chunkSize)), ("group_size", .int(layout.groupSize)),
            ("freeze_first_chunk", .bool(layout.frozenChunks == 1)), ("value_group", .int(setup.valueGroup)),
            ("head_dim", .int(setup.headDim)), ("router_input", .string(setup.routerInput.rawValue)),
            ("experts", .array(setup.experts.map { .object([("name", .string($0.name)), ("key_bits", .int($0.keyBits)), ("value_bits", .int($0.valueBits))]) })),
        ] + (layout.pooling == .vote ? [] : [("pooling", .string(layout.pooling.rawValue))])
          + (layout.firstHeldChunks.allSatisfy { $0 == 0 } ? [] : [("first_held_chunks", .array(layout.firstHeldChunks.map(JSON.int)))])
          + (setup.hiddenWidth == setup.experts.count ? [] : [("hidden_width", .int(setup.hiddenWidth))]))
        let state = epochRandom.state
        return [
            ("format", Checkpoint.format), ("version", Checkpoint.version),
            ("step", "\(step)"), ("epoch", "\(epoch)"), ("position", "\(position)"), ("adam_step", "\(optimizer.step)"),
            ("rng_state", [state.0, state.1, state.2, state.3].map { String($0, radix: 16) }.joined(separator: ",")),
            ("lambda_bits", String(lambda.bitPattern, radix: 16)),
            ("store_fingerprint", String(storeFingerprint, radix: 16)),
            ("routing", routing.serialized),
            ("config", config.yaml),
        ]
    }

    static func checksum(data: [UInt8], metadata: [(String, String)]) -> String {
        var crc = CRC32()
        crc.update(data)
        for (key, value) in metadata.sorted(by: { $0.0 < $1.0 }) where key != "checksum" {
            crc.update(Array("\(key)=\(value)\n".utf8))
        }
        return String(crc.value, radix: 16)
    }

    /// Writes atomically (temporary file, fsync, rename, fsync of the directory).
    public func write(to path: String) throws(FileError) { try AtomicFile.write(serialized(), to: path) }

    // MARK: Reading

    /// Reads and verifies a checkpoint: safetensors structure, format and version, checksum, every
    /// tensor's presence and shape, and the stored config.
    public static func load(path: String) throws(CheckpointError) -> Checkpoint {
        let file: MappedFile
        do { file = try MappedFile(path: path) } catch { throw CheckpointError(path: path, reason: .unreadable(error)) }
        return try parse(file: file.bytes, path: path)
    }

    /// Verifies and decodes a checkpoint's bytes, as `load`; `path` names it in errors. Fuzzing builds
    /// (`-D FUZZING`) skip the checksum so that damaged inputs reach the parsing behind it.
    public static func parse(file bytes: UnsafeRawBufferPointer, path: String) throws(CheckpointError) -> Checkpoint {
        func fail(_ reason: CheckpointError.Reason) -> CheckpointError { CheckpointError(path: path, reason: reason) }
        let header: SafeTensorsHeader
        do { header = try SafeTensorsHeader(file: bytes) } catch { throw fail(.invalidSafeTensors(error)) }
        let metadata = header.metadata
        guard metadata["format"] == format else { throw fail(.notACheckpoint(format: metadata["format"])) }
        guard metadata["version"] == version else { throw fail(.unsupportedVersion(metadata["version"])) }
        #if !FUZZING
        let data = Array(bytes[header.dataOffset...])
        guard let stored = metadata["checksum"],
              stored == checksum(data: data, metadata: metadata.map { ($0.key, $0.value) }) else {
            throw fail(.checksumMismatch)
        }
        #endif
        /// Steps are capped as train.max_steps is; the counters below follow from the step.
        func integer(_ key: String, max: Int = Int(Int32.max)) throws(CheckpointError) -> Int {
            guard let text = metadata[key], let value = Int(text), (0...max).contains(value) else {
                throw fail(.invalidCounter(key: key, max: max))
            }
            return value
        }
        let step = try integer("step")
        let counters = (adam: try integer("adam_step", max: step), epoch: try integer("epoch", max: step),
                        position: try integer("position", max: step))
        let config: TrainingConfig
        do { config = try TrainingConfig.load(yaml: metadata["config"] ?? "", source: "\(path) (stored config)") } catch { throw fail(.invalidConfig(error)) }
        let setup = try parseRouting(metadata["routing"] ?? "", fail: fail)
        let words = (metadata["rng_state"] ?? "").split(separator: ",").compactMap { UInt64($0, radix: 16) }
        guard words.count == 4 else { throw fail(.invalidRandomState) }
        guard let fingerprint = UInt64(metadata["store_fingerprint"] ?? "", radix: 16) else { throw fail(.missingStoreFingerprint) }
        // λ's exact bits; absent from checkpoints written before bits budgets, whose λ was the config's.
        var lambda = config.lambda
        if let text = metadata["lambda_bits"] {
            guard let bits = UInt64(text, radix: 16), (0...1).contains(Double(bitPattern: bits)) else { throw fail(.invalidLambda) }
            lambda = Double(bitPattern: bits)
        }

        let layout = setup.layout
        let count = setup.parameterCount
        let storedValues = header.tensors.reduce(0, { $0 + $1.elementCount })
        guard storedValues == 3 * count else { throw fail(.valueCountMismatch(actual: storedValues, expected: 3 * count)) }
        var parameters = RouterParameters(routers: layout.routers, inputDim: layout.inputDim, experts: setup.experts.count,
                                          hidden: setup.hiddenWidth, values: Array(repeating: 0, count: count))
        var m = parameters.values, v = parameters.values
        for entry in parameters.table {
            for (prefix, destination) in [("", 0), ("adam.m.", 1), ("adam.v.", 2)] {
                let name = prefix + entry.name
                guard let info = header.tensor(named: name), info.dtype == .f32, info.shape == [entry.rows, entry.cols] else {
                    throw fail(.invalidTensor(name: name, rows: entry.rows, cols: entry.cols))
                }
                let offset = header.dataOffset + info.dataRange.lowerBound
                let values = (0..<entry.count).map { bytes.loadUnaligned(fromByteOffset: offset + 4 * $0, as: Float.self) }
                guard values.allSatisfy(\.isFinite) else { throw fail(.nonFiniteTensor(name: name)) }
                switch destination {
                case 0: parameters.values.replaceSubrange(entry.range, with: values)
                case 1: m.replaceSubrange(entry.range, with: values)
                default: v.replaceSubrange(entry.range, with: values)
                }
            }
        }
        guard header.tensors.count == 3 * parameters.table.count else { throw fail(.extraTensors) }
        return Checkpoint(parameters: parameters,
                          optimizer: AdamW(settings: config.optimizer, step: counters.adam, m: m, v: v),
                          step: step, epoch: counters.epoch, position: counters.position,
                          epochRandom: RandomGenerator(state: (words[0], words[1], words[2], words[3])),
                          lambda: lambda, config: config, setup: setup, storeFingerprint: fingerprint)
    }

    private static func parseRouting(_ text: String, fail: (CheckpointError.Reason) -> CheckpointError) throws(CheckpointError) -> RouterSetup {
        guard let json = try? JSON.parse(text) else { throw fail(.routingNotJSON) }
        /// Limits are those of the export header (u16 fields), tokens excepted.
        func int(_ key: String, max: Int = 65535) throws(CheckpointError) -> Int {
            guard let value = json[key]?.intValue, value > 0, value <= max else { throw fail(.invalidRoutingField(key: key, max: max)) }
            return value
        }
        guard let freeze = json["freeze_first_chunk"]?.boolValue, let expertItems = json["experts"]?.arrayValue,
              (1...255).contains(expertItems.count) else {
            throw fail(.incompleteRouting)
        }
        var experts: [Expert] = []
        for item in expertItems {
            guard let name = item["name"]?.stringValue, let kb = item["key_bits"]?.intValue, let vb = item["value_bits"]?.intValue,
                  Expert.isValidBits(kb), Expert.isValidBits(vb) else { throw fail(.invalidRoutingExpert) }
            experts.append(Expert(name: name, keyBits: kb, valueBits: vb))
        }
        var pooling = ChunkPooling.vote
        if let name = json["pooling"] {
            guard let kind = name.stringValue.flatMap(ChunkPooling.init(rawValue:)) else { throw fail(.unknownPooling) }
            pooling = kind
        }
        let (layers, tokens, chunkSize) = (try int("layers"), try int("tokens", max: Int(Int32.max)), try int("chunk_size"))
        var firstHeldChunks: [Int]?
        if let items = json["first_held_chunks"] {
            let chunks = items.arrayValue?.compactMap(\.intValue).filter { (0...(tokens / chunkSize)).contains($0) } ?? []
            guard chunks.count == layers, items.arrayValue?.count == layers else { throw fail(.invalidFirstHeldChunks(layers: layers)) }
            firstHeldChunks = chunks
        }
        let layout = RoutingLayout(layers: layers, heads: try int("heads"), tokens: tokens,
                                   inputDim: try int("input_dim"), chunkSize: chunkSize, groupSize: try int("group_size"),
                                   freezeFirstChunk: freeze, pooling: pooling, firstHeldChunks: firstHeldChunks)
        // Checkpoints written before router inputs other than the key have neither field: key, width D.
        var routerInput = RouterInput.key
        if let name = json["router_input"] {
            guard let input = name.stringValue.flatMap(RouterInput.init(rawValue:)) else { throw fail(.unknownRouterInput) }
            routerInput = input
        }
        let headDim = json["head_dim"] == nil ? layout.inputDim : try int("head_dim")
        guard routerInput.width(headDim: headDim) == layout.inputDim else {
            throw fail(.inputWidthMismatch(inputDim: layout.inputDim, routerInput: routerInput, headDim: headDim))
        }
        let hiddenWidth = json["hidden_width"] == nil ? experts.count : try int("hidden_width", max: 255)
        return RouterSetup(layout: layout, experts: experts, valueGroup: try int("value_group"), headDim: headDim, routerInput: routerInput,
                           hiddenWidth: hiddenWidth)
    }
}

/// The checkpoints of a run directory, newest first, and their retention.
public struct CheckpointDirectory {
    public let path: String

    public init(path: String) { self.path = path }

    /// The step of a file named like a checkpoint (`ckpt-NNNNNNNNN.safetensors`), or nil.
    public static func step(ofFileNamed name: String) -> Int? {
        guard name.hasPrefix("ckpt-"), name.hasSuffix(".safetensors") else { return nil }
        let digits = name.dropFirst(5).dropLast(12)
        guard !digits.isEmpty, digits.allSatisfy({ ("0"..."9").contains($0) }) else { return nil }
        return Int(digits)
    }

    /// `(step, path)` of every file named like a checkpoint, newest first.
    public func candidates() -> [(step: Int, path: String)] {
        let names = (try? listDirectory(path)) ?? []
        return names.compactMap { name -> (Int, String)? in
            CheckpointDirectory.step(ofFileNamed: name).map { ($0, path + "/" + name) }
        }.sorted { $0.0 > $1.0 }
    }

    /// The newest checkpoint that verifies, and the newer files that did not (with the reason).
    public func latest() -> (checkpoint: Checkpoint, path: String, skipped: [CheckpointError])? {
        var skipped: [CheckpointError] = []
        for candidate in candidates() {
            do { return (try Checkpoint.load(path: candidate.path), candidate.path, skipped) } catch { skipped.append(error) }
        }
        return nil
    }

    /// Deletes the temporary files of the trainer's own atomic writes that a crash interrupted
    /// (`NAME.tmp-PID` where NAME is a checkpoint or a log); returns their names. Other files, a user's
    /// or an export's, are left alone. Call it holding the run directory's lock, so that no live trainer
    /// is writing them.
    public func removeInterruptedWrites() throws(FileError) -> [String] {
        let names = ((try? listDirectory(path)) ?? []).filter { name in
            guard let marker = name.range(of: ".tmp-", options: .backwards) else { return false }
            let pid = name[marker.upperBound...], target = String(name[..<marker.lowerBound])
            guard !pid.isEmpty, pid.allSatisfy({ ("0"..."9").contains($0) }) else { return false }
            return target == "metrics.jsonl" || target == "eval.jsonl" || CheckpointDirectory.step(ofFileNamed: target) != nil
        }
        for name in names {
            guard unlink(path + "/" + name) == 0 else { throw FileError(path: path + "/" + name, operation: "delete") }
        }
        return names
    }

    /// Deletes the checkpoints that verify, but the newest `keep` of them. A file named like a checkpoint that
    /// does not verify is neither kept in their place nor deleted (it may be a user's), so it can never cost a
    /// valid checkpoint; those files are returned, newest first.
    @discardableResult
    public func prune(keep: Int) throws(FileError) -> [CheckpointError] {
        var (kept, skipped) = (0, [CheckpointError]())
        for candidate in candidates() {
            do { _ = try Checkpoint.load(path: candidate.path) } catch {
                skipped.append(error)
                continue
            }
            kept += 1
            if kept > keep, unlink(candidate.path) != 0 { throw FileError(path: candidate.path, operation: "delete") }
        }
        try AtomicFile.syncDirectory(path)
        return skipped
    }

    /// One line for the files that did not verify (newest first), or nil for none: each with its reason when
    /// there are few, the newest three and a count when there are many.
    public static func skippedSummary(_ skipped: [CheckpointError]) -> String? {
        guard let first = skipped.first else { return nil }
        if skipped.count == 1 { return "skipped damaged checkpoint \(first)" }
        let named = skipped.prefix(3).map { "\($0)" }.joined(separator: "; ")
        return "skipped \(skipped.count) damaged checkpoints, newest first: \(named)"
            + (skipped.count > 3 ? "; and \(skipped.count - 3) more" : "")
    }
}
