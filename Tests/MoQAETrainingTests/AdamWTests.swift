import Foundation
import MoQAERouter
import MoQAETraining
import Testing

@Suite struct AdamWTests {
    /// Two steps against torch.optim.AdamW's formulas written out in double precision.
    @Test func matchesTorchFormulas() {
        let settings = AdamWSettings(learningRate: 0.1, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0.01)
        var optimizer = AdamW(settings: settings, parameterCount: 2)
        var parameters: [Float] = [0.5, -1]
        var reference: [Double] = [0.5, -1], m = [0.0, 0.0], v = [0.0, 0.0]
        for (step, gradient) in [[0.3, -0.2], [0.1, 0.4]].enumerated() {
            optimizer.update(&parameters, gradient: gradient.map(Float.init))
            let t = Double(step + 1)
            for i in 0..<2 {
                reference[i] *= 1 - 0.1 * 0.01
                m[i] = 0.9 * m[i] + 0.1 * gradient[i]
                v[i] = 0.999 * v[i] + 0.001 * gradient[i] * gradient[i]
                let denominator = v[i].squareRoot() / (1 - pow(0.999, t)).squareRoot() + 1e-8
                reference[i] -= 0.1 / (1 - pow(0.9, t)) * m[i] / denominator
            }
        }
        #expect(optimizer.step == 2)
        // Float32 arithmetic: a few ulps of relative error.
        for i in 0..<2 { #expect(abs(Double(parameters[i]) - reference[i]) <= 5e-6 * abs(reference[i]), "\(parameters[i]) vs \(reference[i])") }
    }

    @Test func initialisationBounds() {
        var random = RandomGenerator(seed: 0)
        let parameters = RouterParameters.initialized(routers: 2, inputDim: 16, experts: 3, random: &random)
        #expect(parameters.values.count == 2 * (2 * 16 * 3 + 9))
        #expect(parameters.table.map(\.name) == ["router.0.w1", "router.0.w2", "router.0.w3", "router.1.w1", "router.1.w2", "router.1.w3"])
        for entry in parameters.table {
            let bound = Float(1 / (entry.name.hasSuffix("w3") ? 3.0 : 16.0).squareRoot())
            #expect(parameters.values[entry.range].allSatisfy { abs($0) <= bound })
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
