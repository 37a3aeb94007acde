import COpenBLAS
import MoQAEStore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The SPEC §4 loss and its weight gradient for one sequence in a single streaming pass over its
/// inputs: blocks of whole chunks go forward and backward while they are in cache, and no block
/// is read twice. The tape (`sequenceLoss`) computes the same loss and is the reference this pass is
/// tested against.
///
/// A unit's loss weight `c_u = λ·L_nll/(U·B_R) + (1−λ)·B_R/(16U)` needs `L_nll`, which is known only
/// once every unit of the sequence is decided. Backward is linear in that weight, so each block is
/// pushed back with weight 1 and its weight gradients are accumulated in two parts,
/// A with weights `λ/(U·B_R)` and B with weights `(1−λ)·B_R/(16U)`; the sequence's gradient is
/// `L_nll·A + B`.
///
/// One instance per worker thread; buffers are allocated once, never per block or token.
public final class StreamingPass {
    public let layout: RoutingLayout
    public let experts: [Expert]
    /// Chunks per block (fewer in a head's last block).
    public let blockChunks: Int

    private let D: Int, M: Int, N: Int
    /// Per router `(D, 2M)`: row d is `W1[d, :] ++ W2[d, :]`.
    private var w12: [Float]
    /// Per router `(M, M)`.
    private var w3: [Float]
    /// `(blockChunks·N, D)`: the rows of the block being processed; the caller fills it.
    public var block: [Float]
    /// `(blockChunks·N, 2M)`: `x·[W1 W2]`, pre-activations a | b.
    private var preactivations: [Float]
    /// `(blockChunks·N, M)` each: σ(a), h = SiLU(a) ⊙ b, p = softmax(h W3).
    private var sigmoids: [Float], hidden: [Float], probabilities: [Float]
    /// `(blockChunks·N, 4M)`: per row `[α·∂/∂a, α·∂/∂b, β·∂/∂a, β·∂/∂b]` of its unit's chosen probability.
    private var rowGradients: [Float]
    /// Per router `(D, 4M)`: `blockᵀ · rowGradients` summed over the sequence.
    private var partsW12: [Float]
    /// Per router `(M, 2M)`: row j is `[A(j, :), B(j, :)]` of `hᵀ dz` summed over the sequence.
    private var partsW3: [Float]
    /// `[router][unit]` decisions of the current sequence.
    public private(set) var decisions: [[Int]]
    private var lambda = 0.0
    /// Σ_u P_u[R_u] / B_{R_u} and Σ_u P_u[R_u] · B_{R_u} over the sequence.
    private var chosenOverBits = 0.0, chosenTimesBits = 0.0

    public init(layout: RoutingLayout, experts: [Expert], blockChunks: Int = 32) {
        self.layout = layout
        self.experts = experts
        self.blockChunks = max(1, min(blockChunks, layout.routedChunksPerHead))
        (D, M, N) = (layout.inputDim, experts.count, layout.chunkSize)
        let rows = self.blockChunks * N, R = layout.routers
        w12 = [Float](repeating: 0, count: R * D * 2 * M)
        w3 = [Float](repeating: 0, count: R * M * M)
        block = [Float](repeating: 0, count: rows * D)
        preactivations = [Float](repeating: 0, count: rows * 2 * M)
        sigmoids = [Float](repeating: 0, count: rows * M)
        hidden = [Float](repeating: 0, count: rows * M)
        probabilities = [Float](repeating: 0, count: rows * M)
        rowGradients = [Float](repeating: 0, count: rows * 4 * M)
        partsW12 = [Float](repeating: 0, count: R * D * 4 * M)
        partsW3 = [Float](repeating: 0, count: R * M * 2 * M)
        decisions = Array(repeating: Array(repeating: 0, count: layout.unitsPerRouter), count: R)
    }

    /// Starts a sequence with the current weights.
    public func begin(parameters: RouterParameters, lambda: Double) {
        self.lambda = lambda
        for r in 0..<layout.routers {
            let (e1, e2, e3) = (parameters.entry(router: r, "w1"), parameters.entry(router: r, "w2"), parameters.entry(router: r, "w3"))
            for d in 0..<D {
                for j in 0..<M {
                    w12[(r * D + d) * 2 * M + j] = parameters.values[e1.offset + d * M + j]
                    w12[(r * D + d) * 2 * M + M + j] = parameters.values[e2.offset + d * M + j]
                }
            }
            for i in 0..<(M * M) { w3[r * M * M + i] = parameters.values[e3.offset + i] }
        }
        for i in partsW12.indices { partsW12[i] = 0 }
        for i in partsW3.indices { partsW3[i] = 0 }
        chosenOverBits = 0
        chosenTimesBits = 0
    }

    /// Routes the `chunks` chunks in `block` (of router `router`, head `head`, starting at chunk
    /// `firstChunk`) and, when `backward`, adds their gradient parts.
    public func process(router: Int, head: Int, firstChunk: Int, chunks: Int, backward: Bool) {
        precondition(chunks <= blockChunks && firstChunk >= layout.firstRoutedChunk && firstChunk + chunks <= layout.chunks)
        let (D, M, N) = (self.D, self.M, self.N)
        let rows = chunks * N
        let firstUnit = head * layout.routedChunksPerHead + firstChunk - layout.firstRoutedChunk
        let U = Double(layout.unitsPerSequence)
        block.withUnsafeBufferPointer { x in
        preactivations.withUnsafeMutableBufferPointer { ab in
        sigmoids.withUnsafeMutableBufferPointer { s in
        hidden.withUnsafeMutableBufferPointer { h in
        probabilities.withUnsafeMutableBufferPointer { p in
        rowGradients.withUnsafeMutableBufferPointer { g in
        w12.withUnsafeBufferPointer { w12 in
        w3.withUnsafeBufferPointer { w3All in
            let w3 = w3All.baseAddress! + router * M * M
            matmulForward(ab.baseAddress!, x.baseAddress!, w12.baseAddress! + router * D * 2 * M, n: rows, k: D, m: 2 * M)
            routerHeadForward(ab.baseAddress!, w3: w3, sigmoids: s.baseAddress!, hidden: h.baseAddress!,
                              probabilities: p.baseAddress!, rows: rows, experts: M)
            for c in 0..<chunks {
                let chunkRows = c * N
                let choice = chunkDecision(probabilities: p.baseAddress! + chunkRows * M, chunkSize: N, experts: experts)
                decisions[router][firstUnit + c] = choice
                guard backward else { continue }
                var chosen: Float = 0
                for t in 0..<N { chosen += p[(chunkRows + t) * M + choice] }
                let bits = experts[choice].bitWidth
                chosenOverBits += Double(chosen / Float(N)) / bits
                chosenTimesBits += Double(chosen / Float(N)) * bits
                let weightA = Float(lambda / (U * bits)), weightB = Float((1 - lambda) * bits / (16 * U))
                partsW3.withUnsafeMutableBufferPointer { parts in
                    routerHeadBackward(chunk: chunkRows, rows: N, choice: choice, preactivations: ab.baseAddress!, w3: w3,
                                       sigmoids: s.baseAddress!, hidden: h.baseAddress!, probabilities: p.baseAddress!,
                                       experts: M, weightA: weightA, weightB: weightB,
                                       rowGradients: g.baseAddress!, partsW3: parts.baseAddress! + router * M * 2 * M)
                }
            }
            guard backward else { return }
            partsW12.withUnsafeMutableBufferPointer { parts in
                matmulBackwardWeight(parts.baseAddress! + router * D * 4 * M, g.baseAddress!, x.baseAddress!, n: rows, k: D, m: 4 * M)
            }
        }}}}}}}}
    }

    /// Ends the sequence: its loss terms, `L_nll(s)`, and `scale ×` its gradient written (not added)
    /// into `gradient`, laid out like `RouterParameters.values`.
    public func finish(nll: Float, sensitivity: SensitivityTable, scale: Double,
                       gradient: UnsafeMutablePointer<Float>) -> (loss: Double, modelTerm: Double, memoryTerm: Double, estimatedNLL: Double) {
        let U = Double(layout.unitsPerSequence)
        let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)
        let modelTerm = lNLL * chosenOverBits / U, memoryTerm = chosenTimesBits / (16 * U)
        let (a, b) = (Float(scale * lNLL), Float(scale))
        var offset = 0
        for r in 0..<layout.routers {
            let parts = r * D * 4 * M
            for d in 0..<D {
                for j in 0..<M {
                    let row = parts + d * 4 * M
                    gradient[offset + d * M + j] = a * partsW12[row + j] + b * partsW12[row + 2 * M + j]
                    gradient[offset + D * M + d * M + j] = a * partsW12[row + M + j] + b * partsW12[row + 3 * M + j]
                }
            }
            offset += 2 * D * M
            for i in 0..<M {
                for j in 0..<M {
                    let row = r * M * 2 * M + i * 2 * M
                    gradient[offset + i * M + j] = a * partsW3[row + j] + b * partsW3[row + M + j]
                }
            }
            offset += M * M
        }
        return (lambda * modelTerm + (1 - lambda) * memoryTerm, modelTerm, memoryTerm, lNLL)
    }
}

/// Per row of `(a | b) (rows, 2M)`: σ(a), h = SiLU(a) ⊙ b, p = softmax(h W3), each `(rows, M)`.
@inline(__always)
private func routerHeadForward(_ ab: UnsafePointer<Float>, w3: UnsafePointer<Float>, sigmoids: UnsafeMutablePointer<Float>,
                               hidden: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>, rows: Int, experts M: Int) {
    for t in 0..<rows {
        let a = ab + t * 2 * M, b = a + M
        let s = sigmoids + t * M, h = hidden + t * M, p = probabilities + t * M
        for j in 0..<M {
            s[j] = sigmoid(a[j])
            h[j] = a[j] * s[j] * b[j]
        }
        for k in 0..<M {
            var z: Float = 0
            for j in 0..<M { z += h[j] * w3[j * M + k] }
            p[k] = z
        }
        var maximum = p[0]
        for k in 1..<M { maximum = max(maximum, p[k]) }
        var sum: Float = 0
        for k in 0..<M {
            p[k] = expf(p[k] - maximum)
            sum += p[k]
        }
        for k in 0..<M { p[k] /= sum }
    }
}

/// Backward of one chunk's chosen probability `P[R] = (1/N) Σ_t p_t[R]` with weight 1: per row, the
/// gradients with respect to a and b, scaled by `weightA` and `weightB` into `rowGradients (rows, 4M)`,
/// and `weightA·hᵀdz`, `weightB·hᵀdz` added into `partsW3 (M, 2M)`.
@inline(__always)
private func routerHeadBackward(chunk firstRow: Int, rows: Int, choice R: Int, preactivations ab: UnsafePointer<Float>, w3: UnsafePointer<Float>,
                                sigmoids: UnsafePointer<Float>, hidden: UnsafePointer<Float>, probabilities: UnsafePointer<Float>,
                                experts M: Int, weightA: Float, weightB: Float,
                                rowGradients: UnsafeMutablePointer<Float>, partsW3: UnsafeMutablePointer<Float>) {
    let seed = 1 / Float(rows)
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * M + M * M) { scratch in
        let dz = scratch.baseAddress!, dh = dz + M, dzW3Sum = dh + M  // (M), (M), (M, M)
        for i in 0..<(M * M) { dzW3Sum[i] = 0 }
        for t in firstRow..<(firstRow + rows) {
            let a = ab + t * 2 * M, b = a + M
            let s = sigmoids + t * M, h = hidden + t * M, p = probabilities + t * M
            // dz = p ⊙ (e_R − p_R) / N: softmax backward of dp = e_R / N.
            for k in 0..<M { dz[k] = p[k] * ((k == R ? 1 : 0) - p[R]) * seed }
            for j in 0..<M {
                var sum: Float = 0
                for k in 0..<M {
                    sum += dz[k] * w3[j * M + k]
                    dzW3Sum[j * M + k] += h[j] * dz[k]
                }
                dh[j] = sum
            }
            let g = rowGradients + t * 4 * M
            for j in 0..<M {
                let da = dh[j] * b[j] * s[j] * (1 + a[j] * (1 - s[j]))
                let db = dh[j] * a[j] * s[j]
                g[j] = weightA * da
                g[M + j] = weightA * db
                g[2 * M + j] = weightB * da
                g[3 * M + j] = weightB * db
            }
        }
        for j in 0..<M {
            for k in 0..<M {
                partsW3[j * 2 * M + k] += weightA * dzW3Sum[j * M + k]
                partsW3[j * 2 * M + M + k] += weightB * dzW3Sum[j * M + k]
            }
        }
    }
}
