import Foundation
import MoQAEExperts
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

/// A difference between two allocations on the same sequences: the mean of per-sequence differences
/// of `L_nll` with a 95% confidence interval (normal approximation), and as a share of fp16's mean.
public struct PairedDifference: Equatable, Sendable {
    /// Mean of `a(s) − b(s)` (nats per token).
    public var mean: Double
    /// Half-width of the 95% confidence interval of `mean`.
    public var halfWidth: Double
    /// fp16's mean NLL, the scale of the percentages.
    public var fp16MeanNLL: Double
    public var sequences: Int

    init(differences: [Double], fp16MeanNLL: Double) {
        let n = Double(differences.count)
        let mean = differences.reduce(0, +) / n
        let variance = differences.count > 1 ? differences.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / (n - 1) : 0
        self.mean = mean
        halfWidth = 1.96 * (variance / n).squareRoot()
        self.fp16MeanNLL = fp16MeanNLL
        sequences = differences.count
    }

    /// `mean` as a percentage of fp16's mean NLL.
    public var percentOfFP16: Double { 100 * mean / fp16MeanNLL }

    var json: JSON {
        .object([("mean_nll_difference", .double(mean)), ("ci95_half_width", .double(halfWidth)),
                 ("percent_of_fp16", .double(percentOfFP16)), ("ci95_half_width_percent", .double(100 * halfWidth / fp16MeanNLL)),
                 ("sequences", .int(sequences))])
    }
}

/// The validation report: the router against the best content-blind plan at its bits (`static`),
/// beside every uniform expert, and the prescient allocation as a diagnostic; all estimated from the
/// store's `delta_nll`.
public struct ValidationReport: Equatable, Sendable {
    /// Why the prescient row is not a target, for every report that shows it.
    public static let prescientNote = "prescient: chooses per unit with the validation sequences' own delta_nll, "
        + "which exists only once a text has been scored; no router can see it (a diagnostic, not a target)"

    public var sequences: Int
    public var experts: [Expert]
    public var layout: RoutingLayout
    public var router: AllocationSummary
    /// `[router][expert]` decision counts.
    public var decisionsPerRouter: [[Int]]
    /// One expert per (layer, head, chunk position), fitted on the calibration split at the router's bits.
    public var staticPlan: AllocationSummary
    public var uniform: [AllocationSummary]
    public var prescient: AllocationSummary
    /// Router minus static, per validation sequence.
    public var routerVsStatic: PairedDifference

    public var json: JSON {
        .object([("sequences", .int(sequences)), ("router", router.json), ("static", staticPlan.json),
                 ("router_vs_static", routerVsStatic.json), ("uniform", .array(uniform.map(\.json))),
                 ("prescient", prescient.json), ("prescient_note", .string(Self.prescientNote)),
                 ("decisions_per_router", .array(decisionsPerRouter.map { .array($0.map(JSON.int)) }))])
    }

    /// A table for people.
    public var text: String {
        let expertHeader = experts.map { $0.name.padding(toLength: 7, withPad: " ", startingAt: 0) }.joined(separator: " ")
        var lines = ["validation: \(sequences) sequences, \(layout.unitsPerSequence * sequences) routed units, estimated from delta_nll",
                     "  allocation              est. ppl   mean NLL   payload bits   bits+consts   KV/fp16   " + expertHeader]
        func row(_ summary: AllocationSummary) -> String {
            let fractions = summary.expertFractions.map { String(format: "%6.1f%%", 100 * $0) }.joined(separator: " ")
            return "  " + summary.name.padding(toLength: 22, withPad: " ", startingAt: 0)
                + String(format: "%9.4f  %9.5f  %13.3f  %12.3f  %7.1f%%   ", summary.perplexity, summary.meanNLL,
                         summary.memory.payloadBits, summary.memory.bitsWithConstants, 100 * summary.memory.fractionOfFP16) + fractions
        }
        lines.append(row(router))
        lines.append(row(staticPlan))
        lines.append(contentsOf: uniform.map(row))
        lines.append(row(prescient))
        let difference = routerVsStatic
        lines.append(String(format: "  router vs static at the same bits: %+.5f nats/token (95%% CI %+.5f to %+.5f), %+.2f%% of fp16's NLL%@",
                            difference.mean, difference.mean - difference.halfWidth, difference.mean + difference.halfWidth,
                            difference.percentOfFP16,
                            difference.mean + difference.halfWidth < 0 ? ": the router is better"
                                : difference.mean - difference.halfWidth > 0 ? ": the static plan is better" : ": no clear difference"))
        lines.append("  " + Self.prescientNote)
        for (index, counts) in decisionsPerRouter.enumerated() {
            let total = max(1, counts.reduce(0, +))
            let layers = layout.layers(of: index)
            let share = zip(experts, counts).map { "\($0.name) \(String(format: "%.1f%%", 100 * Double($1) / Double(total)))" }
            lines.append("  router \(index) (layers \(layers.lowerBound)-\(layers.upperBound - 1)): " + share.joined(separator: ", "))
        }
        return lines.joined(separator: "\n")
    }
}

/// `(L · H · routed chunks, M)` row-major: the `delta_nll` of every layer-unit of a sequence, in
/// (layer, head, chunk) order.
func layerUnitDeltas(_ sensitivity: SensitivityTable, layout: RoutingLayout, experts M: Int) -> [Double] {
    var deltas: [Double] = []
    deltas.reserveCapacity(layout.layerUnitsPerSequence * M)
    for layer in 0..<layout.layers {
        for head in 0..<layout.heads {
            for chunk in layout.firstRoutedChunk(ofLayer: layer)..<layout.chunks {
                for expert in 0..<M { deltas.append(Double(sensitivity.delta(layer: layer, head: head, chunk: chunk, expert: expert))) }
            }
        }
    }
    return deltas
}

/// The static plan: one expert per layer-unit position (layer, head, chunk), the same for every
/// sequence, minimising the calibration split's summed `delta_nll` within `budget` routed bits (with
/// constants) per sequence. It reads no content, so it is the baseline a router must beat.
public func staticPlan(data: RoutedStore, budget: Double) -> [Int] {
    let M = data.experts.count
    var costs: [Double] = []
    for sequence in data.calibration {
        let deltas = layerUnitDeltas(data.sensitivity(of: sequence), layout: data.layout, experts: M)
        if costs.isEmpty { costs = deltas } else { for i in costs.indices { costs[i] += deltas[i] } }
    }
    return lagrangianAllocation(options: costs, experts: M, unitBits: data.setup.unitBits, budget: budget)
}

/// What `moqae-train eval` reports: router weights (a checkpoint's, or an export's with its `path`) on the
/// validation split of `config`'s store; an export's experts are matched to the store's by their bits, and
/// its routers decide under its bits price. Errors name the store, the export or the config key (`source`).
public func evaluationReport(parameters: RouterParameters, config: TrainingConfig, source: String,
                             export: (RouterExport, path: String)?) throws -> ValidationReport {
    let store = try CalibrationStore(path: config.storePath)
    let config = try export.map { try config.routing(of: $0.0, path: $0.path, on: store) } ?? config
    let data = try RoutedStore(store: store, config: config, source: source)
    guard data.layout.routers == parameters.routers, data.layout.inputDim == parameters.inputDim,
          data.experts.count == parameters.experts else {
        throw ExportError(path: export?.path ?? source, reason: .routersDoNotFit(routers: parameters.routers, inputDim: parameters.inputDim,
                                                                                experts: parameters.experts, store: store.path))
    }
    guard let report = try validationReport(streamer: SequenceStreamer(data: data, workers: config.threads), parameters: parameters,
                                            bitsPrice: export?.0.bitsPrice ?? 0) else {
        throw ConfigError(location: source, key: "data.validation_fraction", reason: .noValidationSequences(store: store.path))
    }
    return report
}

/// Runs the routers over the validation split and compares their decisions with the static plan and
/// the prescient allocation at the router's bits (with constants), and with every uniform expert; an
/// export's routers decide under its bits price.
public func validationReport(streamer: SequenceStreamer, parameters: RouterParameters,
                             bitsPrice: Float = 0) throws(StoreError) -> ValidationReport? {
    let data = streamer.data
    guard !data.validation.isEmpty else { return nil }
    let setup = data.setup, layout = data.layout, M = setup.experts.count
    var routerTally = BitsTally(experts: M)
    var decisionsPerRouter = Array(repeating: Array(repeating: 0, count: M), count: layout.routers)
    var routerNLL: [Double] = [], uniformNLL = Array(repeating: 0.0, count: M), weights = 0.0
    var unitDeltas: [Double] = []   // (sequences · L · H · routed chunks, M) delta_nll of every layer-unit
    var baseNLL: [Double] = []      // per sequence
    var tokenWeights: [Double] = []

    for (sequence, decisions) in zip(data.validation, try streamer.decisions(data.validation, parameters: parameters, bitsPrice: bitsPrice)) {
        try data.store.checkShardIntact(sequence)
        let nll = data.store.nll(of: sequence), sensitivity = data.sensitivity(of: sequence)
        let weight = Double(sequence.tokens - 1)
        weights += weight
        tokenWeights.append(weight)
        baseNLL.append(Double(nll))
        routerNLL.append(estimatedNLL(nll: nll, decisions: decisions, layout: layout, sensitivity: sensitivity))
        routerTally.add(decisions: decisions, layout: layout)
        for (router, routerDecisions) in decisions.enumerated() {
            for expert in routerDecisions { decisionsPerRouter[router][expert] += 1 }
        }
        for expert in 0..<M {
            let uniformDecisions = (0..<layout.routers).map { Array(repeating: expert, count: layout.units(of: $0)) }
            uniformNLL[expert] += weight * estimatedNLL(nll: nll, decisions: uniformDecisions, layout: layout, sensitivity: sensitivity)
        }
        unitDeltas += layerUnitDeltas(sensitivity, layout: layout, experts: M)
    }

    let sequences = data.validation.count
    let layerUnits = routerTally.layerUnits.reduce(0, +)
    let unitsPerSequence = layout.layerUnitsPerSequence
    func fractions(_ tally: BitsTally) -> [Double] { tally.layerUnits.map { Double($0) / Double(max(1, layerUnits)) } }
    func weightedMean(_ perSequence: [Double]) -> Double { zip(perSequence, tokenWeights).reduce(0) { $0 + $1.0 * $1.1 } / weights }
    /// Per-sequence `L_nll` and the tally of an allocation of every layer-unit, `choices(sequence, unit)`.
    func layerUnitAllocation(_ choice: (Int, Int) -> Int) -> (nll: [Double], tally: BitsTally) {
        var tally = BitsTally(experts: M)
        let nll = (0..<sequences).map { s in
            (0..<unitsPerSequence).reduce(baseNLL[s]) { total, unit in
                let expert = choice(s, unit)
                tally.layerUnits[expert] += 1
                return total + unitDeltas[(s * unitsPerSequence + unit) * M + expert]
            }
        }
        return (nll, tally)
    }

    let router = AllocationSummary(name: "router", meanNLL: weightedMean(routerNLL),
                                   memory: routerTally.memory(setup: setup, sequences: sequences), expertFractions: fractions(routerTally))
    let uniform = (0..<M).map { expert in
        var tally = BitsTally(experts: M)
        tally.layerUnits[expert] = layerUnits
        return AllocationSummary(name: "uniform \(setup.experts[expert].name)", meanNLL: uniformNLL[expert] / weights,
                                 memory: tally.memory(setup: setup, sequences: sequences), expertFractions: fractions(tally))
    }
    let routedBits = routerTally.routedBits(setup: setup)
    let staticChoices = staticPlan(data: data, budget: routedBits / Double(sequences))
    let fixed = layerUnitAllocation { _, unit in staticChoices[unit] }
    let staticSummary = AllocationSummary(name: "static (same bits)", meanNLL: weightedMean(fixed.nll),
                                          memory: fixed.tally.memory(setup: setup, sequences: sequences), expertFractions: fractions(fixed.tally))
    let prescientChoices = lagrangianAllocation(options: unitDeltas, experts: M, unitBits: setup.unitBits, budget: routedBits)
    let prescient = layerUnitAllocation { s, unit in prescientChoices[s * unitsPerSequence + unit] }
    let prescientSummary = AllocationSummary(name: "prescient (same bits)", meanNLL: weightedMean(prescient.nll),
                                             memory: prescient.tally.memory(setup: setup, sequences: sequences),
                                             expertFractions: fractions(prescient.tally))
    return ValidationReport(sequences: sequences, experts: setup.experts, layout: layout, router: router,
                            decisionsPerRouter: decisionsPerRouter, staticPlan: staticSummary, uniform: uniform, prescient: prescientSummary,
                            routerVsStatic: PairedDifference(differences: zip(routerNLL, fixed.nll).map { $0 - $1 },
                                                             fp16MeanNLL: weightedMean(baseNLL)))
}

/// Chooses one expert per unit to minimise the summed cost under a bits budget, by the Lagrangian
/// relaxation: each unit takes `argmin_e cost[u, e] + μ · bits[e]`, with the smallest μ (found by
/// bisection) whose total fits the budget. Optimal for the points on each unit's lower convex hull.
///
/// - Parameter options: `(units, experts)` costs, row-major.
func lagrangianAllocation(options: [Double], experts M: Int, unitBits: [Double], budget: Double) -> [Int] {
    let units = options.count / M
    func allocate(_ mu: Double) -> (choices: [Int], bits: Double) {
        var choices = [Int](repeating: 0, count: units)
        var bits = 0.0
        for u in 0..<units {
            var best = 0, bestValue = Double.infinity
            for e in 0..<M {
                let value = options[u * M + e] + mu * unitBits[e]
                if value < bestValue || (value == bestValue && unitBits[e] > unitBits[best]) { best = e; bestValue = value }
            }
            choices[u] = best
            bits += unitBits[best]
        }
        return (choices, bits)
    }
    let cheapest = unitBits.indices.min { unitBits[$0] < unitBits[$1] } ?? 0
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
