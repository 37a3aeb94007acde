import MoQAERouter
import MoQAEStore

/// Loss terms and routing figures of one batch.
public struct BatchFigures: Equatable, Sendable {
    /// Mean over the batch's sequences of `λ L_model + (1−λ) L_mem` (of the loss it was computed with).
    public var loss: Double
    public var modelTerm: Double
    public var memoryTerm: Double
    /// Mean `L_nll(s)` over the batch.
    public var meanEstimatedNLL: Double
    /// Routed units decided for each expert, over the batch.
    public var decisionCounts: [Int]
    /// Payload bits per KV element over the batch's sequences (frozen and tail tokens at 16).
    public var payloadBits: Double
}

/// The loss gradient of a batch, flat and laid out like `parameters.values`, with its figures.
///
/// Each sequence gets its own tape: forward, decisions and `L_nll(s)` first, then backward seeded with
/// `1/batch`, so the gradient is that of the batch mean.
public func batchGradient(_ batch: [SequenceData], parameters: RouterParameters, setup: RouterSetup,
                          loss: LossSettings) -> (gradient: [Float], figures: BatchFigures, decisions: [[[Int]]]) {
    let layout = setup.layout
    var gradient = [Float](repeating: 0, count: parameters.values.count)
    var figures = BatchFigures(loss: 0, modelTerm: 0, memoryTerm: 0, meanEstimatedNLL: 0,
                               decisionCounts: Array(repeating: 0, count: setup.experts.count), payloadBits: 0)
    var tally = BitsTally(experts: setup.experts.count)
    var decisions: [[[Int]]] = []
    let scale = 1 / Double(batch.count)
    for sequence in batch {
        let tape = Tape()
        let routers = (0..<layout.routers).map { RouterVariables(tape: tape, parameters: parameters, router: $0) }
        let inputs = sequence.inputs.map { tape.constant($0, rows: layout.rowsPerRouter, cols: layout.inputDim) }
        let result = sequenceLoss(tape: tape, layout: layout, routers: routers, inputs: inputs, nll: sequence.nll,
                                  sensitivity: sequence.sensitivity, experts: setup.experts, loss: loss)
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
    figures.decisionCounts = decisions.reduce(into: Array(repeating: 0, count: setup.experts.count)) { counts, sequence in
        for routerDecisions in sequence { for expert in routerDecisions { counts[expert] += 1 } }
    }
    figures.payloadBits = tally.memory(setup: setup, sequences: batch.count).payloadBits
    return (gradient, figures, decisions)
}

/// KV memory of an allocation: average bits per element, as payload and with quantization constants.
public struct MemoryFigures: Equatable, Sendable {
    public var payloadBits: Double
    public var bitsWithConstants: Double
    /// Bits with constants over 16: the KV cache's size as a fraction of fp16.
    public var fractionOfFP16: Double { bitsWithConstants / 16 }
}

/// Counts (layer, head, chunk) units per expert; everything not counted is stored at 16 bits.
public struct BitsTally: Equatable, Sendable {
    public var layerUnits: [Int]

    public init(experts: Int) { layerUnits = Array(repeating: 0, count: experts) }

    /// Adds one sequence's router decisions; each decision holds for every layer of its group.
    public mutating func add(decisions: [[Int]], layout: RoutingLayout) {
        for (router, routerDecisions) in decisions.enumerated() {
            let groupLayers = layout.layers(of: router).count
            for expert in routerDecisions { layerUnits[expert] += groupLayers }
        }
    }

    /// Routed bits (with constants) of the counted units.
    public func routedBits(setup: RouterSetup) -> Double {
        zip(layerUnits, setup.unitBits).reduce(0) { $0 + Double($1.0) * $1.1 }
    }

    /// Averages over all K and V elements of `sequences` sequences.
    public func memory(setup: RouterSetup, sequences: Int) -> MemoryFigures {
        let layout = setup.layout
        let unitElements = Double(2 * layout.chunkSize * setup.headDim)
        let totalElements = Double(sequences) * Double(2 * layout.layers * layout.heads * layout.tokens * setup.headDim)
        let routedUnits = Double(layerUnits.reduce(0, +))
        let unroutedBits = (totalElements - routedUnits * unitElements) * 16
        let payload = zip(layerUnits, setup.experts).reduce(0.0) { $0 + Double($1.0) * unitElements * $1.1.bitWidth }
        return MemoryFigures(payloadBits: (payload + unroutedBits) / totalElements,
                             bitsWithConstants: (routedBits(setup: setup) + unroutedBits) / totalElements)
    }
}
