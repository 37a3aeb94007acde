import Foundation
import MoQAEExperts
@testable import MoQAEReference
import MoQAERouter
import MoQAETestSupport
import Testing

/// Checks the tape's gradient of `build` against central finite differences for every input element.
///
/// `build` maps the leaf variables to a (1,1) output. Float32 arithmetic limits the agreement, so the
/// comparison allows 1% of the gradient's largest magnitude plus 2e-3 absolute.
func checkGradients(inputs: [(rows: Int, cols: Int, values: [Float])], step: Float = 1e-2,
                    _ build: (Tape, [Variable]) -> Variable) {
    let tape = Tape()
    let leaves = inputs.map { tape.parameter($0.values, rows: $0.rows, cols: $0.cols) }
    let output = build(tape, leaves)
    tape.backward(from: output)
    func evaluate(_ values: [[Float]]) -> Double {
        let tape = Tape()
        let leaves = zip(inputs, values).map { tape.parameter($1, rows: $0.rows, cols: $0.cols) }
        return Double(build(tape, leaves).value[0])
    }
    for (index, input) in inputs.enumerated() {
        let analytic = leaves[index].grad
        let scale = analytic.map { abs($0) }.max() ?? 0
        for element in 0..<input.values.count {
            var plus = inputs.map(\.values), minus = inputs.map(\.values)
            plus[index][element] += step
            minus[index][element] -= step
            let numeric = (evaluate(plus) - evaluate(minus)) / Double(2 * step)
            #expect(abs(numeric - Double(analytic[element])) <= 0.01 * Double(scale) + 2e-3,
                    "input \(index) element \(element): finite difference \(numeric), tape \(analytic[element])")
        }
    }
}

@Suite struct PrimitiveGradientTests {
    @Test func matmul() {
        var s = Sampler(state: 1)
        let w = s.values(3 * 4)
        checkGradients(inputs: [(3, 5, s.values(15)), (5, 4, s.values(20))]) { tape, v in
            tape.weightedSum(tape.matmul(v[0], v[1]), weights: w)
        }
    }

    @Test func silu() {
        var s = Sampler(state: 2)
        let w = s.values(12)
        checkGradients(inputs: [(3, 4, s.values(12, scale: 3))]) { tape, v in tape.weightedSum(tape.silu(v[0]), weights: w) }
    }

    @Test func multiply() {
        var s = Sampler(state: 3)
        let w = s.values(6)
        checkGradients(inputs: [(2, 3, s.values(6)), (2, 3, s.values(6))]) { tape, v in
            tape.weightedSum(tape.multiply(v[0], v[1]), weights: w)
        }
    }

    @Test func softmaxRows() {
        var s = Sampler(state: 4)
        let w = s.values(12)
        checkGradients(inputs: [(4, 3, s.values(12, scale: 2))], step: 1e-3) { tape, v in
            tape.weightedSum(tape.softmaxRows(v[0]), weights: w)
        }
    }

    @Test func meanOfRowGroups() {
        var s = Sampler(state: 5)
        let w = s.values(6)
        checkGradients(inputs: [(6, 3, s.values(18))]) { tape, v in
            tape.weightedSum(tape.meanOfRowGroups(v[0], groupSize: 3), weights: w)
        }
    }

    @Test func logSoftmaxRows() {
        var s = Sampler(state: 8)
        let w = s.values(12)
        checkGradients(inputs: [(4, 3, s.values(12, scale: 2))], step: 1e-3) { tape, v in
            tape.weightedSum(tape.logSoftmaxRows(v[0]), weights: w)
        }
    }

    /// Distinct values keep each group's maximum in place under the finite-difference step.
    @Test func maxOfRowGroups() {
        var s = Sampler(state: 9)
        let w = s.values(6)
        let values = (0..<18).map { Float(($0 * 7) % 18) * 0.1 + 0.01 * s.next() }
        checkGradients(inputs: [(6, 3, values)], step: 1e-3) { tape, v in
            tape.weightedSum(tape.maxOfRowGroups(v[0], groupSize: 3), weights: w)
        }
    }

    @Test func pick() {
        var s = Sampler(state: 6)
        let w = s.values(4)
        checkGradients(inputs: [(4, 3, s.values(12))]) { tape, v in
            tape.weightedSum(tape.pick(v[0], columns: [2, 0, 1, 2]), weights: w)
        }
    }

    @Test func addAndScale() {
        var s = Sampler(state: 7)
        let w = s.values(4)
        checkGradients(inputs: [(2, 2, s.values(4)), (2, 2, s.values(4))]) { tape, v in
            tape.weightedSum(tape.add(tape.scale(v[0], by: -1.5), v[1]), weights: w)
        }
    }

    @Test func constantsReceiveNoGradient() {
        let tape = Tape()
        let x = tape.constant([1, 2], rows: 1, cols: 2)
        let w = tape.parameter([3, 4], rows: 2, cols: 1)
        tape.backward(from: tape.matmul(x, w))
        #expect(x.grad.isEmpty)
        #expect(w.grad == [1, 2])
    }
}

@Suite struct LossGradientTests {
    static let experts = [Expert(name: "fp16", keyBits: 16, valueBits: 16), Expert(name: "int4", keyBits: 4, valueBits: 4),
                          Expert(name: "int2", keyBits: 2, valueBits: 2)]

    /// The whole loss of one sequence against finite differences in every router weight, for every
    /// pooling. Decisions are constants for the gradient, so the check uses a step small enough to keep them.
    @Test(arguments: LossKind.allCases, ChunkPooling.allCases)
    func wholeLossMatchesFiniteDifferences(kind: LossKind, pooling: ChunkPooling) {
        wholeLossMatchesFiniteDifferences(kind: kind, pooling: pooling, hidden: 3)
    }

    /// The same at a hidden width other than M.
    @Test(arguments: [ChunkPooling.vote, .max])
    func wideRouterMatchesFiniteDifferences(pooling: ChunkPooling) {
        wholeLossMatchesFiniteDifferences(kind: .expected, pooling: pooling, hidden: 5)
    }

    func wholeLossMatchesFiniteDifferences(kind: LossKind, pooling: ChunkPooling, hidden: Int) {
        let layout = RoutingLayout(layers: 4, heads: 2, tokens: 40, inputDim: 4, chunkSize: 8, groupSize: 3, freezeFirstChunk: true,
                                   pooling: pooling)
        var s = Sampler(state: 11)
        let inputs = (0..<layout.routers).map { s.values(layout.rows(of: $0) * layout.inputDim, scale: 2) }
        let delta = (0..<(layout.layers * layout.heads * layout.chunks * 3)).map { i in i % 3 == 0 ? Float(0) : 0.02 * Float(i % 3) * (1 + s.next()) }
        let sensitivity = SensitivityTable(values: delta, heads: layout.heads, chunks: layout.chunks, storeExperts: 3, columns: [0, 1, 2])
        let weights = (0..<layout.routers).flatMap { _ in
            [(4, hidden, s.values(4 * hidden)), (4, hidden, s.values(4 * hidden)), (hidden, 3, s.values(3 * hidden))]
        }
        var decisionsAtStart: [[Int]] = []
        checkGradients(inputs: weights.map { (rows: $0.0, cols: $0.1, values: $0.2) }, step: 2e-3) { tape, leaves in
            let routers = (0..<layout.routers).map { r in RouterVariables(w1: leaves[3 * r], w2: leaves[3 * r + 1], w3: leaves[3 * r + 2]) }
            let x = inputs.enumerated().map { tape.constant($1, rows: layout.rows(of: $0), cols: layout.inputDim) }
            let result = sequenceLoss(tape: tape, layout: layout, routers: routers, inputs: x, nll: 2.5,
                                      sensitivity: sensitivity, experts: Self.experts, loss: LossSettings(kind: kind, lambda: 0.7))
            if decisionsAtStart.isEmpty { decisionsAtStart = result.decisions }
            #expect(result.decisions == decisionsAtStart, "a finite-difference step changed a decision")
            return result.loss
        }
        #expect(Set(decisionsAtStart.joined()).count > 1, "the check should cover more than one expert")
    }
}
