import MoQAEExperts
import MoQAERouter

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
/// - Parameter inputs: per router, its leader layer's routed rows `(layout.rows(of: router), D)`.
public func sequenceLoss(tape: Tape, layout: RoutingLayout, routers: [RouterVariables], inputs: [Variable],
                         nll: Float, sensitivity: SensitivityTable, experts: [Expert], loss settings: LossSettings) -> SequenceLoss {
    let U = Double(layout.unitsPerSequence)
    let chunks = zip(routers, inputs).map { weights, x in
        chunkProbabilities(tape: tape, inputs: x, weights: weights, chunkSize: layout.chunkSize, pooling: layout.pooling, experts: experts)
    }
    let decisions = chunks.map(\.decisions)
    let lNLL = estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)

    var modelTerms: [Variable] = [], memoryTerms: [Variable] = []  // per router, (1, 1)
    for (router, (unitProbabilities, routerDecisions)) in chunks.enumerated() {  // P_u: (units, M)
        switch settings.kind {
        case .paper:
            let chosen = tape.pick(unitProbabilities, columns: routerDecisions)
            modelTerms.append(tape.weightedSum(chosen, weights: routerDecisions.map {
                Float(UnitLossWeight.paperModel(estimatedNLL: lNLL, expert: experts[$0], units: U))
            }))
            memoryTerms.append(tape.weightedSum(chosen, weights: routerDecisions.map { Float(UnitLossWeight.memory(expert: experts[$0], units: U)) }))
        case .expected:
            modelTerms.append(tape.weightedSum(unitProbabilities, weights: sensitivity.unitDeltas(router: router, layout: layout)))
            memoryTerms.append(tape.weightedSum(unitProbabilities, weights: (0..<layout.units(of: router)).flatMap { _ in
                experts.map { Float(UnitLossWeight.memory(expert: $0, units: U)) }
            }))
        }
    }
    let modelTerm = modelTerms.dropFirst().reduce(modelTerms[0]) { tape.add($0, $1) }
    let memoryTerm = memoryTerms.dropFirst().reduce(memoryTerms[0]) { tape.add($0, $1) }
    let lambda = settings.lambda
    let loss = tape.add(tape.scale(modelTerm, by: Float(lambda)), tape.scale(memoryTerm, by: Float(1 - lambda)))
    return SequenceLoss(loss: loss, modelTerm: Double(modelTerm.value[0]), memoryTerm: Double(memoryTerm.value[0]),
                        estimatedNLL: lNLL, decisions: decisions)
}
