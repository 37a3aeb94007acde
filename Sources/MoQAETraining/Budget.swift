import Foundation
import MoQAERouter
import MoQAEStore

/// A bits budget (`router.target_bits`): λ starts where the per-unit allocation of the first batch
/// that minimises its `delta_nll` meets the budget, and after every step moves so that the routers'
/// average payload bits approach the target. With μ = (1−λ)/λ, the price of memory against accuracy,
/// the move is dual ascent on the budget constraint in log space: `log μ += rate · (bits − target)`,
/// where bits are those the batch's decisions use.
public struct BitsBudget: Equatable, Sendable {
    public let targetBits: Double
    public let rate: Double

    public init(targetBits: Double, rate: Double) {
        self.targetBits = targetBits
        self.rate = rate
    }

    /// λ for the next step, after a step at `lambda` whose decisions used `bits` payload bits.
    public func nextLambda(after lambda: Double, bits: Double) -> Double {
        let clamped = min(max(lambda, 1e-9), 1 - 1e-9)
        let logPrice = log((1 - clamped) / clamped) + rate * (bits - targetBits)
        return 1 / (1 + exp(min(max(logPrice, -40), 40)))
    }

    /// λ at which routing every unit of `sequences` to `argmin_j λ D_u[j] + (1−λ) B_j/(16U)` (what a
    /// router trained with the expected loss converges to, if it could see `delta_nll`) uses the target's
    /// payload bits, found by bisection on log μ.
    public func startingLambda(sensitivities: [SensitivityTable], setup: RouterSetup) -> Double {
        let layout = setup.layout, experts = setup.experts
        let U = Double(layout.unitsPerSequence)
        let M = experts.count
        // [sequence][router]: (units, M) D_u[j]
        let unitDeltas = sensitivities.map { sensitivity in (0..<layout.routers).map { sensitivity.unitDeltas(router: $0, layout: layout) } }
        func bits(logPrice: Double) -> Double {
            let price = exp(logPrice)
            func cost(_ deltas: [Float], unit: Int, expert j: Int) -> Double {
                Double(deltas[unit * M + j]) + price * experts[j].bitWidth / (16 * U)
            }
            var tally = BitsTally(experts: M)
            for sequence in unitDeltas {
                tally.add(decisions: sequence.enumerated().map { router, deltas in
                    (0..<layout.units(of: router)).map { unit in
                        (0..<M).min { cost(deltas, unit: unit, expert: $0) < cost(deltas, unit: unit, expert: $1) } ?? 0
                    }
                }, layout: layout)
            }
            return tally.memory(setup: setup, sequences: unitDeltas.count).payloadBits
        }
        // Bits fall as the price rises.
        var low = -40.0, high = 40.0
        for _ in 0..<60 {
            let middle = (low + high) / 2
            if bits(logPrice: middle) > targetBits { low = middle } else { high = middle }
        }
        return 1 / (1 + exp(high))
    }

    /// The payload bits an allocation can reach: every routed unit at the cheapest expert, or at the dearest.
    public static func reachableBits(setup: RouterSetup) -> ClosedRange<Double> {
        func allAt(_ expert: Int) -> Double {
            var tally = BitsTally(experts: setup.experts.count)
            tally.layerUnits[expert] = setup.layout.layerUnitsPerSequence
            return tally.memory(setup: setup, sequences: 1).payloadBits
        }
        let bits = setup.experts.indices.map(allAt)
        return bits.reduce(.infinity, min)...bits.reduce(-.infinity, max)
    }
}
