import COpenBLAS
import MoQAEStore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A sequence's loss (`LossKind`) and its weight gradient in a single streaming pass over its
/// inputs: blocks of whole chunks go forward and backward while they are in cache, and no block
/// is read twice. The tape (`sequenceLoss`) computes the same losses and is the reference this pass
/// is tested against.
///
/// Each chunk goes backward from an upstream vector `dL/dP_u` into the gradient part of its chosen
/// expert R, and the sequence's gradient is `Σ_R c(R)·part(R)`:
/// - paper loss: a unit's weight `c(R) = λ·L_nll/(U·B_R) + (1−λ)·B_R/(16U)` needs `L_nll`, known only
///   once every unit is decided. It depends on the unit only through R and backward is linear in it,
///   so the chunk goes back with upstream `e_R` and `c(R)` is applied at the end;
/// - expected loss: the upstream `λ·D_u[j] + (1−λ)·B_j/(16U)` is known at once, and `c(R) = 1`.
///
/// One instance per worker thread; buffers are allocated once, never per block or token.
public final class StreamingPass {
    public let layout: RoutingLayout
    public let experts: [Expert]
    /// Chunks per block (fewer in a head's last block).
    public let blockChunks: Int

    private let D: Int, M: Int, N: Int, rows: Int
    /// Per router `(D, 2M)`: row d is `W1[d, :] ++ W2[d, :]`.
    private var w12: [Float]
    /// Per router `(M, M)`.
    private var w3: [Float]
    /// `(blockChunks·N, D)`: the rows of the block being processed; the caller fills it.
    public var block: [Float]
    // Per-token values are stored expert-major, `(M, rows)` or `(2M, rows)`, so every elementwise
    // loop runs over contiguous tokens and vectorises.
    /// `(2M, rows)`: `[W1 W2]ᵀ · blockᵀ`, pre-activations a then b.
    private var preactivations: [Float]
    /// `(M, rows)` each: σ(a), h = SiLU(a) ⊙ b, p = softmax(h W3).
    private var sigmoids: [Float], hidden: [Float], probabilities: [Float]
    /// `(2M, rows)`: per token `∂/∂a, ∂/∂b` of its unit's chosen probability.
    private var rowGradients: [Float]
    /// `(rows, 2M)`: the forward product before it is made expert-major.
    private var rowMajorPreactivations: [Float]
    /// `(2M, rows)`: softmax maxima and sums of a block, or dz and dh of a chunk.
    private var scratch: [Float]
    /// `(rows)`: each token's argmax expert.
    private var tokenChoices: [Int32]
    /// Per router and chosen expert `(2M, D)`: `rowGradients · block` over the sequence's chunks that chose it.
    private var partsW12: [Float]
    /// Per router and chosen expert `(M, M)`: `hᵀ dz` over the sequence's chunks that chose it.
    private var partsW3: [Float]
    /// `(M)`: a chunk's `P_u`, and the upstream gradient `dL/dP_u` it goes backward from.
    private var unitProbabilities: [Float], upstream: [Float]
    /// `[router][unit]` decisions of the current sequence.
    public private(set) var decisions: [[Int]]
    private var loss = LossSettings(lambda: 0)
    private var sensitivity: SensitivityTable?
    /// Over the sequence. Paper: Σ_u P_u[R_u] / B_{R_u} and Σ_u P_u[R_u] · B_{R_u}.
    /// Expected: Σ_u Σ_j P_u[j] · D_u[j] and Σ_u Σ_j P_u[j] · B_j.
    private var modelSum = 0.0, bitsSum = 0.0

    public init(layout: RoutingLayout, experts: [Expert], blockChunks: Int) {
        self.layout = layout
        self.experts = experts
        self.blockChunks = max(1, min(blockChunks, layout.routedChunksPerHead))
        (D, M, N) = (layout.inputDim, experts.count, layout.chunkSize)
        rows = self.blockChunks * N
        let R = layout.routers
        w12 = [Float](repeating: 0, count: R * 2 * M * D)
        w3 = [Float](repeating: 0, count: R * M * M)
        block = [Float](repeating: 0, count: rows * D)
        preactivations = [Float](repeating: 0, count: 2 * M * rows)
        sigmoids = [Float](repeating: 0, count: M * rows)
        hidden = [Float](repeating: 0, count: M * rows)
        probabilities = [Float](repeating: 0, count: M * rows)
        rowGradients = [Float](repeating: 0, count: 2 * M * rows)
        rowMajorPreactivations = [Float](repeating: 0, count: rows * 2 * M)
        scratch = [Float](repeating: 0, count: 2 * max(M, 2) * rows)
        tokenChoices = [Int32](repeating: 0, count: rows)
        partsW12 = [Float](repeating: 0, count: R * M * 2 * M * D)
        partsW3 = [Float](repeating: 0, count: R * M * M * M)
        unitProbabilities = [Float](repeating: 0, count: M)
        upstream = [Float](repeating: 0, count: M)
        decisions = Array(repeating: Array(repeating: 0, count: layout.unitsPerRouter), count: R)
    }

    /// Starts a sequence with the current weights; `sensitivity` is the sequence's `delta_nll`.
    public func begin(parameters: RouterParameters, loss: LossSettings, sensitivity: SensitivityTable?) {
        self.loss = loss
        self.sensitivity = sensitivity
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
        modelSum = 0
        bitsSum = 0
    }

    /// Routes the `chunks` chunks in `block` (of router `router`, head `head`, starting at chunk
    /// `firstChunk`) and, when `backward`, adds their gradient parts (which needs the sensitivity).
    public func process(router: Int, head: Int, firstChunk: Int, chunks: Int, backward: Bool) {
        precondition(chunks <= blockChunks && firstChunk >= layout.firstRoutedChunk && firstChunk + chunks <= layout.chunks)
        precondition(!backward || sensitivity != nil, "backward needs the sequence's sensitivity")
        let (D, M, N, stride) = (self.D, self.M, self.N, self.rows)
        let rows = chunks * N
        let firstUnit = head * layout.routedChunksPerHead + firstChunk - layout.firstRoutedChunk
        block.withUnsafeBufferPointer { x in
        preactivations.withUnsafeMutableBufferPointer { ab in
        sigmoids.withUnsafeMutableBufferPointer { s in
        hidden.withUnsafeMutableBufferPointer { h in
        probabilities.withUnsafeMutableBufferPointer { p in
        rowGradients.withUnsafeMutableBufferPointer { g in
        rowMajorPreactivations.withUnsafeMutableBufferPointer { rowMajor in
        scratch.withUnsafeMutableBufferPointer { scratch in
        tokenChoices.withUnsafeMutableBufferPointer { tokenChoices in
        w12.withUnsafeBufferPointer { w12 in
        w3.withUnsafeBufferPointer { w3All in
        unitProbabilities.withUnsafeMutableBufferPointer { unitP in
        upstream.withUnsafeMutableBufferPointer { upstream in
            let w3 = w3All.baseAddress! + router * M * M
            let tokens = TokenColumns(stride: stride, preactivations: ab.baseAddress!, sigmoids: s.baseAddress!,
                                      hidden: h.baseAddress!, probabilities: p.baseAddress!, experts: M)
            // (rows, 2M) = block (rows, D) · [W1 W2] (D, 2M), then to expert-major (2M, rows).
            matmulForward(rowMajor.baseAddress!, x.baseAddress!, w12.baseAddress! + router * D * 2 * M, n: rows, k: D, m: 2 * M)
            for j in 0..<(2 * M) {
                let (column, row) = (ab.baseAddress! + j * stride, rowMajor.baseAddress! + j)
                for t in 0..<rows { column[t] = row[t &* (2 &* M)] }
            }
            routerHeadForward(tokens, w3: w3, range: 0..<rows, scratch: scratch.baseAddress!)
            tokens.argmax(0..<rows, into: tokenChoices.baseAddress!)
            for c in 0..<chunks {
                let chunkRows = (c * N)..<((c + 1) * N)
                let choice = chunkChoice(experts: experts) { counts in
                    for t in chunkRows { counts[Int(tokenChoices[t])] += 1 }
                }
                decisions[router][firstUnit + c] = choice
                guard backward else { continue }
                for j in 0..<M {
                    var sum: Float = 0
                    for t in chunkRows { sum += p[j * stride + t] }
                    unitP[j] = sum / Float(N)
                }
                switch loss.kind {
                case .paper:
                    let bits = experts[choice].bitWidth
                    modelSum += Double(unitP[choice]) / bits
                    bitsSum += Double(unitP[choice]) * bits
                    for j in 0..<M { upstream[j] = j == choice ? 1 : 0 }
                case .expected:
                    let (unitLayers, chunk, U) = (layout.layers(of: router), firstChunk + c, Double(layout.unitsPerSequence))
                    for (j, expert) in experts.enumerated() {
                        let delta = Double(sensitivity!.unitDelta(layers: unitLayers, head: head, chunk: chunk, expert: j))
                        modelSum += Double(unitP[j]) * delta
                        bitsSum += Double(unitP[j]) * expert.bitWidth
                        upstream[j] = Float(loss.lambda * delta + (1 - loss.lambda) * expert.bitWidth / (16 * U))
                    }
                }
                let part = router * M + choice
                partsW3.withUnsafeMutableBufferPointer { parts in
                    routerHeadBackward(tokens, w3: w3, chunk: chunkRows, upstream: upstream.baseAddress!, scratch: scratch.baseAddress!,
                                       rowGradients: g.baseAddress!, partW3: parts.baseAddress! + part * M * M)
                }
                // part (2M, D) += rowGradients (2M, N) · chunk rows (N, D)
                partsW12.withUnsafeMutableBufferPointer { parts in
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(2 * M), Int32(D), Int32(N),
                                1, g.baseAddress! + chunkRows.lowerBound, Int32(stride), x.baseAddress! + chunkRows.lowerBound * D, Int32(D),
                                1, parts.baseAddress! + part * 2 * M * D, Int32(D))
                }
            }
        }}}}}}}}}}}}}
    }

    /// Ends a sequence streamed with `backward`: its loss terms, `L_nll(s)`, and `scale ×` its gradient
    /// written (not added) into `gradient`, laid out like `RouterParameters.values`.
    public func finish(nll: Float, scale: Double,
                       gradient: UnsafeMutablePointer<Float>) -> (loss: Double, modelTerm: Double, memoryTerm: Double, estimatedNLL: Double) {
        let U = Double(layout.unitsPerSequence), lambda = loss.lambda
        let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity!)
        let memoryTerm = bitsSum / (16 * U)
        let modelTerm: Double
        // c(R) of each expert, times scale.
        let weights: [Float]
        switch loss.kind {
        case .paper:
            modelTerm = lNLL * modelSum / U
            weights = experts.map { Float(scale * (lambda * lNLL / (U * $0.bitWidth) + (1 - lambda) * $0.bitWidth / (16 * U))) }
        case .expected:
            modelTerm = modelSum
            weights = experts.map { _ in Float(scale) }
        }
        var offset = 0
        for r in 0..<layout.routers {
            for i in 0..<(2 * D * M + M * M) { gradient[offset + i] = 0 }
            for k in 0..<M {
                let (part12, part3, c) = ((r * M + k) * 2 * M * D, (r * M + k) * M * M, weights[k])
                for d in 0..<D {
                    for j in 0..<M {
                        gradient[offset + d * M + j] += c * partsW12[part12 + j * D + d]
                        gradient[offset + D * M + d * M + j] += c * partsW12[part12 + (M + j) * D + d]
                    }
                }
                for i in 0..<(M * M) { gradient[offset + 2 * D * M + i] += c * partsW3[part3 + i] }
            }
            offset += 2 * D * M + M * M
        }
        return (lambda * modelTerm + (1 - lambda) * memoryTerm, modelTerm, memoryTerm, lNLL)
    }
}

/// The per-token buffers of a block, expert-major: column j of token t is at `j·stride + t`.
private struct TokenColumns {
    let stride: Int
    /// `(2M, stride)`: a then b.
    let preactivations: UnsafeMutablePointer<Float>
    /// `(M, stride)` each.
    let sigmoids: UnsafeMutablePointer<Float>, hidden: UnsafeMutablePointer<Float>, probabilities: UnsafeMutablePointer<Float>
    let experts: Int

    func a(_ j: Int) -> UnsafeMutablePointer<Float> { preactivations + j * stride }
    func b(_ j: Int) -> UnsafeMutablePointer<Float> { preactivations + (experts + j) * stride }
    func s(_ j: Int) -> UnsafeMutablePointer<Float> { sigmoids + j * stride }
    func h(_ j: Int) -> UnsafeMutablePointer<Float> { hidden + j * stride }
    func p(_ j: Int) -> UnsafeMutablePointer<Float> { probabilities + j * stride }

    /// Each token's argmax expert, the lowest index among equal probabilities (as `chunkDecisions`).
    func argmax(_ range: Range<Int>, into choices: UnsafeMutablePointer<Int32>) {
        var t = range.lowerBound
        while t + 8 <= range.upperBound {
            var best = UnsafeRawPointer(p(0) + t).loadUnaligned(as: SIMD8<Float>.self)
            var choice = SIMD8<Int32>()
            for j in 1..<experts {
                let pj = UnsafeRawPointer(p(j) + t).loadUnaligned(as: SIMD8<Float>.self)
                let better = pj .> best
                best.replace(with: pj, where: better)
                choice.replace(with: Int32(j), where: better)
            }
            UnsafeMutableRawPointer(choices + t).storeBytes(of: choice, as: SIMD8<Int32>.self)
            t += 8
        }
        for t in t..<range.upperBound {
            var best: Int32 = 0
            for j in 1..<experts where p(j)[t] > p(Int(best))[t] { best = Int32(j) }
            choices[t] = best
        }
    }
}

/// σ(a), h = SiLU(a) ⊙ b and p = softmax(h W3) for the tokens in `range`; `scratch` holds `2·range.count`.
private func routerHeadForward(_ tokens: TokenColumns, w3: UnsafePointer<Float>, range: Range<Int>, scratch: UnsafeMutablePointer<Float>) {
    let M = tokens.experts
    for j in 0..<M {
        let (a, b, s, h) = (tokens.a(j), tokens.b(j), tokens.s(j), tokens.h(j))
        for t in range {
            s[t] = 1 / (1 + vectorizableExp(-a[t]))
            h[t] = a[t] * s[t] * b[t]
        }
    }
    for k in 0..<M {
        let z = tokens.p(k)
        for t in range { z[t] = 0 }
        for j in 0..<M {
            let (h, weight) = (tokens.h(j), w3[j * M + k])
            for t in range { z[t] += h[t] * weight }
        }
    }
    // Softmax over k of each token, max-subtracted.
    let maximum = scratch - range.lowerBound, sum = maximum + range.count
    for t in range { maximum[t] = tokens.p(0)[t] }
    for k in 1..<M {
        let z = tokens.p(k)
        for t in range { maximum[t] = max(maximum[t], z[t]) }
    }
    for t in range { sum[t] = 0 }
    for k in 0..<M {
        let z = tokens.p(k)
        for t in range {
            z[t] = vectorizableExp(z[t] - maximum[t])
            sum[t] += z[t]
        }
    }
    for k in 0..<M {
        let p = tokens.p(k)
        for t in range { p[t] /= sum[t] }
    }
}

/// Backward of one chunk's `P = (1/N) Σ_t p_t` from the upstream gradient `dL/dP (M)`: the gradients
/// with respect to a and b into `rowGradients (2M, stride)`, and `hᵀdz` added into `partW3 (M, M)`.
private func routerHeadBackward(_ tokens: TokenColumns, w3: UnsafePointer<Float>, chunk: Range<Int>, upstream: UnsafePointer<Float>,
                                scratch: UnsafeMutablePointer<Float>, rowGradients g: UnsafeMutablePointer<Float>,
                                partW3: UnsafeMutablePointer<Float>) {
    let M = tokens.experts, stride = tokens.stride
    // Pointers below are offset to the chunk's first token, so loops run over 0..<n.
    let (first, n) = (chunk.lowerBound, chunk.count)
    let seed = 1 / Float(n)
    let dz = scratch, dh = scratch + M * n  // (M, n) each
    // dz = p ⊙ (dP − ⟨p, dP⟩) / N: softmax backward of dp = dP / N. ⟨p, dP⟩ goes in dh's place until dh is computed.
    let inner = dh
    for t in 0..<n { inner[t] = 0 }
    for j in 0..<M {
        let (p, weight) = (tokens.p(j) + first, upstream[j])
        for t in 0..<n { inner[t] += p[t] * weight }
    }
    for k in 0..<M {
        let (p, dzk, weight) = (tokens.p(k) + first, dz + k * n, upstream[k])
        for t in 0..<n { dzk[t] = p[t] * (weight - inner[t]) * seed }
    }
    for j in 0..<M {
        let (dhj, h) = (dh + j * n, tokens.h(j) + first)
        for t in 0..<n { dhj[t] = 0 }
        for k in 0..<M {
            let (dzk, weight) = (dz + k * n, w3[j * M + k])
            for t in 0..<n { dhj[t] += dzk[t] * weight }
            partW3[j * M + k] += dot(h, dzk, count: n)
        }
        let (a, b, s) = (tokens.a(j) + first, tokens.b(j) + first, tokens.s(j) + first)
        let (ga, gb) = (g + j * stride + first, g + (M + j) * stride + first)
        for t in 0..<n {
            ga[t] = dhj[t] * b[t] * s[t] * (1 + a[t] * (1 - s[t]))
            gb[t] = dhj[t] * a[t] * s[t]
        }
    }
}

/// Σ a[i]·b[i], in eight interleaved partial sums so that it vectorises.
@inline(__always)
private func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) -> Float {
    var sums = SIMD8<Float>()
    var i = 0
    while i + 8 <= count {
        sums += UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
        i += 8
    }
    var total = sums.sum()
    while i < count {
        total += a[i] * b[i]
        i += 1
    }
    return total
}

/// eˣ to about 2 ulp, branch-free and trap-free so loops that call it vectorise (the Cephes expf
/// polynomial): x = n·ln 2 + r with |r| ≤ ln 2 / 2, eʳ by a degree-6 polynomial, 2ⁿ through the
/// exponent bits. Inputs are clamped to [−87.3, 88.3], where the result is a normal float.
@inline(__always)
func vectorizableExp(_ x: Float) -> Float {
    let x = min(max(x, -87.3), 88.3)
    // Adding 1.5·2²³ rounds to an integer n, held in the low mantissa bits: bits = 0x4B40_0000 + n.
    let shifted = x * 1.442_695_04 + 12_582_912
    let n = shifted - 12_582_912
    let r = (x - n * 0.693_359_375) + n * 2.121_944_4e-4
    var p: Float = 1.987_569_15e-4
    p = p * r + 1.398_199_95e-3
    p = p * r + 8.333_451_9e-3
    p = p * r + 4.166_579_59e-2
    p = p * r + 0.166_666_655
    p = p * r + 0.500_000_012
    let er = p * r * r + r + 1
    return er * Float(bitPattern: (shifted.bitPattern &- 0x4B40_0000 &+ 127) &<< 23)
}
