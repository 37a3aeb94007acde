/// The tensors of one sequence to be written to a store.
public struct SequenceTensors {
    public var id: UInt64
    /// `[L, H, T, D]` row-major.
    public var inputs: [Float]
    public var nll: Float
    /// `[L, H, C, M]` row-major.
    public var deltaNLL: [Float]

    public init(id: UInt64, inputs: [Float], nll: Float, deltaNLL: [Float]) {
        self.id = id
        self.inputs = inputs
        self.nll = nll
        self.deltaNLL = deltaNLL
    }
}

/// The loss tensors of a sequence whose inputs `StoreWriter.writeShard` streams layer by layer.
public struct SequenceLossTensors {
    public var id: UInt64
    public var tokens: Int
    public var nll: Float
    /// `[L, H, C, M]` row-major.
    public var deltaNLL: [Float]

    public init(id: UInt64, tokens: Int, nll: Float, deltaNLL: [Float]) {
        self.id = id
        self.tokens = tokens
        self.nll = nll
        self.deltaNLL = deltaNLL
    }
}

/// Writes a `moqae-calibration` store shard by shard: each shard is written atomically, and the
/// manifest last, so a directory with a manifest is complete.
public final class StoreWriter {
    private let directory: String
    private var manifest: Manifest
    private let inputDType: DType
    private let sequencesPerShard: Int
    private var pending: [SequenceTensors] = []
    private var shardCount = 0

    /// - Parameter manifest: everything but `sequences`, which the writer fills in.
    /// - Parameter sequencesPerShard: how many sequences `add` gathers into one shard.
    public init(directory: String, manifest: Manifest, inputDType: DType = .f32, sequencesPerShard: Int = 8) throws(FileError) {
        precondition([.f32, .f16, .bf16].contains(inputDType), "inputs are F32, F16 or BF16")
        try makeDirectories(directory)
        self.directory = directory
        self.manifest = manifest
        self.manifest.sequences = []
        self.inputDType = inputDType
        self.sequencesPerShard = sequencesPerShard
    }

    /// Adds a sequence held in memory; a shard is written once `sequencesPerShard` are gathered.
    public func add(_ sequence: SequenceTensors) throws(FileError) {
        pending.append(sequence)
        if pending.count == sequencesPerShard { try flush() }
    }

    /// Writes one shard at once, streaming each sequence's inputs: `writeInputs(i, layer, out)` fills
    /// `out`, `(H, T, W)`, with layer `layer` of sequence `i`. Memory stays at one layer.
    public func writeShard(_ sequences: [SequenceLossTensors],
                           writeInputs: (_ sequence: Int, _ layer: Int, _ out: UnsafeMutableBufferPointer<Float>) -> Void) throws(FileError) {
        precondition(pending.isEmpty, "writeShard after add without finish")
        let (L, H, W) = (manifest.model.numLayers, manifest.model.numKVHeads, manifest.inputWidth)
        let (C, M) = (manifest.chunksPerSequence, manifest.experts.count)
        let name = "shard-" + String(shardCount).leftPadded(to: 5) + ".safetensors"
        let header = SafeTensorsBuilder.header(tensors: sequences.flatMap { sequence in [
            ("seq.\(sequence.id).inputs", inputDType, [L, H, sequence.tokens, W]),
            ("seq.\(sequence.id).nll", DType.f32, []),
            ("seq.\(sequence.id).delta_nll", DType.f32, [L, H, C, M]),
        ] })
        try AtomicFile.write(to: directory + "/" + name) { (sink) throws(FileError) in
            try sink.write(header)
            for (index, sequence) in sequences.enumerated() {
                var layer = [Float](repeating: 0, count: H * sequence.tokens * W)  // (H, T, W)
                for l in 0..<L {
                    layer.withUnsafeMutableBufferPointer { writeInputs(index, l, $0) }
                    try sink.write(StoreWriter.encode(layer, as: inputDType))
                }
                try sink.write(StoreWriter.encode([sequence.nll], as: .f32))
                try sink.write(StoreWriter.encode(sequence.deltaNLL, as: .f32))
            }
        }
        manifest.sequences += sequences.map { ManifestSequence(id: $0.id, shard: name, tokens: $0.tokens) }
        shardCount += 1
    }

    /// Writes the last shard and then the manifest.
    public func finish() throws(FileError) {
        if !pending.isEmpty { try flush() }
        try AtomicFile.write(Array(manifest.json.serialized.utf8), to: directory + "/manifest.json")
    }

    /// Writes a whole store at once.
    public static func write(_ sequences: [SequenceTensors], manifest: Manifest, inputDType: DType = .f32,
                             sequencesPerShard: Int = 8, to directory: String) throws(FileError) {
        let writer = try StoreWriter(directory: directory, manifest: manifest, inputDType: inputDType, sequencesPerShard: sequencesPerShard)
        for sequence in sequences { try writer.add(sequence) }
        try writer.finish()
    }

    private func flush() throws(FileError) {
        let sequences = pending
        pending = []
        let (L, H, W) = (manifest.model.numLayers, manifest.model.numKVHeads, manifest.inputWidth)
        try writeShard(sequences.map { SequenceLossTensors(id: $0.id, tokens: $0.inputs.count / (L * H * W), nll: $0.nll, deltaNLL: $0.deltaNLL) }) { index, layer, out in
            let layerCount = out.count
            sequences[index].inputs.withUnsafeBufferPointer { inputs in
                _ = out.initialize(from: inputs[(layer * layerCount)..<((layer + 1) * layerCount)])
            }
        }
    }

    /// Little-endian bytes of `values` as F32, F16 (round to nearest even) or BF16 (round to nearest even).
    public static func encode(_ values: [Float], as dtype: DType) -> [UInt8] {
        switch dtype {
        case .f16:
            return [UInt8](unsafeUninitializedCapacity: 2 * values.count) { bytes, initialized in
                if let base = bytes.baseAddress { HalfPrecision.encodeF16(values, count: values.count, into: base) }
                initialized = 2 * values.count
            }
        case .bf16: return values.map(bfloat16Bits).withUnsafeBytes { Array($0) }
        default: return values.withUnsafeBytes { Array($0) }
        }
    }

    static func bfloat16Bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(bits >> 16) | 0x40 }
        let rounding = 0x7FFF + ((bits >> 16) & 1)
        return UInt16((bits &+ rounding) >> 16)
    }
}

extension String {
    public func leftPadded(to width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
