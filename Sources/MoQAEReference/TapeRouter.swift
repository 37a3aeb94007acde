import MoQAEExperts
import MoQAERouter

/// One router's weights as tape leaves.
public struct RouterVariables {
    public let w1: Variable, w2: Variable, w3: Variable

    public init(w1: Variable, w2: Variable, w3: Variable) {
        self.w1 = w1
        self.w2 = w2
        self.w3 = w3
    }

    /// - Parameter trainable: false records the weights as constants (evaluation: no gradients).
    public init(tape: Tape, parameters: RouterParameters, router: Int, trainable: Bool = true) {
        func leaf(_ matrix: RouterParameters.Matrix) -> Variable {
            let entry = parameters.entry(router: router, matrix)
            let value = Array(parameters.values[entry.range])
            return trainable ? tape.parameter(value, rows: entry.rows, cols: entry.cols) : tape.constant(value, rows: entry.rows, cols: entry.cols)
        }
        w1 = leaf(.w1)
        w2 = leaf(.w2)
        w3 = leaf(.w3)
    }

    /// Adds the three gradients into a flat gradient buffer laid out like `parameters.values`.
    public func accumulateGradients(into gradient: inout [Float], parameters: RouterParameters, router: Int) {
        for (matrix, variable) in [(RouterParameters.Matrix.w1, w1), (.w2, w2), (.w3, w3)] {
            let offset = parameters.entry(router: router, matrix).offset
            for i in 0..<variable.count { gradient[offset + i] += variable.grad[i] }
        }
    }
}

/// Token logits `z = (SiLU(x W1) ⊙ (x W2)) W3` for input rows `x (n, D)` → `(n, M)`.
public func routerLogits(tape: Tape, inputs x: Variable, weights: RouterVariables) -> Variable {
    let gate = tape.silu(tape.matmul(x, weights.w1))
    let h = tape.multiply(gate, tape.matmul(x, weights.w2))
    return tape.matmul(h, weights.w3)
}

/// Token probabilities `p = softmax(z)` for input rows `x (n, D)` → `(n, M)`.
public func routerForward(tape: Tape, inputs x: Variable, weights: RouterVariables) -> Variable {
    tape.softmaxRows(routerLogits(tape: tape, inputs: x, weights: weights))
}

/// Per chunk of the input rows `x (units · N, D)`: its probability `P_u (units, M)` by `pooling`, and
/// its decision.
public func chunkProbabilities(tape: Tape, inputs x: Variable, weights: RouterVariables, chunkSize: Int, pooling: ChunkPooling,
                               experts: [Expert]) -> (probabilities: Variable, decisions: [Int]) {
    switch pooling {
    case .vote:
        let p = routerForward(tape: tape, inputs: x, weights: weights)
        return (tape.meanOfRowGroups(p, groupSize: chunkSize), chunkDecisions(probabilities: p.value, chunkSize: chunkSize, experts: experts))
    case .mean, .max:
        let logP = tape.logSoftmaxRows(routerLogits(tape: tape, inputs: x, weights: weights))
        let pooled = pooling == .mean ? tape.meanOfRowGroups(logP, groupSize: chunkSize) : tape.maxOfRowGroups(logP, groupSize: chunkSize)
        let unitP = tape.softmaxRows(pooled)
        return (unitP, pooledDecisions(unitProbabilities: unitP.value, experts: experts))
    }
}
