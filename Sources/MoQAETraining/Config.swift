import Foundation
import MoQAERouter
import MoQAEStore
import Yams

/// A config value after type checking.
public enum ConfigValue: Equatable, Sendable {
    case int(Int)
    case double(Double)
    case bool(Bool)
    case string(String)
    case strings([String])
    case doubles([Double])
    case null

    /// The value as YAML flow text.
    var yaml: String {
        switch self {
        case let .int(v): return "\(v)"
        case let .double(v): return "\(v)"
        case let .bool(v): return v ? "true" : "false"
        case let .string(v): return JSON.string(v).serialized
        case let .strings(v): return "[" + v.map { JSON.string($0).serialized }.joined(separator: ", ") + "]"
        case let .doubles(v): return "[" + v.map { "\($0)" }.joined(separator: ", ") + "]"
        case .null: return "null"
        }
    }
}

/// A config mistake: where it is (file and line, or `--set`), the key path, and what was expected.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    /// What is wrong: with the text, with one key's value, or with the config against the store.
    public enum Reason: Equatable, Sendable {
        case unreadable(FileError)
        case notUTF8
        /// The YAML parser's message, on one line.
        case invalidYAML(String)
        /// A `--set` value that is not YAML: the parser's message, on one line.
        case invalidOverrideYAML(String)
        case topLevelNotMapping
        /// A `--set` without `=`.
        case malformedOverride
        /// A key the schema does not have, with the known key closest in spelling (nil: none is close).
        case unknownKey(suggestion: String?)
        case keyNotPlainName
        /// A section (`train`, …) whose value is not a mapping.
        case sectionNotMapping
        /// A value tagged outside YAML's core schema (`!!python/object:…`).
        case unsupportedTag(String)
        /// A value of the wrong type or outside its range: what the key takes, and what was found.
        case invalidValue(expected: String, got: String)
        /// `data.calibration_fraction + data.validation_fraction` above 1.
        case fractionsAboveOne(Double)
        case invalidExpertList
        /// `router.experts` names an expert the store lacks.
        case expertNotInStore(expert: String, store: String, available: [String])
        case chunkSizeMismatch(configured: Int, store: String, stored: Int)
        /// The two splits need more of the corpus than the store's selection holds.
        case fractionsExceedStore(requested: Double, available: Double, store: String)
        /// Route freezing leaves no chunk of the store's sequences to route.
        case nothingToRoute(tokens: Int, chunks: Int, chunkSize: Int)
        /// A router's group holds layers whose caches hold different chunks (sliding and global layers).
        case groupMixesHeldChunks(router: Int, layers: Range<Int>, firstHeldChunks: [Int], store: String)
        case noCalibrationSequences(store: String, sequences: Int)
        /// `eval`: the validation split of the store is empty.
        case noValidationSequences(store: String)
        /// `router.target_bits` outside the average payload bits the experts can give.
        case unreachableTargetBits(Double, reachable: ClosedRange<Double>, experts: [String], freezeFirstChunk: Bool)

        /// The reason as the command line prints it, after the location and key.
        public var message: String {
            switch self {
            case let .unreadable(error): "cannot read: \(error)"
            case .notUTF8: "not valid UTF-8"
            case let .invalidYAML(message): "not valid YAML: \(message)"
            case let .invalidOverrideYAML(message): "value is not valid YAML: \(message)"
            case .topLevelNotMapping: "expected a mapping of keys at the top level"
            case .malformedOverride: "expected KEY=VALUE, for example train.lr=1e-4"
            case let .unknownKey(suggestion):
                "unknown key" + (suggestion.map { " (did you mean \($0)?)" } ?? " (known keys: \(TrainingConfig.keys.map(\.path).joined(separator: ", ")))")
            case .keyNotPlainName: "keys must be plain names"
            case .sectionNotMapping: "expected a mapping of keys"
            case let .unsupportedTag(tag): "YAML tag \(tag) is not supported (config values are plain numbers, strings, booleans, null and lists)"
            case let .invalidValue(expected, got): "expected \(expected), got \(got)"
            case let .fractionsAboveOne(sum): "calibration_fraction + validation_fraction must be at most 1, got \(sum)"
            case .invalidExpertList: "expected a non-empty list of distinct expert names"
            case let .expertNotInStore(expert, store, available):
                "expert \"\(expert)\" is not in the store \(store) (it has \(available.joined(separator: ", ")))"
            case let .chunkSizeMismatch(configured, store, stored): "is \(configured) but the store \(store) was dumped with chunk_size \(stored)"
            case let .fractionsExceedStore(requested, available, store):
                "calibration_fraction + validation_fraction = \(requested) exceeds the fraction \(available) the store \(store) holds"
            case let .nothingToRoute(tokens, chunks, chunkSize):
                "the store's \(tokens)-token sequences have \(chunks) chunk(s) of \(chunkSize): nothing is left to route"
            case let .groupMixesHeldChunks(router, layers, firstHeldChunks, store):
                "router \(router) would serve layers \(layers.lowerBound)-\(layers.upperBound - 1), whose caches in the store \(store) hold "
                    + "chunks from \(firstHeldChunks.map(String.init).joined(separator: ", ")) (sliding and global layers): "
                    + "use a group_size whose groups hold alike layers (1 always does)"
            case let .noCalibrationSequences(store, sequences): "selects no sequence of the store \(store) (\(sequences) sequences)"
            case let .noValidationSequences(store): "selects no sequence of the store \(store) to evaluate on"
            case let .unreachableTargetBits(target, reachable, experts, freezeFirstChunk):
                String(format: "%g is outside the %.3f...%.3f average payload bits that experts %@ can give here (chunk 0 frozen at 16 bits: %@)",
                       target, reachable.lowerBound, reachable.upperBound, experts.joined(separator: ", "), freezeFirstChunk ? "yes" : "no")
            }
        }
    }

    public let location: String
    public let key: String
    public let reason: Reason

    public init(location: String, key: String, reason: Reason) {
        self.location = location
        self.key = key
        self.reason = reason
    }

    public var description: String { "\(location): \(key.isEmpty ? "" : key + ": ")\(reason.message)" }
}

/// One config key: its dotted path, type and range, default, and meaning.
public struct ConfigKey: Sendable {
    public enum Kind: Sendable {
        case int(ClosedRange<Int>)
        /// An integer in the range, or null.
        case optionalInt(ClosedRange<Int>)
        /// A finite number between the bounds; `open` excludes the lower bound.
        case double(ClosedRange<Double>, lowerOpen: Bool)
        case bool
        case string
        case strings
        case doublePair(ClosedRange<Double>, upperOpen: Bool)
        /// One of the names.
        case choice([String])
        /// A finite number in the range, or null.
        case optionalDouble(ClosedRange<Double>)
    }

    public let path: String
    public let kind: Kind
    public let defaultValue: ConfigValue
    public let help: String
}

/// The trainer's configuration: every key, typed, with the paper's defaults.
public struct TrainingConfig: Equatable, Sendable {
    public static let keys: [ConfigKey] = [
        ConfigKey(path: "store", kind: .string, defaultValue: .string("calibration/wt2-byte-llama"),
                  help: "calibration store directory (relative paths are taken from the working directory)"),
        ConfigKey(path: "run_dir", kind: .string, defaultValue: .string("checkpoints/default"),
                  help: "run directory: checkpoints, metrics.jsonl, eval.jsonl"),
        ConfigKey(path: "seed", kind: .int(0...Int.max), defaultValue: .int(0),
                  help: "run seed: initial weights and the shuffle of every epoch"),
        ConfigKey(path: "data.calibration_fraction", kind: .double(0...1, lowerOpen: true), defaultValue: .double(0.05),
                  help: "training split: sequences with u(id, store seed) < this fraction (the paper's 5%)"),
        ConfigKey(path: "data.validation_fraction", kind: .double(0...1, lowerOpen: false), defaultValue: .double(0.05),
                  help: "validation split: the next fraction after the calibration split; 0 disables validation"),
        ConfigKey(path: "router.experts", kind: .strings, defaultValue: .strings(["fp16", "int4", "int2"]),
                  help: "names of the store's experts the routers choose among"),
        ConfigKey(path: "router.chunk_size", kind: .int(1...65535), defaultValue: .int(32),
                  help: "tokens per routed chunk; must equal the store's chunk_size"),
        ConfigKey(path: "router.group_size", kind: .int(1...65535), defaultValue: .int(3),
                  help: "layers per router (route sharing); 1 gives one router per layer"),
        ConfigKey(path: "router.freeze_first_chunk", kind: .bool, defaultValue: .bool(true),
                  help: "keep chunk 0 of every sequence at 16 bits (route freezing)"),
        ConfigKey(path: "router.pooling", kind: .choice(ChunkPooling.allCases.map(\.rawValue)), defaultValue: .string("vote"),
                  help: "how a chunk decides from its tokens: vote (the paper's majority of token argmaxes), mean (softmax of the mean token log-probability) or max (softmax of the maximum token log-probability); training pushes the same pooled probability"),
        ConfigKey(path: "router.hidden_width", kind: .optionalInt(1...255), defaultValue: .null,
                  help: "H, the routers' hidden width: W1, W2 are D×H and W3 is H×M (null: M, the paper's)"),
        ConfigKey(path: "router.target_bits", kind: .optionalDouble(1...16), defaultValue: .null,
                  help: "bits budget: average payload bits per KV element to land on; λ then follows it during training, from where the first batch's best per-unit allocation meets it (null: fixed λ = loss.lambda)"),
        ConfigKey(path: "loss.kind", kind: .choice(LossKind.allCases.map(\.rawValue)), defaultValue: .string("paper"),
                  help: "paper: the paper's loss (docs/FORMATS.md, Losses); expected: the expected per-unit cost, from each unit's own delta_nll"),
        ConfigKey(path: "loss.lambda", kind: .double(0...1, lowerOpen: false), defaultValue: .double(0.5),
                  help: "λ in λ·L_model + (1−λ)·L_mem: 1 favours accuracy, 0 memory"),
        ConfigKey(path: "loss.budget_rate", kind: .double(0...100, lowerOpen: true), defaultValue: .double(0.2),
                  help: "with router.target_bits: log((1−λ)/λ) grows by this × (batch payload bits − target) after every step"),
        ConfigKey(path: "train.lr", kind: .double(0...1e3, lowerOpen: true), defaultValue: .double(3e-4),
                  help: "AdamW learning rate"),
        ConfigKey(path: "train.betas", kind: .doublePair(0...1, upperOpen: true), defaultValue: .doubles([0.9, 0.999]),
                  help: "AdamW β1, β2"),
        ConfigKey(path: "train.eps", kind: .double(0...1, lowerOpen: true), defaultValue: .double(1e-8),
                  help: "AdamW ε"),
        ConfigKey(path: "train.weight_decay", kind: .double(0...1e3, lowerOpen: false), defaultValue: .double(0.01),
                  help: "AdamW decoupled weight decay"),
        ConfigKey(path: "train.batch_size", kind: .int(1...1_000_000), defaultValue: .int(8),
                  help: "sequences per step; the last batch of an epoch holds the remainder"),
        ConfigKey(path: "train.epochs", kind: .int(1...1_000_000), defaultValue: .int(1),
                  help: "passes over the calibration split"),
        ConfigKey(path: "train.max_steps", kind: .optionalInt(0...Int(Int32.max)), defaultValue: .null,
                  help: "stop after this many steps in all (null: run every epoch); 0 writes the initial checkpoint and exits"),
        ConfigKey(path: "train.eval_every", kind: .int(0...Int(Int32.max)), defaultValue: .int(50),
                  help: "validation report every this many steps (0: only at the end)"),
        ConfigKey(path: "train.threads", kind: .int(0...1024), defaultValue: .int(0),
                  help: "worker threads, each streaming whole sequences (0: one per CPU core); results do not depend on it"),
        ConfigKey(path: "checkpoint.every_steps", kind: .int(1...Int(Int32.max)), defaultValue: .int(50),
                  help: "write a checkpoint every this many steps (and at the end)"),
        ConfigKey(path: "checkpoint.keep_last", kind: .int(1...1_000_000), defaultValue: .int(3),
                  help: "checkpoints kept in the run directory; older ones are deleted"),
    ]

    /// Every key's value, by dotted path.
    public private(set) var values: [String: ConfigValue]

    /// The defaults.
    public init() {
        values = Dictionary(uniqueKeysWithValues: TrainingConfig.keys.map { ($0.path, $0.defaultValue) })
    }

    // MARK: Typed access

    public var storePath: String { string("store") }
    public var runDirectory: String { string("run_dir") }
    public var seed: UInt64 { UInt64(int("seed")) }
    public var calibrationFraction: Double { double("data.calibration_fraction") }
    public var validationFraction: Double { double("data.validation_fraction") }
    public var expertNames: [String] { if case let .strings(v) = values["router.experts"] { return v } else { return [] } }
    public var chunkSize: Int { int("router.chunk_size") }
    public var groupSize: Int { int("router.group_size") }
    public var hiddenWidth: Int? { if case let .int(v) = values["router.hidden_width"] { return v } else { return nil } }
    public var pooling: ChunkPooling {
        guard let pooling = ChunkPooling(rawValue: string("router.pooling")) else { preconditionFailure("router.pooling is checked") }
        return pooling
    }
    public var freezeFirstChunk: Bool { if case let .bool(v) = values["router.freeze_first_chunk"] { return v } else { return true } }
    public var lambda: Double { double("loss.lambda") }
    public var lossKind: LossKind {
        guard let kind = LossKind(rawValue: string("loss.kind")) else { preconditionFailure("loss.kind is checked") }
        return kind
    }
    public var targetBits: Double? { if case let .double(v) = values["router.target_bits"] { return v } else { return nil } }
    public var budgetRate: Double { double("loss.budget_rate") }
    public var batchSize: Int { int("train.batch_size") }
    public var epochs: Int { int("train.epochs") }
    public var maxSteps: Int? { if case let .int(v) = values["train.max_steps"] { return v } else { return nil } }
    public var evalEvery: Int { int("train.eval_every") }
    /// `train.threads`, with 0 resolved to the number of CPU cores.
    public var threads: Int { int("train.threads") > 0 ? int("train.threads") : ProcessInfo.processInfo.activeProcessorCount }
    public var checkpointEvery: Int { int("checkpoint.every_steps") }
    public var keepLast: Int { int("checkpoint.keep_last") }
    public var optimizer: AdamWSettings {
        guard case let .doubles(betas) = values["train.betas"] else { preconditionFailure("train.betas is checked") }
        return AdamWSettings(learningRate: double("train.lr"), beta1: betas[0], beta2: betas[1],
                             epsilon: double("train.eps"), weightDecay: double("train.weight_decay"))
    }

    /// The value of a schema key; every key has one (its default unless set).
    public func value(_ path: String) -> ConfigValue {
        guard let value = values[path] else { preconditionFailure("\(path) is not a config key") }
        return value
    }

    private func int(_ path: String) -> Int { if case let .int(v) = values[path] { return v } else { preconditionFailure(path) } }
    private func string(_ path: String) -> String { if case let .string(v) = values[path] { return v } else { preconditionFailure(path) } }
    private func double(_ path: String) -> Double {
        switch values[path] {
        case let .double(v): return v
        case let .int(v): return Double(v)
        default: preconditionFailure(path)
        }
    }

    /// Keys whose change alters the routers' shape or meaning; a resumed run must keep them.
    public static let modelShapingKeys = ["router.experts", "router.chunk_size", "router.group_size", "router.freeze_first_chunk",
                                          "router.pooling", "router.hidden_width"]

    /// Keys that fix the calibration split and how it is cut into batches; a checkpoint's data
    /// position means nothing under other values, so a resumed run must keep them too.
    public static let dataOrderKeys = ["data.calibration_fraction", "train.batch_size"]

    // MARK: Loading

    /// Loads YAML text (keys absent from it keep their defaults), then applies `--set` overrides.
    /// - Parameter source: the file name used in error messages.
    public static func load(yaml text: String, source: String, overrides: [String] = []) throws(ConfigError) -> TrainingConfig {
        var config = TrainingConfig()
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch {
            throw ConfigError(location: source, key: "", reason: .invalidYAML(oneLine(error)))
        }
        if let root {
            guard case .mapping = root else { throw ConfigError(location: source, key: "", reason: .topLevelNotMapping) }
            try config.merge(root, prefix: "", source: source)
        }
        for override in overrides { try config.apply(override: override) }
        try config.checkCombinations(source: overrides.isEmpty ? source : "\(source) with --set")
        return config
    }

    /// Loads a YAML file.
    public static func load(file path: String, overrides: [String] = []) throws(ConfigError) -> TrainingConfig {
        let bytes: [UInt8]
        do { bytes = try readFileBytes(path, limit: FileSizeLimit.config) } catch { throw ConfigError(location: path, key: "", reason: .unreadable(error)) }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigError(location: path, key: "", reason: .notUTF8)
        }
        return try load(yaml: text, source: path, overrides: overrides)
    }

    /// The config to evaluate an export on a store with: this config's store, splits and threads, and
    /// the export's routing (experts named as in the store by their bits, chunk size, group size,
    /// chunk-0 freezing, pooling, hidden width).
    public func routing(of export: RouterExport, path: String, on store: CalibrationStore) throws(ExportError) -> TrainingConfig {
        var names: [String] = []
        for expert in export.expertBits {
            guard let match = store.manifest.experts.first(where: { $0.keyBits == expert.keyBits && $0.valueBits == expert.valueBits }) else {
                throw ExportError(path: path, reason: .expertNotInStore(keyBits: expert.keyBits, valueBits: expert.valueBits, store: store.path))
            }
            names.append(match.name)
        }
        guard export.layers == store.model.numLayers, export.heads == store.model.numKVHeads else {
            throw ExportError(path: path, reason: .modelShapeMismatch(layers: export.layers, heads: export.heads, store: store.path,
                                                                      storeLayers: store.model.numLayers, storeHeads: store.model.numKVHeads))
        }
        guard export.routerInput == store.manifest.routerInput else {
            throw ExportError(path: path, reason: .routerInputMismatch(export: export.routerInput, store: store.path,
                                                                       stored: store.manifest.routerInput))
        }
        guard export.chunkSize == store.manifest.chunkSize else {
            throw ExportError(path: path, reason: .chunkSizeMismatch(export: export.chunkSize, store: store.path,
                                                                     stored: store.manifest.chunkSize))
        }
        let hidden = export.parameters.hidden
        var config = self
        config.values["router.experts"] = .strings(names)
        config.values["router.chunk_size"] = .int(export.chunkSize)
        config.values["router.group_size"] = .int(export.groupSize)
        config.values["router.freeze_first_chunk"] = .bool(export.freezeFirstChunk)
        config.values["router.pooling"] = .string(export.pooling.rawValue)
        config.values["router.hidden_width"] = hidden == export.parameters.experts ? .null : .int(hidden)
        return config
    }

    /// Applies one `KEY=VALUE` override; the value is read as YAML (`--set router.experts=[fp16,int2]`).
    public mutating func apply(override: String) throws(ConfigError) {
        guard let equals = override.firstIndex(of: "=") else {
            throw ConfigError(location: "--set", key: override, reason: .malformedOverride)
        }
        let path = String(override[..<equals])
        let location = "--set \(path)"
        guard let key = TrainingConfig.keys.first(where: { $0.path == path }) else {
            throw ConfigError(location: "--set", key: path, reason: .unknownKey(suggestion: TrainingConfig.suggestion(for: path)))
        }
        let node: Node?
        do { node = try Yams.compose(yaml: String(override[override.index(after: equals)...])) } catch {
            throw ConfigError(location: location, key: path, reason: .invalidOverrideYAML(oneLine(error)))
        }
        values[path] = try TrainingConfig.convert(node ?? Node("", Tag(.null), .plain), key: key, location: "--set")
    }

    private mutating func merge(_ node: Node, prefix: String, source: String) throws(ConfigError) {
        guard case let .mapping(mapping) = node else { preconditionFailure() }
        for (keyNode, valueNode) in mapping {
            let location = "\(source):\((keyNode.mark?.line).map(String.init) ?? "?")"
            guard case let .scalar(scalar) = keyNode else { throw ConfigError(location: location, key: prefix, reason: .keyNotPlainName) }
            let path = prefix.isEmpty ? scalar.string : prefix + "." + scalar.string
            if let key = TrainingConfig.keys.first(where: { $0.path == path }) {
                values[path] = try TrainingConfig.convert(valueNode, key: key, location: location)
            } else if TrainingConfig.keys.contains(where: { $0.path.hasPrefix(path + ".") }) {
                guard case .mapping = valueNode else { throw ConfigError(location: location, key: path, reason: .sectionNotMapping) }
                try merge(valueNode, prefix: path, source: source)
            } else {
                throw ConfigError(location: location, key: path, reason: .unknownKey(suggestion: TrainingConfig.suggestion(for: path)))
            }
        }
    }

    private func checkCombinations(source: String) throws(ConfigError) {
        guard calibrationFraction + validationFraction <= 1 else {
            throw ConfigError(location: source, key: "data.validation_fraction",
                              reason: .fractionsAboveOne(calibrationFraction + validationFraction))
        }
        guard !expertNames.isEmpty, Set(expertNames).count == expertNames.count else {
            throw ConfigError(location: source, key: "router.experts", reason: .invalidExpertList)
        }
    }

    /// The YAML tags a config value may carry: the core schema's, which plain values resolve to.
    private static let plainTags = Set(([.implicit, .nonSpecific, .str, .seq, .map, .bool, .int, .float, .null] as [Tag.Name]).map(\.rawValue))

    /// The first explicit tag outside the core schema (for example `!!python/object:…`) on a value or on its
    /// direct items, if any. Deeper nodes are never visited: no config value nests (a nested one fails as the
    /// wrong kind), so nested aliases that expand exponentially (an alias bomb) cost nothing.
    private static func foreignTag(_ node: Node) -> String? {
        let nodes: [Node]
        switch node {
        case let .sequence(items): nodes = [node] + items
        case let .mapping(pairs): nodes = [node] + pairs.flatMap { [$0.key, $0.value] }
        default: nodes = [node]
        }
        return nodes.lazy.map(\.tag.rawValue).first { !plainTags.contains($0) }
    }

    private static func convert(_ node: Node, key: ConfigKey, location: String) throws(ConfigError) -> ConfigValue {
        let location = node.mark.map { _ in location } ?? location
        func fail(_ expected: String) -> ConfigError {
            ConfigError(location: location, key: key.path, reason: .invalidValue(expected: expected, got: describe(node)))
        }
        if let tag = foreignTag(node) {
            throw ConfigError(location: location, key: key.path, reason: .unsupportedTag(tag))
        }
        switch key.kind {
        case let .int(range):
            guard let value = plainInt(node), range.contains(value) else { throw fail("an integer in \(describe(range))") }
            return .int(value)
        case let .optionalInt(range):
            if isNull(node) { return .null }
            guard let value = plainInt(node), range.contains(value) else { throw fail("null or an integer in \(describe(range))") }
            return .int(value)
        case let .double(range, lowerOpen):
            let expected = "a number in \(lowerOpen ? "(" : "[")\(range.lowerBound), \(range.upperBound)]"
            guard let value = plainDouble(node), range.contains(value), !(lowerOpen && value == range.lowerBound) else { throw fail(expected) }
            return .double(value)
        case .bool:
            guard case let .scalar(s) = node, s.style == .plain, ["true", "false"].contains(s.string.lowercased()) else { throw fail("true or false") }
            return .bool(s.string.lowercased() == "true")
        case .string:
            guard case let .scalar(s) = node, !isNull(node), !s.string.isEmpty else { throw fail("a non-empty string") }
            return .string(s.string)
        case .strings:
            guard case let .sequence(items) = node else { throw fail("a list of names") }
            var names: [String] = []
            for item in items {
                guard case let .scalar(s) = item, !s.string.isEmpty else { throw fail("a list of names") }
                names.append(s.string)
            }
            return .strings(names)
        case let .choice(names):
            guard case let .scalar(s) = node, names.contains(s.string) else { throw fail(names.map { "\"\($0)\"" }.joined(separator: " or ")) }
            return .string(s.string)
        case let .optionalDouble(range):
            if isNull(node) { return .null }
            guard let value = plainDouble(node), range.contains(value) else { throw fail("null or a number in [\(range.lowerBound), \(range.upperBound)]") }
            return .double(value)
        case let .doublePair(range, upperOpen):
            let expected = "two numbers in [\(range.lowerBound), \(range.upperBound)\(upperOpen ? ")" : "]")"
            guard case let .sequence(items) = node, items.count == 2 else { throw fail(expected) }
            var pair: [Double] = []
            for item in items {
                guard let value = plainDouble(item), range.contains(value), !(upperOpen && value == range.upperBound) else { throw fail(expected) }
                pair.append(value)
            }
            return .doubles(pair)
        }
    }

    private static func isNull(_ node: Node) -> Bool {
        guard case let .scalar(s) = node, s.style == .plain else { return false }
        return ["", "~", "null", "Null", "NULL"].contains(s.string)
    }

    private static func plainInt(_ node: Node) -> Int? {
        guard case let .scalar(s) = node, s.style == .plain else { return nil }
        return Int(s.string)
    }

    private static func plainDouble(_ node: Node) -> Double? {
        guard case let .scalar(s) = node, s.style == .plain, let value = Double(s.string), value.isFinite else { return nil }
        return value
    }

    private static func describe(_ node: Node) -> String {
        switch node {
        case let .scalar(s): return s.style == .plain ? "\(s.string.isEmpty ? "nothing" : s.string)" : "the string \"\(s.string)\""
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    private static func describe(_ range: ClosedRange<Int>) -> String {
        range.upperBound == Int.max ? "\(range.lowerBound) or more" : "\(range.lowerBound)...\(range.upperBound)"
    }

    /// The known key closest in spelling, if any is close.
    private static func suggestion(for path: String) -> String? {
        let best = keys.map { ($0.path, editDistance(Array($0.path), Array(path))) }.min { $0.1 < $1.1 }
        guard let best, best.1 <= 3 else { return nil }
        return best.0
    }

    private static func editDistance(_ a: [Character], _ b: [Character]) -> Int {
        var previous = Array(0...b.count)
        for i in 1...max(1, a.count) where !a.isEmpty {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(1, b.count) where !b.isEmpty {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return previous[b.count]
    }

    // MARK: Output

    /// The effective config as YAML, every key in schema order.
    public var yaml: String {
        var lines: [String] = []
        var section = ""
        for key in TrainingConfig.keys {
            let parts = key.path.split(separator: ".").map(String.init)
            if parts.count == 2 {
                if parts[0] != section {
                    section = parts[0]
                    lines.append("\(section):")
                }
                lines.append("  \(parts[1]): \(value(key.path).yaml)")
            } else {
                section = ""
                lines.append("\(key.path): \(value(key.path).yaml)")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Keys whose values differ from `other`'s, in schema order.
    public func changedKeys(from other: TrainingConfig) -> [String] {
        TrainingConfig.keys.map(\.path).filter { values[$0] != other.values[$0] }
    }
}

func oneLine(_ error: any Error) -> String {
    "\(error)".split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
}

