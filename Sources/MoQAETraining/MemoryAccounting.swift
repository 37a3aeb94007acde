import MoQAERouter
import MoQAEExperts

/// KV memory of an allocation: average bits per element, as payload and with quantization constants.
public struct MemoryFigures: Equatable, Sendable {
    public var payloadBits: Double
    public var bitsWithConstants: Double
    /// Bits with constants over 16: the KV cache's size as a fraction of fp16.
    public var fractionOfFP16: Double { bitsWithConstants / 16 }
}

/// Counts (layer, head, chunk) units per expert; everything else the caches hold is stored at 16 bits (a
/// sliding layer's chunks before its first held one are not held, and not counted). The
/// evaluator's `kv_memory_bits` (python/moqae/evaluate/scoring.py) must agree with `memory`; a test checks it.
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
        let totalElements = Double(sequences) * Double(2 * layout.heads * layout.heldTokens * setup.headDim)
        let routedUnits = Double(layerUnits.reduce(0, +))
        let unroutedBits = (totalElements - routedUnits * unitElements) * 16
        let payload = zip(layerUnits, setup.experts).reduce(0.0) { $0 + Double($1.0) * unitElements * $1.1.bitWidth }
        return MemoryFigures(payloadBits: (payload + unroutedBits) / totalElements,
                             bitsWithConstants: (routedBits(setup: setup) + unroutedBits) / totalElements)
    }
}
