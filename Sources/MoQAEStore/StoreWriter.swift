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

/// Writes a `moqae-calibration` store shard by shard: each shard is written atomically once it holds
/// `sequencesPerShard` sequences, and the manifest last, so a directory with a manifest is complete.
public final class StoreWriter {
    private let directory: String
    private var manifest: Manifest
    private let inputDType: DType
    private let sequencesPerShard: Int
    private var pending = SafeTensorsBuilder()
    private var pendingCount = 0

    /// - Parameter manifest: everything but `sequences`, which the writer fills in.
    public init(directory: String, manifest: Manifest, inputDType: DType = .f32, sequencesPerShard: Int = 8) throws(FileError) {
        precondition([.f32, .f16, .bf16].contains(inputDType), "inputs are F32, F16 or BF16")
        try makeDirectories(directory)
        self.directory = directory
        self.manifest = manifest
        self.manifest.sequences = []
        self.inputDType = inputDType
        self.sequencesPerShard = sequencesPerShard
    }

    public func add(_ sequence: SequenceTensors) throws(FileError) {
        let (L, H, D) = (manifest.model.numLayers, manifest.model.numKVHeads, manifest.model.headDim)
        let (C, M) = (manifest.chunksPerSequence, manifest.experts.count)
        let T = sequence.inputs.count / (L * H * D)
        pending.add("seq.\(sequence.id).inputs", dtype: inputDType, shape: [L, H, T, D], bytes: StoreWriter.encode(sequence.inputs, as: inputDType))
        pending.add("seq.\(sequence.id).nll", shape: [], floats: [sequence.nll])
        pending.add("seq.\(sequence.id).delta_nll", shape: [L, H, C, M], floats: sequence.deltaNLL)
        manifest.sequences.append(ManifestSequence(id: sequence.id, shard: shardName, tokens: T))
        pendingCount += 1
        if pendingCount == sequencesPerShard { try flush() }
    }

    /// Writes the last shard and then the manifest.
    public func finish() throws(FileError) {
        if pendingCount > 0 { try flush() }
        try AtomicFile.write(Array(manifest.json.serialized.utf8), to: directory + "/manifest.json")
    }

    /// Writes a whole store at once.
    public static func write(_ sequences: [SequenceTensors], manifest: Manifest, inputDType: DType = .f32,
                             sequencesPerShard: Int = 8, to directory: String) throws(FileError) {
        let writer = try StoreWriter(directory: directory, manifest: manifest, inputDType: inputDType, sequencesPerShard: sequencesPerShard)
        for sequence in sequences { try writer.add(sequence) }
        try writer.finish()
    }

    private var shardName: String {
        let shards = Set(manifest.sequences.map(\.shard)).count - (pendingCount > 0 ? 1 : 0)
        return "shard-" + String(shards).leftPadded(to: 5) + ".safetensors"
    }

    private func flush() throws(FileError) {
        try AtomicFile.write(pending.serialized(), to: directory + "/" + shardName)
        pending = SafeTensorsBuilder()
        pendingCount = 0
    }

    /// Little-endian bytes of `values` as F32, F16 (round to nearest even) or BF16 (round to nearest even).
    public static func encode(_ values: [Float], as dtype: DType) -> [UInt8] {
        switch dtype {
        case .f16: return values.map { Float16($0).bitPattern }.withUnsafeBytes { Array($0) }
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
