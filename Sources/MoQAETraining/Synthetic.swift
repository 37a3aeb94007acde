import Foundation
import MoQAERouter
import MoQAEStore

/// Synthetic calibration stores in real model shapes, for tests and benchmarks only: the inputs are
/// random and `delta_nll` follows a toy noise model, so nothing trained on them says anything about
/// a real LLM.
///
/// Each (layer, head, chunk) gets a random scale s ∈ [0.25, 2]; its inputs are Gaussian with standard
/// deviation s, and its `delta_nll` at expert (kb, vb) is `α · s² · (e(kb) + e(vb))` with
/// `e(b) = 1/(2^b − 1)²` (0 at 16 bits), α set so uniform int2 adds about 0.5 nats. A router can
/// therefore learn that chunks with larger inputs are more sensitive.
public enum SyntheticStore {
    public struct Shape: Sendable {
        public let name: String
        public let layers: Int, heads: Int, headDim: Int, tokens: Int

        public init(name: String, layers: Int, heads: Int, headDim: Int, tokens: Int) {
            self.name = name
            self.layers = layers
            self.heads = heads
            self.headDim = headDim
            self.tokens = tokens
        }
    }

    public static let shapes: [Shape] = [
        Shape(name: "tiny", layers: 4, heads: 2, headDim: 64, tokens: 512),
        Shape(name: "llama2-7b", layers: 32, heads: 32, headDim: 128, tokens: 4096),
        Shape(name: "llama3-8b", layers: 32, heads: 8, headDim: 128, tokens: 4096),
    ]

    public static let defaultExperts = [
        Expert(name: "fp16", keyBits: 16, valueBits: 16), Expert(name: "int4", keyBits: 4, valueBits: 4),
        Expert(name: "int2", keyBits: 2, valueBits: 2),
    ]

    /// Writes `sequences` sequences: the first ids `u(id, seed) < fraction` of a corpus just large enough.
    public static func write(shape: Shape, sequences count: Int, to directory: String, seed: UInt64 = 0, fraction: Double = 0.1,
                             chunkSize: Int = 32, experts: [Expert] = defaultExperts, inputDType: DType = .f16,
                             progress: (Int) -> Void = { _ in }) throws(FileError) {
        var ids: [UInt64] = []
        var id: UInt64 = 0
        while ids.count < count {
            if Selection.unitValue(id: id, seed: seed) < fraction { ids.append(id) }
            id += 1
        }
        let (L, H, D, T) = (shape.layers, shape.heads, shape.headDim, shape.tokens)
        let C = T / chunkSize, M = experts.count
        func noise(_ bits: Int) -> Double { bits >= 16 ? 0 : 1 / pow(pow(2, Double(bits)) - 1, 2) }
        let meanSquaredScale = (pow(2.0, 3) - pow(0.25, 3)) / (3 * 1.75)
        let alpha = 0.5 / (Double(L * H * C) * 2 * noise(2) * meanSquaredScale)
        var random = RandomGenerator(seed: seed ^ 0x5EED)
        let manifest = Manifest(
            model: ModelShape(name: "synthetic-\(shape.name)", numLayers: L, numKVHeads: H, headDim: D),
            chunkSize: chunkSize, valueGroup: D, experts: experts, sensitivity: "taylor", selectionSeed: seed,
            selectionFraction: fraction, corpusSource: "synthetic (moqae-train synth)", tokenizer: "none",
            seqLen: T, numSequences: Int(id), sequences: [])
        let writer = try StoreWriter(directory: directory, manifest: manifest, inputDType: inputDType,
                                     sequencesPerShard: max(1, (1 << 30) / (L * H * T * D * inputDType.byteSize)))
        for (index, id) in ids.enumerated() {
            var inputs = [Float](repeating: 0, count: L * H * T * D)
            var delta = [Float](repeating: 0, count: L * H * C * M)
            var scale: Float = 1
            for l in 0..<L {
                for h in 0..<H {
                    for t in 0..<T {
                        let c = t / chunkSize
                        if t % chunkSize == 0, c < C {
                            scale = random.uniform(0.25, 2)
                            for (e, expert) in experts.enumerated() {
                                delta[((l * H + h) * C + c) * M + e] = Float(alpha * Double(scale * scale) * (noise(expert.keyBits) + noise(expert.valueBits)))
                            }
                        }
                        let row = ((l * H + h) * T + t) * D
                        for d in 0..<D { inputs[row + d] = (c < C ? scale : 1) * gaussian(&random) }
                    }
                }
            }
            try writer.add(SequenceTensors(id: id, inputs: inputs, nll: 2 + Float(random.uniform(-0.2, 0.2)), deltaNLL: delta))
            progress(index + 1)
        }
        try writer.finish()
    }

    private static func gaussian(_ random: inout RandomGenerator) -> Float {
        let u1 = max(Float(random.next() >> 40) * 0x1p-24, 0x1p-25), u2 = Float(random.next() >> 40) * 0x1p-24
        return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }
}
