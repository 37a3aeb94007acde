import Foundation
import MoQAERouter
import MoQAEStore

/// Estimated quality and memory of one way of choosing experts over the validation split.
public struct AllocationSummary: Equatable, Sendable {
    public var name: String
    /// Token-weighted mean of `L_nll(s)` (nats per token).
    public var meanNLL: Double
    public var memory: MemoryFigures
    /// Share of routed (layer, head, chunk) units at each expert.
    public var expertFractions: [Double]

    /// `exp(mean L_nll)`.
    public var perplexity: Double { exp(meanNLL) }

    var json: JSON {
        .object([("name", .string(name)), ("perplexity", .double(perplexity)), ("mean_nll", .double(meanNLL)),
                 ("payload_bits", .double(memory.payloadBits)), ("bits_with_constants", .double(memory.bitsWithConstants)),
                 ("kv_fraction_of_fp16", .double(memory.fractionOfFP16)),
                 ("expert_fractions", .array(expertFractions.map(JSON.double)))])
    }
}

/// The validation report: the router beside every uniform expert and the per-unit oracle at the
/// router's memory, all estimated from the store's `delta_nll`.
public struct ValidationReport: Equatable, Sendable {
    public var sequences: Int
    public var experts: [Expert]
    public var layout: RoutingLayout
    public var router: AllocationSummary
    /// `[router][expert]` decision counts.
    public var decisionsPerRouter: [[Int]]
    public var uniform: [AllocationSummary]
    public var oracle: AllocationSummary

    public var json: JSON {
        .object([("sequences", .int(sequences)), ("router", router.json), ("oracle", oracle.json),
                 ("uniform", .array(uniform.map(\.json))),
                 ("decisions_per_router", .array(decisionsPerRouter.map { .array($0.map(JSON.int)) }))])
    }

    /// A table for people.
    public var text: String {
        let expertHeader = experts.map { $0.name.padding(toLength: 7, withPad: " ", startingAt: 0) }.joined(separator: " ")
        var lines = ["validation: \(sequences) sequences, \(layout.unitsPerSequence * sequences) routed units, estimated from delta_nll",
                     "  allocation          est. ppl   mean NLL   payload bits   bits+consts   KV/fp16   " + expertHeader]
        func row(_ summary: AllocationSummary) -> String {
            let fractions = summary.expertFractions.map { String(format: "%6.1f%%", 100 * $0) }.joined(separator: " ")
            return "  " + summary.name.padding(toLength: 18, withPad: " ", startingAt: 0)
                + String(format: "%9.4f  %9.5f  %13.3f  %12.3f  %7.1f%%   ", summary.perplexity, summary.meanNLL,
                         summary.memory.payloadBits, summary.memory.bitsWithConstants, 100 * summary.memory.fractionOfFP16) + fractions
        }
        lines.append(row(router))
        lines.append(row(oracle))
        lines.append(contentsOf: uniform.map(row))
        lines.append(String(format: "  regret to the oracle: %+.5f nats/token (ppl ×%.4f)", router.meanNLL - oracle.meanNLL,
                            exp(router.meanNLL - oracle.meanNLL)))
        for (index, counts) in decisionsPerRouter.enumerated() {
            let total = max(1, counts.reduce(0, +))
            let layers = layout.layers(of: index)
            let share = zip(experts, counts).map { "\($0.name) \(String(format: "%.1f%%", 100 * Double($1) / Double(total)))" }
            lines.append("  router \(index) (layers \(layers.lowerBound)-\(layers.upperBound - 1)): " + share.joined(separator: ", "))
        }
        return lines.joined(separator: "\n")
    }
}

/// Runs the routers over the validation split and compares their decisions with every uniform
/// expert and with the oracle, the best per-(layer, head, chunk) allocation from `delta_nll` whose
/// total bits (with constants) do not exceed the router's.
public func validationReport(streamer: SequenceStreamer, parameters: RouterParameters) -> ValidationReport? {
    let data = streamer.data
    guard !data.validation.isEmpty else { return nil }
    let setup = data.setup, layout = data.layout, M = setup.experts.count
    var routerTally = BitsTally(experts: M)
    var decisionsPerRouter = Array(repeating: Array(repeating: 0, count: M), count: layout.routers)
    var routerNLL = 0.0, uniformNLL = Array(repeating: 0.0, count: M), weights = 0.0
    var oracleOptions: [Float] = []   // (sequences · L · H · routed chunks, M) delta_nll of every layer-unit
    var baseNLL: [Double] = []        // per sequence
    var tokenWeights: [Double] = []

    for (sequence, decisions) in zip(data.validation, streamer.decisions(data.validation, parameters: parameters)) {
        let nll = data.store.nll(of: sequence), sensitivity = data.sensitivity(of: sequence)
        let weight = Double(sequence.tokens - 1)
        weights += weight
        tokenWeights.append(weight)
        baseNLL.append(Double(nll))
        routerNLL += weight * estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity)
        routerTally.add(decisions: decisions, layout: layout)
        for (router, routerDecisions) in decisions.enumerated() {
            for expert in routerDecisions { decisionsPerRouter[router][expert] += 1 }
        }
        for expert in 0..<M {
            let uniformDecisions = Array(repeating: Array(repeating: expert, count: layout.unitsPerRouter), count: layout.routers)
            uniformNLL[expert] += weight * estimatedNLL(nll: nll, decisions: uniformDecisions, layout: layout, sensitivity: sensitivity)
        }
        for layer in 0..<layout.layers {
            for head in 0..<layout.heads {
                for chunk in layout.firstRoutedChunk..<layout.chunks {
                    for expert in 0..<M { oracleOptions.append(sensitivity.delta(layer: layer, head: head, chunk: chunk, expert: expert)) }
                }
            }
        }
    }

    let sequences = data.validation.count
    let layerUnits = routerTally.layerUnits.reduce(0, +)
    func fractions(_ tally: BitsTally) -> [Double] { tally.layerUnits.map { Double($0) / Double(max(1, layerUnits)) } }
    let router = AllocationSummary(name: "router", meanNLL: routerNLL / weights,
                                   memory: routerTally.memory(setup: setup, sequences: sequences), expertFractions: fractions(routerTally))
    let uniform = (0..<M).map { expert in
        var tally = BitsTally(experts: M)
        tally.layerUnits[expert] = layerUnits
        return AllocationSummary(name: "uniform \(setup.experts[expert].name)", meanNLL: uniformNLL[expert] / weights,
                                 memory: tally.memory(setup: setup, sequences: sequences), expertFractions: fractions(tally))
    }

    let unitBits = setup.experts.map { Double($0.unitStorageBits(chunkSize: layout.chunkSize, headDim: setup.headDim, valueGroup: setup.valueGroup)) }
    let choices = lagrangianAllocation(options: oracleOptions, experts: M, unitBits: unitBits, budget: routerTally.routedBits(setup: setup))
    var oracleTally = BitsTally(experts: M)
    var oracleNLL = 0.0
    let unitsPerSequence = layout.layers * layout.heads * layout.routedChunksPerHead
    for s in 0..<sequences {
        var total = baseNLL[s]
        for unit in (s * unitsPerSequence)..<((s + 1) * unitsPerSequence) {
            total += Double(oracleOptions[unit * M + choices[unit]])
            oracleTally.layerUnits[choices[unit]] += 1
        }
        oracleNLL += tokenWeights[s] * total
    }
    let oracle = AllocationSummary(name: "oracle (same bits)", meanNLL: oracleNLL / weights,
                                   memory: oracleTally.memory(setup: setup, sequences: sequences), expertFractions: fractions(oracleTally))
    return ValidationReport(sequences: sequences, experts: setup.experts, layout: layout, router: router,
                            decisionsPerRouter: decisionsPerRouter, uniform: uniform, oracle: oracle)
}

/// Chooses one expert per unit to minimise the summed cost under a bits budget, by the Lagrangian
/// relaxation: each unit takes `argmin_e cost[u, e] + μ · bits[e]`, with the smallest μ (found by
/// bisection) whose total fits the budget. Optimal for the points on each unit's lower convex hull.
///
/// - Parameter options: `(units, experts)` costs, row-major.
func lagrangianAllocation(options: [Float], experts M: Int, unitBits: [Double], budget: Double) -> [Int] {
    let units = options.count / M
    func allocate(_ mu: Double) -> (choices: [Int], bits: Double) {
        var choices = [Int](repeating: 0, count: units)
        var bits = 0.0
        for u in 0..<units {
            var best = 0, bestValue = Double.infinity
            for e in 0..<M {
                let value = Double(options[u * M + e]) + mu * unitBits[e]
                if value < bestValue || (value == bestValue && unitBits[e] > unitBits[best]) { best = e; bestValue = value }
            }
            choices[u] = best
            bits += unitBits[best]
        }
        return (choices, bits)
    }
    let cheapest = unitBits.indices.min { unitBits[$0] < unitBits[$1] }!
    let first = allocate(0)
    if first.bits <= budget { return first.choices }
    var low = 0.0, high = 1e-12
    var feasible = allocate(high)
    while feasible.bits > budget {
        high *= 4
        if high > 1e30 { return Array(repeating: cheapest, count: units) }
        feasible = allocate(high)
    }
    for _ in 0..<100 {
        let mid = (low + high) / 2
        let candidate = allocate(mid)
        if candidate.bits <= budget { high = mid; feasible = candidate } else { low = mid }
    }
    return feasible.choices
}
