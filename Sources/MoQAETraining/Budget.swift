import Foundation
import MoQAERouter
import MoQAEStore

/// A bits budget (`router.target_bits`): after every step, λ moves so that the routers' average
/// payload bits approach the target. With μ = (1−λ)/λ, the price of memory against accuracy, this is
/// dual ascent on the budget constraint in log space: `log μ += rate · (bits − target)`, where bits
/// are those the batch's decisions use.
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

    /// The payload bits an allocation can reach: every routed unit at the cheapest expert, or at the dearest.
    public static func reachableBits(setup: RouterSetup) -> ClosedRange<Double> {
        func allAt(_ expert: Int) -> Double {
            var tally = BitsTally(experts: setup.experts.count)
            tally.layerUnits[expert] = setup.layout.layers * setup.layout.unitsPerRouter
            return tally.memory(setup: setup, sequences: 1).payloadBits
        }
        let bits = setup.experts.indices.map(allAt)
        return bits.min()!...bits.max()!
    }
}
