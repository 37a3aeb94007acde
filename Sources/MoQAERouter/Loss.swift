import MoQAEStore

/// `delta_nll` of one sequence, `[L, H, C, storeExperts]` as stored, read through the columns of the
/// experts the router chooses among.
public struct SensitivityTable: Sendable {
    /// `(L, H, C, storeExperts)` row-major.
    public let values: [Float]
    public let heads: Int
    public let chunks: Int
    public let storeExperts: Int
    /// Store column of each router expert.
    public let columns: [Int]

    public init(values: [Float], heads: Int, chunks: Int, storeExperts: Int, columns: [Int]) {
        self.values = values
        self.heads = heads
        self.chunks = chunks
        self.storeExperts = storeExperts
        self.columns = columns
    }

    @inline(__always)
    public func delta(layer: Int, head: Int, chunk: Int, expert: Int) -> Float {
        values[((layer * heads + head) * chunks + chunk) * storeExperts + columns[expert]]
    }

    /// `D_u[j] = Σ_{l in layers} delta_nll[l, head, chunk, j]`: what choosing expert j for the unit
    /// costs over the layers its decision holds for.
    public func unitDelta(layers: Range<Int>, head: Int, chunk: Int, expert: Int) -> Float {
        layers.reduce(0) { $0 + delta(layer: $1, head: head, chunk: chunk, expert: expert) }
    }

    /// `(units, M)` row-major: `D_u[j]` of every unit of `router`, in the layout's unit order.
    public func unitDeltas(router: Int, layout: RoutingLayout) -> [Float] {
        (0..<layout.unitsPerRouter).flatMap { unit in
            let (head, chunk) = layout.headAndChunk(ofUnit: unit)
            return columns.indices.map { unitDelta(layers: layout.layers(of: router), head: head, chunk: chunk, expert: $0) }
        }
    }
}

/// Which loss trains the routers.
public enum LossKind: String, CaseIterable, Sendable {
    /// docs/FORMATS.md, Losses, the paper's: every unit is pushed by the sequence's `L_nll` and its chosen expert's bits.
    case paper
    /// The expected per-unit cost: each unit is pushed by its own `delta_nll`, for every expert.
    case expected
}

/// A loss and its trade-off λ between accuracy (1) and memory (0).
public struct LossSettings: Equatable, Sendable {
    public var kind: LossKind
    public var lambda: Double

    public init(kind: LossKind = .paper, lambda: Double) {
        self.kind = kind
        self.lambda = lambda
    }
}

/// `L_nll(s) = nll(s) + Σ_u Σ_{layers l of u's group} delta_nll[l, head, c, R_u]`.
///
/// - Parameter decisions: `[router][unit]` expert indices.
public func estimatedNLL(nll: Float, decisions: [[Int]], layout: RoutingLayout, sensitivity: SensitivityTable) -> Double {
    var total = Double(nll)
    for (router, routerDecisions) in decisions.enumerated() {
        for (unit, expert) in routerDecisions.enumerated() {
            let (head, chunk) = layout.headAndChunk(ofUnit: unit)
            for layer in layout.layers(of: router) {
                total += Double(sensitivity.delta(layer: layer, head: head, chunk: chunk, expert: expert))
            }
        }
    }
    return total
}

/// The loss of one sequence and the figures it was built from.
public struct SequenceLoss {
    /// `(1, 1)`: `λ L_model + (1 − λ) L_mem`.
    public let loss: Variable
    public let modelTerm: Double
    public let memoryTerm: Double
    /// `L_nll(s)`, a constant for the gradient.
    public let estimatedNLL: Double
    /// `[router][unit]` expert indices, constants for the gradient.
    public let decisions: [[Int]]
}

/// Builds the loss of one sequence on `tape`. The paper's (docs/FORMATS.md, Losses):
///
///     L_model = (1/U) Σ_u P_u[R_u] · L_nll / B_{R_u}      L_mem = (1/U) Σ_u P_u[R_u] · B_{R_u} / 16
///
/// Decisions `R_u` and `L_nll` are computed from the forward values first and enter as constants, so
/// gradients reach the routers only through `P_u`, the chunk's probability under the layout's pooling
/// (`ChunkPooling`; the paper's is the chunk-mean probability).
///
/// The expected per-unit cost, with `D_u[j]` the unit's `delta_nll` for expert j summed over its group:
///
///     L_model = Σ_u Σ_j P_u[j] · D_u[j]                  L_mem = (1/U) Σ_u Σ_j P_u[j] · B_j / 16
///
/// Both give `λ L_model + (1 − λ) L_mem`.
///
/// - Parameter inputs: per router, its leader layer's routed rows `(layout.rowsPerRouter, D)`.
public func sequenceLoss(tape: Tape, layout: RoutingLayout, routers: [RouterVariables], inputs: [Variable],
                         nll: Float, sensitivity: SensitivityTable, experts: [Expert], loss settings: LossSettings) -> SequenceLoss {
    let U = Double(layout.unitsPerSequence)
    let chunks = zip(routers, inputs).map { weights, x in
        chunkProbabilities(tape: tape, inputs: x, weights: weights, chunkSize: layout.chunkSize, pooling: layout.pooling, experts: experts)
    }
    let decisions = chunks.map(\.decisions)
    let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)

    var modelTerm: Variable?
    var memoryTerm: Variable?
    for (router, (unitProbabilities, routerDecisions)) in chunks.enumerated() {  // P_u: (units, M)
        let model: Variable, memory: Variable
        switch settings.kind {
        case .paper:
            let chosen = tape.pick(unitProbabilities, columns: routerDecisions)
            model = tape.weightedSum(chosen, weights: routerDecisions.map { Float(lNLL / (U * experts[$0].bitWidth)) })
            memory = tape.weightedSum(chosen, weights: routerDecisions.map { Float(experts[$0].bitWidth / (16 * U)) })
        case .expected:
            model = tape.weightedSum(unitProbabilities, weights: sensitivity.unitDeltas(router: router, layout: layout))
            memory = tape.weightedSum(unitProbabilities, weights: (0..<layout.unitsPerRouter).flatMap { _ in experts.map { Float($0.bitWidth / (16 * U)) } })
        }
        modelTerm = modelTerm.map { tape.add($0, model) } ?? model
        memoryTerm = memoryTerm.map { tape.add($0, memory) } ?? memory
    }
    let lambda = settings.lambda
    let loss = tape.add(tape.scale(modelTerm!, by: Float(lambda)), tape.scale(memoryTerm!, by: Float(1 - lambda)))
    return SequenceLoss(loss: loss, modelTerm: Double(modelTerm!.value[0]), memoryTerm: Double(memoryTerm!.value[0]),
                        estimatedNLL: lNLL, decisions: decisions)
}
