#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// AdamW hyper-parameters (defaults: the paper's, as torch.optim.AdamW).
public struct AdamWSettings: Equatable, Sendable {
    public var learningRate: Double = 3e-4
    public var beta1: Double = 0.9
    public var beta2: Double = 0.999
    public var epsilon: Double = 1e-8
    public var weightDecay: Double = 0.01

    public init(learningRate: Double = 3e-4, beta1: Double = 0.9, beta2: Double = 0.999, epsilon: Double = 1e-8, weightDecay: Double = 0.01) {
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weightDecay = weightDecay
    }
}

/// AdamW with torch.optim.AdamW's semantics (single-tensor path): decoupled weight decay applied
/// first, then bias-corrected moments:
///
///     p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
///     p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)
public struct AdamW: Equatable, Sendable {
    public var settings: AdamWSettings
    /// Number of updates taken so far (t after an update).
    public private(set) var step: Int
    /// First moments, laid out like the parameters.
    public private(set) var m: [Float]
    /// Second moments, laid out like the parameters.
    public private(set) var v: [Float]

    public init(settings: AdamWSettings, parameterCount: Int) {
        self.init(settings: settings, step: 0, m: .init(repeating: 0, count: parameterCount), v: .init(repeating: 0, count: parameterCount))
    }

    public init(settings: AdamWSettings, step: Int, m: [Float], v: [Float]) {
        precondition(m.count == v.count)
        self.settings = settings
        self.step = step
        self.m = m
        self.v = v
    }

    public mutating func update(_ parameters: inout [Float], gradient: [Float]) {
        precondition(parameters.count == m.count && gradient.count == m.count)
        step += 1
        let s = settings
        let decay = Float(1 - s.learningRate * s.weightDecay)
        let beta1 = Float(s.beta1), beta2 = Float(s.beta2)
        let stepSize = Float(s.learningRate / (1 - pow(s.beta1, Double(step))))
        let correction2Root = Float((1 - pow(s.beta2, Double(step))).squareRoot())
        let epsilon = Float(s.epsilon)
        for i in parameters.indices {
            let g = gradient[i]
            parameters[i] *= decay
            m[i] += (g - m[i]) * (1 - beta1)
            v[i] = v[i] * beta2 + (1 - beta2) * g * g
            parameters[i] -= stepSize * m[i] / (v[i].squareRoot() / correction2Root + epsilon)
        }
    }
}

