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

/// The SPEC §4 loss of one sequence and the figures it was built from.
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

/// Builds the paper's loss for one sequence on `tape`:
///
///     L_model = (1/U) Σ_u P_u[R_u] · L_nll / B_{R_u}      L_mem = (1/U) Σ_u P_u[R_u] · B_{R_u} / 16
///
/// Decisions `R_u` and `L_nll` are computed from the forward values first and enter as constants, so
/// gradients reach the routers only through `P_u[R_u]`, the chunk-mean probability of the decision.
///
/// - Parameter inputs: per router, its leader layer's routed rows `(layout.rowsPerRouter, D)`.
public func sequenceLoss(tape: Tape, layout: RoutingLayout, routers: [RouterVariables], inputs: [Variable],
                         nll: Float, sensitivity: SensitivityTable, experts: [Expert], lambda: Double) -> SequenceLoss {
    let U = Double(layout.unitsPerSequence)
    let tokenProbabilities = zip(routers, inputs).map { weights, x in routerForward(tape: tape, inputs: x, weights: weights) }
    let decisions = tokenProbabilities.map { chunkDecisions(probabilities: $0.value, chunkSize: layout.chunkSize, experts: experts) }
    let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)

    var modelTerm: Variable?
    var memoryTerm: Variable?
    for (p, routerDecisions) in zip(tokenProbabilities, decisions) {
        let chosen = tape.pick(tape.meanOfRowGroups(p, groupSize: layout.chunkSize), columns: routerDecisions)
        let model = tape.weightedSum(chosen, weights: routerDecisions.map { Float(lNLL / (U * experts[$0].bitWidth)) })
        let memory = tape.weightedSum(chosen, weights: routerDecisions.map { Float(experts[$0].bitWidth / (16 * U)) })
        modelTerm = modelTerm.map { tape.add($0, model) } ?? model
        memoryTerm = memoryTerm.map { tape.add($0, memory) } ?? memory
    }
    let loss = tape.add(tape.scale(modelTerm!, by: Float(lambda)), tape.scale(memoryTerm!, by: Float(1 - lambda)))
    return SequenceLoss(loss: loss, modelTerm: Double(modelTerm!.value[0]), memoryTerm: Double(memoryTerm!.value[0]),
                        estimatedNLL: lNLL, decisions: decisions)
}
