import Foundation
@testable import MoQAETraining
import Testing

/// The Lagrangian allocation behind the static and prescient plans, against a brute-force search; the
/// same cases and rule as the Python evaluator's (`test_lagrangian_allocation_is_the_brute_force_optimum_at_hull_budgets`).
@Suite struct LagrangianTests {
    let bits: [Double] = [32, 16, 8, 4]

    /// At a budget equal to the bits of some μ's allocation (a point of the lower convex hull), the
    /// bisection finds a plan as cheap as the best of all 4^5 plans within that budget.
    @Test func isTheBruteForceOptimumAtHullBudgets() {
        var random = SplitMix(seed: 7)
        let (units, M) = (5, bits.count)
        for _ in 0..<20 {
            let costs = (0..<units * M).map { Double($0 % M) * random.unit() }          // option 0 costs nothing
            let mu = pow(10, random.unit() * 3 - 3)
            let hull = (0..<units).map { u in (0..<M).min { costs[u * M + $0] + mu * bits[$0] < costs[u * M + $1] + mu * bits[$1] }! }
            let budget = hull.reduce(0) { $0 + bits[$1] }
            let choices = lagrangianAllocation(options: costs, experts: M, unitBits: bits, budget: budget)
            let unitCosts = choices.enumerated().map { costs[$0.offset * M + $0.element] }.reduce(0, +)
            var best = Double.infinity
            for plan in 0..<Int(pow(Double(M), Double(units))) {
                let picks = (0..<units).map { plan / Int(pow(Double(M), Double($0))) % M }
                if picks.reduce(0, { $0 + bits[$1] }) <= budget { best = min(best, picks.enumerated().map { costs[$0.offset * M + $0.element] }.reduce(0, +)) }
            }
            #expect(choices.reduce(0) { $0 + bits[$1] } <= budget)
            #expect(abs(unitCosts - best) <= 1e-12, "cost \(unitCosts), brute force \(best)")
        }
    }

    /// At any budget, the allocation of the smallest feasible μ, found exactly among the μ where some
    /// unit's choice changes (so a bisection cut short, landing on a larger μ, fails).
    @Test func takesTheSmallestFeasibleMultiplier() {
        var random = SplitMix(seed: 11)
        let (units, M) = (12, bits.count)
        for _ in 0..<20 {
            let costs = (0..<units * M).map { Double($0 % M) * random.unit() }
            func allocate(_ mu: Double) -> [Int] {
                (0..<units).map { u in (0..<M).min { costs[u * M + $0] + mu * bits[$0] < costs[u * M + $1] + mu * bits[$1] }! }
            }
            var multipliers: [Double] = [0]
            for u in 0..<units {
                for a in 0..<M { for b in 0..<M where bits[a] > bits[b] && costs[u * M + b] > costs[u * M + a] {
                    multipliers.append((costs[u * M + b] - costs[u * M + a]) / (bits[a] - bits[b]) * (1 + 1e-9))
                } }
            }
            let budget = Double(units) * (4 + random.unit() * 28)
            let exact = multipliers.sorted().lazy.map(allocate).first { $0.reduce(0) { $0 + bits[$1] } <= budget }!
            #expect(lagrangianAllocation(options: costs, experts: M, unitBits: bits, budget: budget) == exact)
        }
    }

    /// A tie goes to more bits, then to the lower index; a budget nothing meets gets the fewest bits.
    @Test func tiesAndInfeasibleBudgets() {
        let costs: [Double] = [0.5, 0.5, 0.9, 0.9, 0.2, 0.7, 0.2, 0.9]   // two units over experts of 32, 16, 8, 4 bits
        #expect(lagrangianAllocation(options: costs, experts: 4, unitBits: bits, budget: 100) == [0, 0])
        let tiedBits: [Double] = [8, 16, 4, 16]
        #expect(lagrangianAllocation(options: [0.3, 0.3, 0.9, 0.3, 0.3, 0.8, 0.3, 0.9], experts: 4, unitBits: tiedBits, budget: 100) == [1, 0])
        #expect(lagrangianAllocation(options: costs, experts: 4, unitBits: bits, budget: 1) == [3, 3])
    }
}

/// A small seeded generator for test tables.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func unit() -> Double {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Double((z ^ (z >> 31)) >> 11) / Double(1 << 53)
    }
}
