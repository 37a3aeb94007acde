import MoQAEExperts
import MoQAERouter
import MoQAEStore
import MoQAEReference
import MoQAETraining

extension RoutedStore {
    /// The loss gradient of a batch on the tape: flat and laid out like `parameters.values`, with its
    /// figures and every sequence's `[router][unit]` decisions. `SequenceStreamer.batchGradient` must
    /// agree with it.
    ///
    /// Each sequence is loaded whole and gets its own tape: forward, decisions and `L_nll(s)` first,
    /// then backward seeded with `1/batch`, so the gradient is that of the batch mean.
    public func referenceBatchGradient(_ batch: [CalibrationStore.Sequence], parameters: RouterParameters,
                                       loss: LossSettings) -> (gradient: [Float], figures: BatchFigures, decisions: [[[Int]]]) {
        var gradient = [Float](repeating: 0, count: parameters.values.count)
        var figures = BatchFigures(experts: experts.count)
        var tally = BitsTally(experts: experts.count)
        var decisions: [[[Int]]] = []
        let scale = 1 / Double(batch.count)
        for sequence in batch {
            let tape = Tape()
            let routers = (0..<layout.routers).map { RouterVariables(tape: tape, parameters: parameters, router: $0) }
            let inputs = leaderInputs(of: sequence).enumerated().map { router, rows in
                tape.constant(rows, rows: layout.rows(of: router), cols: layout.inputDim)
            }
            let result = sequenceLoss(tape: tape, layout: layout, routers: routers, inputs: inputs, nll: store.nll(of: sequence),
                                      sensitivity: sensitivity(of: sequence), experts: experts, loss: loss)
            tape.backward(from: result.loss, seed: Float(scale))
            for (router, variables) in routers.enumerated() {
                variables.accumulateGradients(into: &gradient, parameters: parameters, router: router)
            }
            figures.loss += scale * Double(result.loss.value[0])
            figures.modelTerm += scale * result.modelTerm
            figures.memoryTerm += scale * result.memoryTerm
            figures.meanEstimatedNLL += scale * result.estimatedNLL
            tally.add(decisions: result.decisions, layout: layout)
            decisions.append(result.decisions)
        }
        for sequence in decisions {
            for routerDecisions in sequence { for expert in routerDecisions { figures.decisionCounts[expert] += 1 } }
        }
        figures.payloadBits = tally.memory(setup: setup, sequences: batch.count).payloadBits
        return (gradient, figures, decisions)
    }

    /// Per router, `(layout.rows(of: router), D)` as Float32: the routed tokens of every head of its
    /// leader layer, read whole, head-major.
    public func leaderInputs(of sequence: CalibrationStore.Sequence) -> [[Float]] {
        let D = layout.inputDim
        return (0..<layout.routers).map { router in
            let (leader, tokens) = (layout.leaderLayer(of: router), layout.routedTokens(of: router))
            var rows = [Float](repeating: 0, count: layout.rows(of: router) * D)
            rows.withUnsafeMutableBufferPointer { buffer in
                guard let start = buffer.baseAddress else { return }
                for head in 0..<layout.heads {
                    store.readInputs(sequence, layer: leader, head: head, tokens: tokens, into: start + head * tokens.count * D)
                }
            }
            store.releaseInputs(sequence, layer: leader)
            return rows
        }
    }
}
