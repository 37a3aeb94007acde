import Foundation
import MoQAEExperts
import MoQAERouter
import MoQAEStore

/// Synthetic calibration stores in real model shapes, for tests and benchmarks only: the inputs are
/// random and `delta_nll` follows a toy noise model, so nothing trained on them says anything about
/// a real LLM. A key+value store has inputs twice the head dimension wide, drawn the same way.
///
/// Each (layer, head, chunk) gets a random scale s ∈ [0.25, 2]; its inputs are approximately Gaussian
/// (a sum of four uniforms) with standard deviation s, and its `delta_nll` at expert (kb, vb) is
/// `α · s² · (e(kb) + e(vb))` with `e(b) = 1/(2^b − 1)²` (0 at 16 bits), α set so uniform int2 adds
/// about 0.5 nats. A router can therefore learn that chunks with larger inputs are more sensitive.
///
/// Sequences are written one layer at a time (memory stays at one layer, 32 MB at llama2-7b shape),
/// with the heads of a layer generated in parallel from their own seeds, so the output does not
/// depend on the thread count.
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

    /// Writes `sequences` sequences: the first ids `u(id, seed) < fraction` of a corpus just large
    /// enough, in shards of at most 1 GiB (one sequence per shard when a sequence is larger).
    public static func write(shape: Shape, sequences count: Int, to directory: String, seed: UInt64 = 0, fraction: Double = 0.1,
                             chunkSize: Int = 32, experts: [Expert] = defaultExperts, inputDType: DType = .f16, routerInput: RouterInput = .key,
                             progress: (Int) -> Void = { _ in }) throws(FileError) {
        var ids: [UInt64] = []
        var id: UInt64 = 0
        while ids.count < count {
            if Selection.unitValue(id: id, seed: seed) < fraction { ids.append(id) }
            id += 1
        }
        let (L, H, D, T) = (shape.layers, shape.heads, shape.headDim, shape.tokens)
        let W = routerInput.width(headDim: D)
        let C = T / chunkSize
        func noise(_ bits: Int) -> Double { bits >= 16 ? 0 : 1 / pow(pow(2, Double(bits)) - 1, 2) }
        let meanSquaredScale = (pow(2.0, 3) - pow(0.25, 3)) / (3 * 1.75)
        let alpha = 0.5 / (Double(L * H * C) * 2 * noise(2) * meanSquaredScale)
        let manifest = Manifest(
            model: ModelShape(name: "synthetic-\(shape.name)", numLayers: L, numKVHeads: H, headDim: D), routerInput: routerInput,
            chunkSize: chunkSize, valueGroup: D, experts: experts, sensitivity: "taylor", selectionSeed: seed,
            selectionFraction: fraction, corpusSource: "synthetic (moqae-train synth)", tokenizer: "none",
            seqLen: T, numSequences: Int(id), sequences: [])
        let writer = try StoreWriter(directory: directory, manifest: manifest, inputDType: inputDType)
        let sequencesPerShard = max(1, (1 << 30) / (L * H * T * W * inputDType.byteSize))
        var written = 0
        for shardIDs in stride(from: 0, to: ids.count, by: sequencesPerShard).map({ ids[$0..<min(ids.count, $0 + sequencesPerShard)] }) {
            // Per sequence: the scale of every (layer, head, chunk), and the loss tensors that follow from it.
            var scales: [[Float]] = []  // [sequence] (L, H, C)
            var lossTensors: [SequenceLossTensors] = []
            for id in shardIDs {
                var random = RandomGenerator(seed: seed ^ 0x5EED ^ (id &* 0x9E37_79B9_7F4A_7C15))
                let scale = (0..<(L * H * C)).map { _ in random.uniform(0.25, 2) }
                let delta = scale.flatMap { s in experts.map { Float(alpha * Double(s * s) * (noise($0.keyBits) + noise($0.valueBits))) } }
                scales.append(scale)
                lossTensors.append(SequenceLossTensors(id: id, tokens: T, nll: 2 + random.uniform(-0.2, 0.2), deltaNLL: delta))
            }
            try writer.writeShard(lossTensors) { [scales, lossTensors] index, layer, out in
                guard let start = out.baseAddress else { return }   // an empty layer: nothing to write
                let base = UncheckedSendable(start)
                let id = lossTensors[index].id, scales = scales[index]
                DispatchQueue.concurrentPerform(iterations: H) { head in
                    var random = RandomGenerator(seed: seed ^ (id &* 0xD1B5_4A32_D192_ED03) ^ UInt64(layer * H + head) &* 0x9E37_79B9_7F4A_7C15)
                    let rows = base.value + head * T * W
                    for t in 0..<T {
                        let c = t / chunkSize
                        let s = c < C ? scales[(layer * H + head) * C + c] : 1
                        for d in 0..<W { rows[t * W + d] = s * approximateGaussian(&random) }
                    }
                }
                if layer == L - 1 {
                    written += 1
                    progress(written)
                }
            }
        }
        try writer.finish()
    }

    /// Mean 0, variance 1: the sum of four 16-bit uniforms from one draw, centred and scaled by √3.
    private static func approximateGaussian(_ random: inout RandomGenerator) -> Float {
        let bits = random.next()
        let sum = Float(bits & 0xFFFF) + Float((bits >> 16) & 0xFFFF) + Float((bits >> 32) & 0xFFFF) + Float(bits >> 48)
        return (sum * 0x1p-16 - 2) * 1.7320508
    }
}
