import Foundation
import MoQAEExperts
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

/// The bits budget: where λ starts, which way it moves, and targets no allocation can reach.
@Suite struct BudgetTests {
    static let experts = [Expert(name: "fp16", keyBits: 16, valueBits: 16), Expert(name: "int4", keyBits: 4, valueBits: 4),
                          Expert(name: "int2", keyBits: 2, valueBits: 2)]
    static let layout = RoutingLayout(layers: 2, heads: 2, tokens: 320, inputDim: 8, chunkSize: 32, groupSize: 1, freezeFirstChunk: true)
    static let setup = RouterSetup(layout: layout, experts: experts, valueGroup: 8, headDim: 8, routerInput: .key)

    @Test func lambdaFallsAboveTheBudgetAndRisesBelowIt() {
        let budget = BitsBudget(targetBits: 4, rate: 0.5)
        #expect(budget.nextLambda(after: 0.5, bits: 5) < 0.5)
        #expect(budget.nextLambda(after: 0.5, bits: 3) > 0.5)
        #expect(budget.nextLambda(after: 0.5, bits: 4) == 0.5)
        // log((1−λ)/λ) moves by rate × error: from λ = 0.5 (μ = 1) one bit above gives μ = e^0.5.
        #expect(abs(budget.nextLambda(after: 0.5, bits: 5) - 1 / (1 + exp(0.5))) < 1e-12)
        #expect(budget.nextLambda(after: 0, bits: 3) > 0 && budget.nextLambda(after: 1, bits: 5) < 1)
    }

    /// Units whose int2 cost grows with their index: at the starting λ, the cheapest-first allocation
    /// of the batch meets the target, within one unit's bits.
    @Test(arguments: [3.6, 4.0, 6.0])
    func startingLambdaMeetsTheTargetOnTheFirstBatch(target: Double) {
        let layout = Self.layout
        var random = RandomGenerator(seed: 5)
        let tables = (0..<3).map { _ in
            let values = (0..<(layout.layers * layout.heads * layout.chunks)).flatMap { unit -> [Float] in
                let int2 = 1e-3 * Float(unit % 7 + 1) * random.uniform(1, 1.1)
                return [0, int2 / 8, int2]
            }
            return SensitivityTable(values: values, heads: layout.heads, chunks: layout.chunks, storeExperts: 3, columns: [0, 1, 2])
        }
        let budget = BitsBudget(targetBits: target, rate: 0.01)
        let lambda = budget.startingLambda(sensitivities: tables, setup: Self.setup)
        #expect(lambda > 0 && lambda < 1)
        // The allocation at that λ, unit by unit.
        let U = Double(layout.unitsPerSequence)
        var tally = BitsTally(experts: 3)
        for table in tables {
            tally.add(decisions: (0..<layout.routers).map { router in
                (0..<layout.units(of: router)).map { unit in
                    let (head, chunk) = layout.headAndChunk(ofUnit: unit, router: router)
                    return (0..<3).min { a, b in
                        func cost(_ j: Int) -> Double {
                            lambda * Double(table.unitDelta(layers: layout.layers(of: router), head: head, chunk: chunk, expert: j))
                                + (1 - lambda) * Self.experts[j].bitWidth / (16 * U)
                        }
                        return cost(a) < cost(b)
                    }!
                }
            }, layout: layout)
        }
        let bits = tally.memory(setup: Self.setup, sequences: tables.count).payloadBits
        let oneUnit = 14 * 64.0 / Double(tables.count * layout.layers * layout.heads * layout.tokens * 8)  // fp16 − int2 on one unit
        #expect(abs(bits - target) <= oneUnit, "bits \(bits) for target \(target)")
    }

    @Test func reachableBitsSpanTheExperts() {
        let reachable = BitsBudget.reachableBits(setup: Self.setup)
        // Chunk 0 of 10 stays at 16 bits: int2 everywhere else gives 1.6 + 0.9 · 2.
        #expect(abs(reachable.lowerBound - 3.4) < 1e-12 && reachable.upperBound == 16)
    }

    @Test func anUnreachableTargetIsAConfigError() throws {
        let store = makeTemporaryDirectory("budget-store"), run = makeTemporaryDirectory("budget-run")
        try makeSmallStore(at: store, sequences: 8)
        let config = try smallConfig(store: store, run: run, ["router.target_bits=1.5"])
        #expect {
            _ = try Trainer(config: config, configSource: "test.yaml", resume: nil, progress: ProgressReporter(interactive: false))
        } throws: { error in
            guard case let .config(refusal)? = error as? TrainingError, refusal.location == "test.yaml", refusal.key == "router.target_bits",
                  case let .unreachableTargetBits(target, reachable, experts, frozen) = refusal.reason else { return false }
            return target == 1.5 && !reachable.contains(1.5) && reachable.upperBound == 16 && experts == config.expertNames && frozen
        }
        #expect(ConfigError(location: "test.yaml", key: "router.target_bits",
                            reason: .unreachableTargetBits(1.5, reachable: 3.4...16, experts: ["fp16", "int4", "int2"], freezeFirstChunk: true)).description
                == "test.yaml: router.target_bits: 1.5 is outside the 3.400...16.000 average payload bits that experts fp16, int4, int2 can give here (chunk 0 frozen at 16 bits: yes)")
    }
}
