import MoQAEExperts

/// The model dimensions a store was dumped from.
public struct ModelShape: Equatable, Sendable {
    public var name: String
    public var numLayers: Int
    public var numKVHeads: Int
    public var headDim: Int

    public init(name: String, numLayers: Int, numKVHeads: Int, headDim: Int) {
        self.name = name
        self.numLayers = numLayers
        self.numKVHeads = numKVHeads
        self.headDim = headDim
    }
}

/// One sequence of the store: its corpus index, the shard holding its tensors, its length in tokens.
public struct ManifestSequence: Equatable, Sendable {
    public var id: UInt64
    public var shard: String
    public var tokens: Int

    public init(id: UInt64, shard: String, tokens: Int) {
        self.id = id
        self.shard = shard
        self.tokens = tokens
    }
}

/// What the router reads for each token of a layer: the post-RoPE key (the tensor the KV cache
/// holds), the key before RoPE, or the post-RoPE key and the value side by side.
public enum RouterInput: String, CaseIterable, Equatable, Sendable {
    case key
    case keyPreRoPE = "key-prerope"
    case keyAndValue = "key+value"
    /// The key, then 7 statistics of its chunk (docs/FORMATS.md, router inputs).
    case keyAndChunkStatistics = "key+chunk"

    /// The chunk statistics `key+chunk` appends to the key.
    public static let chunkStatistics = 7

    /// Width of one input vector for head dimension `headDim`.
    public func width(headDim: Int) -> Int {
        switch self {
        case .key, .keyPreRoPE: headDim
        case .keyAndValue: 2 * headDim
        case .keyAndChunkStatistics: headDim + RouterInput.chunkStatistics
        }
    }

    /// Its code in bits 1–2 of a router export's flags byte (docs/FORMATS.md).
    public var exportCode: UInt8 {
        switch self {
        case .key: 0
        case .keyPreRoPE: 1
        case .keyAndValue: 2
        case .keyAndChunkStatistics: 3
        }
    }

    public init?(exportCode: UInt8) {
        switch exportCode {
        case 0: self = .key
        case 1: self = .keyPreRoPE
        case 2: self = .keyAndValue
        case 3: self = .keyAndChunkStatistics
        default: return nil
        }
    }
}

/// The plan a version 2 store's `delta_nll` is measured around (docs/FORMATS.md, Sensitivities around a
/// background): chunks `frozenChunks...` of layer l at `experts[l]`, earlier chunks at 16 bits.
public struct Background: Equatable, Sendable {
    /// Per layer, an index into the manifest's experts.
    public var experts: [Int]
    public var frozenChunks: Int

    public init(experts: [Int], frozenChunks: Int) {
        self.experts = experts
        self.frozenChunks = frozenChunks
    }
}

/// `manifest.json` of a `moqae-calibration` store: version 1 measures `delta_nll` against fp16, version 2
/// around a background plan; version 3 adds the chunks a sliding layer's cache holds (with or without a
/// background).
public struct Manifest: Equatable, Sendable {
    public static let format = "moqae-calibration"
    public static let versions = [1, 2, 3]
    public static let sensitivities = ["taylor", "fisher", "exact", "taylor+exact-answers"]

    public var model: ModelShape
    public var routerInput: RouterInput
    public var chunkSize: Int
    public var valueGroup: Int
    public var experts: [Expert]
    public var sensitivity: String
    public var selectionSeed: UInt64
    public var selectionFraction: Double
    public var corpusSource: String
    public var tokenizer: String
    public var seqLen: Int
    public var numSequences: Int
    public var sequences: [ManifestSequence]
    /// Versions 2 and 3: the plan `delta_nll` is measured around; nil: fp16.
    public var background: Background?
    /// Per layer, the first chunk its cache holds at the window's end (docs/FORMATS.md, Sliding-window layers):
    /// 0 for a global layer; written (version 3) only when some layer holds fewer than every chunk.
    public var firstHeldChunks: [Int]

    public init(model: ModelShape, routerInput: RouterInput = .key, chunkSize: Int, valueGroup: Int, experts: [Expert],
                sensitivity: String, selectionSeed: UInt64, selectionFraction: Double, corpusSource: String,
                tokenizer: String, seqLen: Int, numSequences: Int, sequences: [ManifestSequence],
                background: Background? = nil, firstHeldChunks: [Int]? = nil) {
        self.model = model
        self.routerInput = routerInput
        self.chunkSize = chunkSize
        self.valueGroup = valueGroup
        self.experts = experts
        self.sensitivity = sensitivity
        self.selectionSeed = selectionSeed
        self.selectionFraction = selectionFraction
        self.corpusSource = corpusSource
        self.tokenizer = tokenizer
        self.seqLen = seqLen
        self.numSequences = numSequences
        self.sequences = sequences
        self.background = background
        self.firstHeldChunks = firstHeldChunks ?? Array(repeating: 0, count: model.numLayers)
    }

    /// Whether some layer's cache holds only its last chunks (version 3).
    public var holdsPartialLayers: Bool { firstHeldChunks.contains { $0 > 0 } }

    /// The lowest version that says what this manifest holds.
    public var version: Int { holdsPartialLayers ? 3 : background == nil ? 1 : 2 }

    /// Width of one router input vector: the last dimension of every `seq.ID.inputs`.
    public var inputWidth: Int { routerInput.width(headDim: model.headDim) }

    /// Chunks per sequence, `C = floor(T / N)`.
    public var chunksPerSequence: Int { seqLen / chunkSize }

    public var json: JSON {
        .object([
            ("format", .string(Manifest.format)),
            ("version", .int(version)),
            ("model", .object([
                ("name", .string(model.name)), ("num_layers", .int(model.numLayers)),
                ("num_kv_heads", .int(model.numKVHeads)), ("head_dim", .int(model.headDim)),
            ])),
            ("router_input", .string(routerInput.rawValue)),
            ("chunk_size", .int(chunkSize)),
            ("value_group", .int(valueGroup)),
            ("experts", .array(experts.map {
                .object([("name", .string($0.name)), ("key_bits", .int($0.keyBits)), ("value_bits", .int($0.valueBits))])
            })),
            ("sensitivity", .string(sensitivity)),
        ] + (background.map { background in
            [("background", JSON.object([
                ("experts", .array(background.experts.map { .string(experts[$0].name) })),
                ("frozen_chunks", .int(background.frozenChunks)),
            ]))]
        } ?? []) + (holdsPartialLayers ? [("first_held_chunks", JSON.array(firstHeldChunks.map { .int($0) }))] : []) + [
            ("selection", .object([("seed", .int(selectionSeed)), ("fraction", .double(selectionFraction))])),
            ("corpus", .object([
                ("source", .string(corpusSource)), ("tokenizer", .string(tokenizer)),
                ("seq_len", .int(seqLen)), ("num_sequences", .int(numSequences)),
            ])),
            ("sequences", .array(sequences.map {
                .object([("id", .int($0.id)), ("shard", .string($0.shard)), ("tokens", .int($0.tokens))])
            })),
        ])
    }
}

/// Why a manifest was rejected: the key path and what was expected.
public struct ManifestError: Error, CustomStringConvertible, Equatable {
    /// What is wrong with the value at `key` (or, with an empty key, with the JSON text).
    public enum Reason: Equatable, Sendable {
        case invalidJSON(JSONError)
        case missing
        case notAString
        case notAnInteger(min: Int, max: Int)
        /// Absent, not a number, or not finite.
        case notANumber
        /// Not an integer in 0...2⁶⁴−1 (`selection.seed`).
        case notAnUnsignedInteger
        /// Not an integer in 0...2⁶⁴−1 (a sequence id).
        case notANonNegativeInteger
        /// `format` is not `moqae-calibration`.
        case unknownFormat(String)
        case unsupportedVersion(Int)
        /// `background.experts` is not one store expert name per layer.
        case invalidBackground(layers: Int)
        /// `first_held_chunks` is not one chunk index in 0...C per layer, with one above 0.
        case invalidFirstHeldChunks(layers: Int, chunks: Int)
        case unknownRouterInput(String)
        case valueGroupNotADivisor(valueGroup: Int, headDim: Int)
        /// `experts` is absent, empty, or longer than 255.
        case invalidExpertList
        case invalidExpertBits(keyBits: Int, valueBits: Int)
        case duplicateExpert(String)
        /// No expert has 16 key and 16 value bits.
        case noUnquantizedExpert
        case unknownSensitivity(String)
        /// `selection.fraction` outside (0, 1].
        case fractionOutOfRange(Double)
        /// `sequences` is absent or empty.
        case noSequences
        /// A shard name that is not a plain `.safetensors` file name inside the store.
        case invalidShardName(String)
        case tokensMismatch(tokens: Int, seqLen: Int)
        case idOutsideCorpus(id: UInt64, sequences: Int)
        case duplicateSequenceID(UInt64)
        /// The id's selection value `u` is not below the store's selection fraction.
        case notInSelection(id: UInt64, u: Double, fraction: Double)

        /// The reason as the command line prints it, after the key.
        public var message: String {
            switch self {
            case let .invalidJSON(error): "\(error)"
            case .missing: "missing"
            case .notAString: "expected a string"
            case let .notAnInteger(min, max): "expected an integer in \(min)...\(max)"
            case .notANumber: "expected a number"
            case .notAnUnsignedInteger: "expected an unsigned 64-bit integer"
            case .notANonNegativeInteger: "expected a non-negative integer"
            case .unknownFormat: "expected \"\(Manifest.format)\""
            case .unsupportedVersion: "expected one of \(Manifest.versions)"
            case let .invalidBackground(layers): "expected \(layers) names of the store's experts, one per layer"
            case let .invalidFirstHeldChunks(layers, chunks):
                "expected \(layers) integers in 0...\(chunks), one per layer, at least one above 0 (version 3)"
            case let .unknownRouterInput(name): "expected one of \(RouterInput.allCases.map(\.rawValue)), got \"\(name)\""
            case let .valueGroupNotADivisor(valueGroup, headDim): "must divide head_dim \(headDim), got \(valueGroup)"
            case .invalidExpertList: "expected a list of 1 to 255 experts"
            case let .invalidExpertBits(keyBits, valueBits): "bits must be 16 or in 1...8, got (\(keyBits), \(valueBits))"
            case let .duplicateExpert(name): "duplicate expert name \"\(name)\""
            case .noUnquantizedExpert: "no expert has 16 key and 16 value bits; delta_nll is measured against one, and reports call it fp16"
            case let .unknownSensitivity(name): "expected one of \(Manifest.sensitivities), got \"\(name)\""
            case let .fractionOutOfRange(fraction): "expected a value in (0, 1], got \(fraction)"
            case .noSequences: "expected a non-empty list"
            case let .invalidShardName(name): "expected a file name ending in .safetensors inside the store, got \"\(name)\""
            case let .tokensMismatch(tokens, seqLen): "expected corpus.seq_len = \(seqLen), got \(tokens)"
            case let .idOutsideCorpus(id, sequences): "id \(id) is outside the corpus of \(sequences) sequences"
            case let .duplicateSequenceID(id): "duplicate sequence id \(id)"
            case let .notInSelection(id, u, fraction): "sequence \(id) is not in the store's selection (u = \(u) >= fraction \(fraction))"
            }
        }
    }

    public let key: String
    public let reason: Reason

    public init(key: String, reason: Reason) {
        self.key = key
        self.reason = reason
    }

    public var description: String { key.isEmpty ? reason.message : "\(key): \(reason.message)" }
}

extension Manifest {
    /// Parses and checks a manifest: every field present with the right type and range, experts valid
    /// and unique, sequence ids unique, inside the corpus and inside the store's selection, and every
    /// sequence exactly `seq_len` tokens in a plain shard file name.
    public static func parse(_ bytes: [UInt8]) throws(ManifestError) -> Manifest {
        let root: JSON
        do { root = try JSON.parse(bytes) } catch { throw ManifestError(key: "", reason: .invalidJSON(error)) }
        let reader = ManifestReader(root: root)

        let formatName = try reader.string("format")
        guard formatName == format else { throw ManifestError(key: "format", reason: .unknownFormat(formatName)) }
        let versionNumber = try reader.int("version")
        guard versions.contains(versionNumber) else { throw ManifestError(key: "version", reason: .unsupportedVersion(versionNumber)) }
        let model = ModelShape(
            name: try reader.string("model.name"),
            numLayers: try reader.int("model.num_layers", min: 1, max: 65535),
            numKVHeads: try reader.int("model.num_kv_heads", min: 1, max: 65535),
            headDim: try reader.int("model.head_dim", min: 1, max: 65535))
        let routerInputName = try reader.string("router_input")
        guard let routerInput = RouterInput(rawValue: routerInputName) else {
            throw ManifestError(key: "router_input", reason: .unknownRouterInput(routerInputName))
        }
        let chunkSize = try reader.int("chunk_size", min: 1, max: 65535)
        let valueGroup = try reader.int("value_group", min: 1, max: model.headDim)
        guard model.headDim % valueGroup == 0 else {
            throw ManifestError(key: "value_group", reason: .valueGroupNotADivisor(valueGroup: valueGroup, headDim: model.headDim))
        }

        guard let expertItems = root["experts"]?.arrayValue, !expertItems.isEmpty, expertItems.count <= 255 else {
            throw ManifestError(key: "experts", reason: .invalidExpertList)
        }
        var experts: [Expert] = []
        for index in expertItems.indices {
            let item = ManifestReader(root: expertItems[index])
            let key = "experts[\(index)]"
            let expert = Expert(
                name: try item.string("name", context: key),
                keyBits: try item.int("key_bits", min: 1, max: 16, context: key),
                valueBits: try item.int("value_bits", min: 1, max: 16, context: key))
            guard Expert.isValidBits(expert.keyBits), Expert.isValidBits(expert.valueBits) else {
                throw ManifestError(key: key, reason: .invalidExpertBits(keyBits: expert.keyBits, valueBits: expert.valueBits))
            }
            guard !experts.contains(where: { $0.name == expert.name }) else {
                throw ManifestError(key: key, reason: .duplicateExpert(expert.name))
            }
            experts.append(expert)
        }
        guard experts.contains(where: \.isUnquantized) else {
            throw ManifestError(key: "experts", reason: .noUnquantizedExpert)
        }

        let sensitivity = try reader.string("sensitivity")
        guard sensitivities.contains(sensitivity) else {
            throw ManifestError(key: "sensitivity", reason: .unknownSensitivity(sensitivity))
        }
        guard let seed = root["selection"]?["seed"]?.uint64Value else {
            throw ManifestError(key: "selection.seed", reason: .notAnUnsignedInteger)
        }
        let fraction = try reader.double("selection.fraction")
        guard fraction > 0, fraction <= 1 else { throw ManifestError(key: "selection.fraction", reason: .fractionOutOfRange(fraction)) }
        let seqLen = try reader.int("corpus.seq_len", min: 1, max: Int(Int32.max))
        let numSequences = try reader.int("corpus.num_sequences", min: 0, max: Int.max)
        var background: Background?
        if versionNumber == 2 || (versionNumber == 3 && root["background"] != nil) {
            let names = root["background"]?["experts"]?.arrayValue?.compactMap(\.stringValue) ?? []
            let indices = names.compactMap { name in experts.firstIndex { $0.name == name } }
            guard indices.count == model.numLayers, names.count == model.numLayers else {
                throw ManifestError(key: "background.experts", reason: .invalidBackground(layers: model.numLayers))
            }
            background = Background(experts: indices, frozenChunks: try reader.int(
                "background.frozen_chunks", min: 0, max: seqLen / chunkSize))
        }
        var firstHeldChunks: [Int]?
        if versionNumber == 3 {
            let items = root["first_held_chunks"]?.arrayValue ?? []
            let chunks = items.compactMap(\.intValue).filter { (0...(seqLen / chunkSize)).contains($0) }
            guard items.count == model.numLayers, chunks.count == model.numLayers, chunks.contains(where: { $0 > 0 }) else {
                throw ManifestError(key: "first_held_chunks",
                                    reason: .invalidFirstHeldChunks(layers: model.numLayers, chunks: seqLen / chunkSize))
            }
            firstHeldChunks = chunks
        }

        guard let sequenceItems = root["sequences"]?.arrayValue, !sequenceItems.isEmpty else {
            throw ManifestError(key: "sequences", reason: .noSequences)
        }
        var sequences: [ManifestSequence] = []
        var seenIDs = Set<UInt64>()
        for index in sequenceItems.indices {
            let item = ManifestReader(root: sequenceItems[index])
            let key = "sequences[\(index)]"
            guard let id = sequenceItems[index]["id"]?.uint64Value else {
                throw ManifestError(key: key + ".id", reason: .notANonNegativeInteger)
            }
            let shard = try item.string("shard", context: key)
            guard isPlainShardName(shard) else {
                throw ManifestError(key: key + ".shard", reason: .invalidShardName(shard))
            }
            let tokens = try item.int("tokens", min: 1, max: Int(Int32.max), context: key)
            guard tokens == seqLen else { throw ManifestError(key: key + ".tokens", reason: .tokensMismatch(tokens: tokens, seqLen: seqLen)) }
            guard id < UInt64(numSequences) else {
                throw ManifestError(key: key + ".id", reason: .idOutsideCorpus(id: id, sequences: numSequences))
            }
            guard seenIDs.insert(id).inserted else { throw ManifestError(key: key + ".id", reason: .duplicateSequenceID(id)) }
            let u = Selection.unitValue(id: id, seed: seed)
            guard u < fraction else {
                throw ManifestError(key: key + ".id", reason: .notInSelection(id: id, u: u, fraction: fraction))
            }
            sequences.append(ManifestSequence(id: id, shard: shard, tokens: tokens))
        }

        return Manifest(
            model: model, routerInput: routerInput, chunkSize: chunkSize, valueGroup: valueGroup, experts: experts,
            sensitivity: sensitivity, selectionSeed: seed, selectionFraction: fraction,
            corpusSource: try reader.string("corpus.source"), tokenizer: try reader.string("corpus.tokenizer"),
            seqLen: seqLen, numSequences: numSequences, sequences: sequences, background: background,
            firstHeldChunks: firstHeldChunks)
    }

    private static func isPlainShardName(_ name: String) -> Bool {
        name.hasSuffix(".safetensors") && !name.contains("/") && !name.hasPrefix(".") && !name.contains("\0")
    }
}

/// Typed access to dotted key paths of a JSON object, with errors that name the path.
private struct ManifestReader {
    let root: JSON

    func value(_ path: String, context: String) throws(ManifestError) -> JSON {
        var node = root
        for component in path.split(separator: ".") {
            guard let next = node[String(component)] else {
                throw ManifestError(key: qualified(path, context), reason: .missing)
            }
            node = next
        }
        return node
    }

    func qualified(_ path: String, _ context: String) -> String { context.isEmpty ? path : context + "." + path }

    func string(_ path: String, context: String = "") throws(ManifestError) -> String {
        guard let text = try value(path, context: context).stringValue else {
            throw ManifestError(key: qualified(path, context), reason: .notAString)
        }
        return text
    }

    func int(_ path: String, min: Int = .min, max: Int = .max, context: String = "") throws(ManifestError) -> Int {
        guard let number = try value(path, context: context).intValue, number >= min, number <= max else {
            throw ManifestError(key: qualified(path, context), reason: .notAnInteger(min: min, max: max))
        }
        return number
    }

    func double(_ path: String, context: String = "") throws(ManifestError) -> Double {
        guard let number = try value(path, context: context).doubleValue, number.isFinite else {
            throw ManifestError(key: qualified(path, context), reason: .notANumber)
        }
        return number
    }
}
