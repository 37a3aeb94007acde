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

/// Writes a `moqae-calibration` store: shards first, each atomically, then the manifest last, so a
/// directory with a manifest is always complete.
public enum StoreWriter {
    /// Writes `sequences` into `directory`, `sequencesPerShard` to a shard, inputs stored as `inputDType`.
    /// `manifest.sequences` is filled in here.
    public static func write(_ sequences: [SequenceTensors], manifest: Manifest, inputDType: DType = .f32,
                             sequencesPerShard: Int = 8, to directory: String) throws(FileError) {
        precondition([.f32, .f16, .bf16].contains(inputDType), "inputs are F32, F16 or BF16")
        try makeDirectories(directory)
        var manifest = manifest
        manifest.sequences = []
        let (L, H, D) = (manifest.model.numLayers, manifest.model.numKVHeads, manifest.model.headDim)
        let (C, M) = (manifest.chunksPerSequence, manifest.experts.count)
        for (shardNumber, start) in stride(from: 0, to: sequences.count, by: sequencesPerShard).enumerated() {
            let name = "shard-" + String(shardNumber).leftPadded(to: 5) + ".safetensors"
            var builder = SafeTensorsBuilder()
            for sequence in sequences[start..<min(start + sequencesPerShard, sequences.count)] {
                let T = sequence.inputs.count / (L * H * D)
                builder.add("seq.\(sequence.id).inputs", dtype: inputDType, shape: [L, H, T, D], bytes: encode(sequence.inputs, as: inputDType))
                builder.add("seq.\(sequence.id).nll", shape: [], floats: [sequence.nll])
                builder.add("seq.\(sequence.id).delta_nll", shape: [L, H, C, M], floats: sequence.deltaNLL)
                manifest.sequences.append(ManifestSequence(id: sequence.id, shard: name, tokens: T))
            }
            try AtomicFile.write(builder.serialized(), to: directory + "/" + name)
        }
        try AtomicFile.write(Array(manifest.json.serialized.utf8), to: directory + "/manifest.json")
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
