import CRouterKernels
import MoQAEExperts
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A sequence's loss (`LossKind`) and its weight gradient in a single streaming pass over its
/// inputs: blocks of whole chunks go forward and backward while they are in cache, and no block
/// is read twice. The tape (`sequenceLoss`, module `MoQAEReference`) computes the same losses and is
/// the reference this pass is tested against.
///
/// Each chunk goes backward from an upstream vector `dL/dP_u` into the gradient part of its chosen
/// expert R, and the sequence's gradient is `Σ_R c(R)·part(R)`:
/// - paper loss: a unit's weight `c(R) = λ·L_nll/(U·B_R) + (1−λ)·B_R/(16U)` needs `L_nll`, known only
///   once every unit is decided. It depends on the unit only through R and backward is linear in it,
///   so the chunk goes back with upstream `e_R` and `c(R)` is applied at the end;
/// - expected loss: the upstream `λ·D_u[j] + (1−λ)·B_j/(16U)` is known at once, and `c(R) = 1`.
///
/// One instance per worker thread; its buffers are allocated once, at init, and held for its life
/// (`PinnedBuffer`), so the kernels take their pointers directly, never per block or token.
public final class StreamingPass {
    public let layout: RoutingLayout
    public let experts: [Expert]
    /// Chunks per block (fewer in a head's last block).
    public let blockChunks: Int
    /// A sequence's blocks in the order they are streamed: router by router, head by head.
    public let blocks: [Block]

    /// The routed chunks `firstChunk ..< firstChunk + chunks` of one head of one router's leader layer.
    public struct Block: Sendable {
        public let router: Int, head: Int, firstChunk: Int, chunks: Int
        public let tokens: Range<Int>
    }

    /// D, M, N, and H the routers' hidden width.
    private let D: Int, M: Int, N: Int, H: Int, rows: Int
    /// Whether the kernels use their wide register tiles (this CPU has AVX-512).
    private let wideTiles = moqae_router_wide_tiles()
    /// Per router `(2H, D)`: row j is column j of `[W1 W2]`.
    private let w12t: PinnedBuffer<Float>
    /// Per router `(H, M)`.
    private let w3: PinnedBuffer<Float>
    /// `(blockChunks·N, D)`: the rows of the block being processed; the caller fills it.
    public let block: PinnedBuffer<Float>
    // Per-token values are stored column-major, `(M, rows)`, `(H, rows)` or `(2H, rows)`, so every
    // elementwise loop runs over contiguous tokens and vectorises.
    /// `(2H, rows)`: pre-activations a = x·W1 then b = x·W2.
    private let preactivations: PinnedBuffer<Float>
    /// `(H, rows)` each: σ(a), h = SiLU(a) ⊙ b.
    private let sigmoids: PinnedBuffer<Float>, hidden: PinnedBuffer<Float>
    /// `(M, rows)`: p = softmax(h W3).
    private let probabilities: PinnedBuffer<Float>
    /// `(max(2·rows, (M + 3H + 1)·N))`: the forward's softmax maxima and sums, or a chunk's backward intermediates.
    private let scratch: PinnedBuffer<Float>
    /// `(rows)`: each token's argmax expert.
    private let tokenChoices: PinnedBuffer<Int32>
    /// Per router and chosen expert `(2H, D)`: the gradient of `[W1 W2]`, transposed, over the sequence's chunks that chose it.
    private let partsW12: PinnedBuffer<Float>
    /// Per router and chosen expert `(H, M)`: `hᵀ dz` over the sequence's chunks that chose it.
    private let partsW3: PinnedBuffer<Float>
    /// `(M)`: a chunk's `P_u`, and the upstream gradient `dL/dP_u` it goes backward from.
    private let unitProbabilities: PinnedBuffer<Float>, upstream: PinnedBuffer<Float>
    /// Pooled chunks (`ChunkPooling.mean`, `.max`): `(M, N)` the chunk's `log p`, then `dL/dz` of its
    /// tokens; `(M)` the token of each expert's maximum.
    private let chunkLogits: PinnedBuffer<Float>, maxTokens: PinnedBuffer<Int>
    /// `[router][unit]` decisions of the current sequence.
    public private(set) var decisions: [[Int]]
    /// Set by `process` when a block's token probabilities are not all finite: its inputs hold a NaN or
    /// an infinity (a cheap check, M values per token, as each block is used).
    public private(set) var sawNonFiniteInputs = false
    private var loss = LossSettings(lambda: 0)
    /// An export's bits price (`RouterExport.bitsPrice`): token logits z_j − price · bits_j decide (forward only).
    private var bitsPrice: Float = 0
    private var sensitivity: SensitivityTable?
    /// Over the sequence. Paper: Σ_u P_u[R_u] / B_{R_u} and Σ_u P_u[R_u] · B_{R_u}.
    /// Expected: Σ_u Σ_j P_u[j] · D_u[j] and Σ_u Σ_j P_u[j] · B_j.
    private var modelSum = 0.0, bitsSum = 0.0

    /// - Parameter hiddenWidth: H (nil: M, the paper's).
    public init(layout: RoutingLayout, experts: [Expert], hiddenWidth: Int? = nil, blockChunks: Int) {
        self.layout = layout
        self.experts = experts
        let longest = (0..<layout.routers).map(layout.routedChunksPerHead(of:)).max() ?? 0
        let blockChunks = max(1, min(blockChunks, longest))
        self.blockChunks = blockChunks
        blocks = (0..<layout.routers).flatMap { router in
            (0..<layout.heads).flatMap { head in
                stride(from: layout.firstRoutedChunk(of: router), to: layout.chunks, by: blockChunks).map { first in
                    let chunks = min(blockChunks, layout.chunks - first)
                    return Block(router: router, head: head, firstChunk: first, chunks: chunks,
                                 tokens: (first * layout.chunkSize)..<((first + chunks) * layout.chunkSize))
                }
            }
        }
        let (D, M, N, H) = (layout.inputDim, experts.count, layout.chunkSize, hiddenWidth ?? experts.count)
        let (R, rows) = (layout.routers, blockChunks * N)
        (self.D, self.M, self.N, self.H, self.rows) = (D, M, N, H, rows)
        w12t = PinnedBuffer(count: R * 2 * H * D)
        w3 = PinnedBuffer(count: R * H * M)
        block = PinnedBuffer(count: rows * D)
        preactivations = PinnedBuffer(count: 2 * H * rows)
        sigmoids = PinnedBuffer(count: H * rows)
        hidden = PinnedBuffer(count: H * rows)
        probabilities = PinnedBuffer(count: M * rows)
        scratch = PinnedBuffer(count: max(2 * rows, (M + 3 * H + 1) * N))
        tokenChoices = PinnedBuffer(count: rows)
        partsW12 = PinnedBuffer(count: R * M * 2 * H * D)
        partsW3 = PinnedBuffer(count: R * M * H * M)
        unitProbabilities = PinnedBuffer(count: M)
        upstream = PinnedBuffer(count: M)
        chunkLogits = PinnedBuffer(count: M * N)
        maxTokens = PinnedBuffer(count: M)
        decisions = (0..<R).map { Array(repeating: 0, count: layout.units(of: $0)) }
    }

    /// Starts a sequence with the current weights; `sensitivity` is the sequence's `delta_nll`.
    public func begin(parameters: RouterParameters, loss: LossSettings, sensitivity: SensitivityTable?, bitsPrice: Float = 0) {
        self.loss = loss
        self.bitsPrice = bitsPrice
        self.sensitivity = sensitivity
        sawNonFiniteInputs = false
        precondition(parameters.hidden == H && parameters.experts == M, "weights of hidden width \(parameters.hidden) for a pass of \(H)")
        for r in 0..<layout.routers {
            let (e1, e2, e3) = (parameters.entry(router: r, .w1), parameters.entry(router: r, .w2), parameters.entry(router: r, .w3))
            for d in 0..<D {
                for j in 0..<H {
                    w12t[(r * 2 * H + j) * D + d] = parameters.values[e1.offset + d * H + j]
                    w12t[(r * 2 * H + H + j) * D + d] = parameters.values[e2.offset + d * H + j]
                }
            }
            for i in 0..<(H * M) { w3[r * H * M + i] = parameters.values[e3.offset + i] }
        }
        partsW12.fill(0)
        partsW3.fill(0)
        modelSum = 0
        bitsSum = 0
    }

    /// Token probabilities `p (M, stride)` become softmax(z − price · bits) in place, from log p_j − price ·
    /// bits_j, and each token's choice their argmax (the lowest index among equals).
    private func applyBitsPrice(_ p: UnsafeMutablePointer<Float>, stride: Int, rows: Int, tokenChoices: UnsafeMutablePointer<Int32>) {
        let prices = experts.map { Float(Double(bitsPrice) * $0.bitWidth) }
        for t in 0..<rows {
            var best = 0
            for j in 0..<M {
                p[j * stride + t] = log(p[j * stride + t]) - prices[j]
                if p[j * stride + t] > p[best * stride + t] { best = j }
            }
            let top = p[best * stride + t]
            var total: Float = 0
            for j in 0..<M { p[j * stride + t] = exp(p[j * stride + t] - top); total += p[j * stride + t] }
            for j in 0..<M { p[j * stride + t] /= total }
            tokenChoices[t] = Int32(best)
        }
    }

    /// Routes the `chunks` chunks in `block` (of router `router`, head `head`, starting at chunk
    /// `firstChunk`) and, when `backward`, adds their gradient parts (which needs the sensitivity).
    /// The kernels bring `prefetch` (the next block's stored inputs) into the CPU cache meanwhile:
    /// the forward the first half, the chunks' backward passes a share each of the rest.
    public func process(router: Int, head: Int, firstChunk: Int, chunks: Int, backward: Bool, prefetch: UnsafeRawBufferPointer?) {
        precondition(chunks <= blockChunks && firstChunk >= layout.firstRoutedChunk(of: router) && firstChunk + chunks <= layout.chunks)
        precondition(!backward || sensitivity != nil, "backward needs the sequence's sensitivity")
        precondition(!backward || bitsPrice == 0, "a bits price only decides; training has none")
        let (D, M, N, H, stride) = (self.D, self.M, self.N, self.H, self.rows)
        let rows = chunks * N
        let firstUnit = head * layout.routedChunksPerHead(of: router) + firstChunk - layout.firstRoutedChunk(of: router)
        let x = block.pointer                                                   // (rows, D)
        let (ab, s, h, p) = (preactivations.pointer, sigmoids.pointer, hidden.pointer, probabilities.pointer)
        let (w12, w3) = (w12t.pointer + router * 2 * H * D, self.w3.pointer + router * H * M)
        let (unitP, upstream) = (unitProbabilities.pointer, self.upstream.pointer)   // (M) each
        let prefetchBytes = prefetch?.count ?? 0
        let forwardPrefetch = backward ? prefetchBytes / 2 : prefetchBytes
        // Chunk c's share of the bytes after the forward's.
        func backwardPrefetch(_ c: Int) -> (start: UnsafeRawPointer?, count: Int) {
            let (first, end) = ((prefetchBytes - forwardPrefetch) * c / chunks, (prefetchBytes - forwardPrefetch) * (c + 1) / chunks)
            return (prefetch?.baseAddress.map { $0 + forwardPrefetch + first }, end - first)
        }

        // Forward: a, b = x·W1, x·W2 (2H, rows); h = SiLU(a) ⊙ b; p = softmax(h·W3) (M, rows); each token's argmax.
        moqae_router_forward(x, rows, D, M, H, w12, w3, stride, ab, s, h, p, tokenChoices.pointer, scratch.pointer, wideTiles,
                             prefetch?.baseAddress, forwardPrefetch)
        if !(0..<M).allSatisfy({ j in (0..<rows).allSatisfy { p[j * stride + $0].isFinite } }) { sawNonFiniteInputs = true }
        if bitsPrice != 0 { applyBitsPrice(p, stride: stride, rows: rows, tokenChoices: tokenChoices.pointer) }

        for c in 0..<chunks {
            // The chunk's decision R_u and P_u (M) under the layout's pooling.
            let chunkRows = (c * N)..<((c + 1) * N)
            let choice: Int
            if layout.pooling == .vote {
                choice = chunkChoice(experts: experts) { counts in
                    for t in chunkRows { counts[Int(tokenChoices[t])] += 1 }
                }
            } else {
                poolChunk(p + chunkRows.lowerBound, stride: stride, logP: chunkLogits.pointer, maxTokens: maxTokens.pointer, unitP: unitP)
                choice = pooledChoice(UnsafeBufferPointer(start: unitP, count: M), experts: experts)
            }
            decisions[router][firstUnit + c] = choice
            guard backward else { continue }
            if layout.pooling == .vote {
                for j in 0..<M {
                    var sum: Float = 0
                    for t in chunkRows { sum += p[j * stride + t] }
                    unitP[j] = sum / Float(N)
                }
            }

            // The loss terms and the upstream dL/dP_u (M).
            switch loss.kind {
            case .paper:
                let bits = experts[choice].bitWidth
                modelSum += Double(unitP[choice]) / bits
                bitsSum += Double(unitP[choice]) * bits
                for j in 0..<M { upstream[j] = j == choice ? 1 : 0 }
            case .expected:
                guard let sensitivity else { preconditionFailure("backward with the expected loss needs the sequence's sensitivity") }
                let (unitLayers, chunk, U) = (layout.layers(of: router), firstChunk + c, Double(layout.unitsPerSequence))
                for (j, expert) in experts.enumerated() {
                    let delta = Double(sensitivity.unitDelta(layers: unitLayers, head: head, chunk: chunk, expert: j))
                    modelSum += Double(unitP[j]) * delta
                    bitsSum += Double(unitP[j]) * expert.bitWidth
                    upstream[j] = Float(loss.combined(model: delta, memory: UnitLossWeight.memory(expert: expert, units: U)))
                }
            }

            // Backward into the gradient part of the chosen expert: (2H, D) and (H, M).
            let (part, first, share) = (router * M + choice, chunkRows.lowerBound, backwardPrefetch(c))
            let (part12, part3) = (partsW12.pointer + part * 2 * H * D, partsW3.pointer + part * H * M)
            if layout.pooling == .vote {
                moqae_router_backward_chunk(x + first * D, N, D, M, H, w3, stride, ab + first, s + first, h + first, p + first,
                                            upstream, scratch.pointer, part12, part3, wideTiles, share.start, share.count)
            } else {
                pooledLogitGradient(p + first, stride: stride, unitP: unitP, upstream: upstream, maxTokens: maxTokens.pointer,
                                    logitGradient: chunkLogits.pointer)
                moqae_router_backward_chunk_logits(x + first * D, N, D, M, H, w3, stride, ab + first, s + first, h + first,
                                                   chunkLogits.pointer, scratch.pointer, part12, part3, wideTiles, share.start, share.count)
            }
        }
    }

    /// A pooled chunk's forward: `logP (M, N)` = log p of its tokens (p: the chunk's first token in the
    /// forward's `(M, stride)` buffer), the pooled scores `s_j` (`.mean`: mean over tokens; `.max`:
    /// maximum, its token in `maxTokens`), and `unitP (M)` = softmax(s).
    private func poolChunk(_ p: UnsafePointer<Float>, stride: Int, logP: UnsafeMutablePointer<Float>,
                           maxTokens: UnsafeMutablePointer<Int>, unitP: UnsafeMutablePointer<Float>) {
        let (M, N) = (self.M, self.N)
        var maximum = -Float.infinity
        for j in 0..<M {
            var score: Float = layout.pooling == .mean ? 0 : -.infinity
            for t in 0..<N {
                let l = logf(p[j * stride + t])
                logP[j * N + t] = l
                if layout.pooling == .mean {
                    score += l
                } else if l > score {
                    score = l
                    maxTokens[j] = t
                }
            }
            unitP[j] = layout.pooling == .mean ? score / Float(N) : score
            maximum = max(maximum, unitP[j])
        }
        var sum: Float = 0
        for j in 0..<M {
            unitP[j] = expf(unitP[j] - maximum)
            sum += unitP[j]
        }
        for j in 0..<M { unitP[j] /= sum }
    }

    /// A pooled chunk's backward to its token logits: `ds = P ⊙ (g − ⟨P, g⟩)` through the softmax of the
    /// scores, `dℓ` (`.mean`: ds/N on every token; `.max`: ds on each expert's maximum token), then
    /// `dz_t = dℓ_t − p_t Σ_j dℓ_tj` through each token's log-softmax, written to `logitGradient (M, N)`.
    private func pooledLogitGradient(_ p: UnsafePointer<Float>, stride: Int, unitP: UnsafePointer<Float>, upstream: UnsafePointer<Float>,
                                     maxTokens: UnsafePointer<Int>, logitGradient dz: UnsafeMutablePointer<Float>) {
        let (M, N) = (self.M, self.N)
        var inner: Float = 0
        for j in 0..<M { inner += unitP[j] * upstream[j] }
        for t in 0..<N {
            var total: Float = 0
            for j in 0..<M {
                let ds = unitP[j] * (upstream[j] - inner)
                let dl = layout.pooling == .mean ? ds / Float(N) : (maxTokens[j] == t ? ds : 0)
                dz[j * N + t] = dl
                total += dl
            }
            for k in 0..<M { dz[k * N + t] -= p[k * stride + t] * total }
        }
    }

    /// Ends a sequence streamed with `backward`: its loss terms, `L_nll(s)`, and `scale ×` its gradient
    /// written (not added) into `gradient`, laid out like `RouterParameters.values`.
    public func finish(nll: Float, scale: Double,
                       gradient: UnsafeMutablePointer<Float>) -> (loss: Double, modelTerm: Double, memoryTerm: Double, estimatedNLL: Double) {
        guard let sensitivity else { preconditionFailure("finish needs a sequence begun with its sensitivity") }
        let U = Double(layout.unitsPerSequence)
        let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)
        let memoryTerm = bitsSum / (16 * U)
        let modelTerm: Double
        // c(R) of each expert, times scale.
        let weights: [Float]
        switch loss.kind {
        case .paper:
            modelTerm = lNLL * modelSum / U
            weights = experts.map {
                Float(scale * loss.combined(model: UnitLossWeight.paperModel(estimatedNLL: lNLL, expert: $0, units: U),
                                            memory: UnitLossWeight.memory(expert: $0, units: U)))
            }
        case .expected:
            modelTerm = modelSum
            weights = experts.map { _ in Float(scale) }
        }
        var offset = 0
        for r in 0..<layout.routers {
            for i in 0..<(2 * D * H + H * M) { gradient[offset + i] = 0 }
            for k in 0..<M {
                let (part12, part3, c) = ((r * M + k) * 2 * H * D, (r * M + k) * H * M, weights[k])
                for d in 0..<D {
                    for j in 0..<H {
                        gradient[offset + d * H + j] += c * partsW12[part12 + j * D + d]
                        gradient[offset + D * H + d * H + j] += c * partsW12[part12 + (H + j) * D + d]
                    }
                }
                for i in 0..<(H * M) { gradient[offset + 2 * D * H + i] += c * partsW3[part3 + i] }
            }
            offset += 2 * D * H + H * M
        }
        return (loss.combined(model: modelTerm, memory: memoryTerm), modelTerm, memoryTerm, lNLL)
    }
}

/// A buffer of `count` elements, allocated once and zeroed, freed with its owner: a pass hands its
/// pointer to the kernels directly, with no closure around each use.
public final class PinnedBuffer<Element: AdditiveArithmetic> {
    public let pointer: UnsafeMutablePointer<Element>
    public let count: Int

    public init(count: Int) {
        self.count = count
        pointer = .allocate(capacity: max(1, count))
        pointer.initialize(repeating: .zero, count: max(1, count))
    }

    deinit {
        pointer.deinitialize(count: max(1, count))
        pointer.deallocate()
    }

    public subscript(index: Int) -> Element {
        get { pointer[index] }
        set { pointer[index] = newValue }
    }

    public func fill(_ value: Element) { pointer.update(repeating: value, count: count) }
}
