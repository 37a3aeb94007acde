/// A matrix recorded on a tape: its value, its gradient, and the closure that sends the gradient
/// to the variables it was computed from.
public final class Variable {
    public let rows: Int
    public let cols: Int
    /// `(rows, cols)` row-major.
    public internal(set) var value: [Float]
    /// `(rows, cols)`, zero until `Tape.backward`; empty for variables that need no gradient.
    public internal(set) var grad: [Float]
    public let requiresGrad: Bool
    fileprivate let backward: ((Variable) -> Void)?

    fileprivate init(rows: Int, cols: Int, value: [Float], requiresGrad: Bool, backward: ((Variable) -> Void)?) {
        precondition(value.count == rows * cols, "value holds \(value.count) floats, shape is (\(rows), \(cols))")
        self.rows = rows
        self.cols = cols
        self.value = value
        self.requiresGrad = requiresGrad
        self.grad = requiresGrad ? [Float](repeating: 0, count: rows * cols) : []
        self.backward = backward
    }

    public var count: Int { rows * cols }
}

/// Records primitive operations eagerly, in order, so reverse order is a topological order for backward.
///
/// Only primitives have backward code; the router and the loss are built from them. Each primitive
/// pairs a forward kernel and a backward kernel from `TapeKernels.swift`.
public final class Tape {
    private var variables: [Variable] = []

    public init() {}

    /// An input that receives no gradient.
    public func constant(_ value: [Float], rows: Int, cols: Int) -> Variable {
        record(Variable(rows: rows, cols: cols, value: value, requiresGrad: false, backward: nil))
    }

    /// A leaf whose gradient is wanted.
    public func parameter(_ value: [Float], rows: Int, cols: Int) -> Variable {
        record(Variable(rows: rows, cols: cols, value: value, requiresGrad: true, backward: nil))
    }

    /// Runs backward from `output` (seeded with `seed` in every element), accumulating into every
    /// `grad` reached.
    public func backward(from output: Variable, seed: Float = 1) {
        precondition(output.requiresGrad, "backward from a variable that needs no gradient")
        for index in output.grad.indices { output.grad[index] += seed }
        for variable in variables.reversed() { variable.backward?(variable) }
    }

    private func record(_ variable: Variable) -> Variable {
        variables.append(variable)
        return variable
    }

    /// Creates the output of an operation; its backward closure runs only if an input needs a gradient.
    private func output(rows: Int, cols: Int, inputs: [Variable], forward: (UnsafeMutablePointer<Float>) -> Void,
                        backward: @escaping (Variable) -> Void) -> Variable {
        var value = [Float](repeating: 0, count: rows * cols)
        value.withUnsafeMutableBufferPointer { buffer in buffer.baseAddress.map(forward) }
        let requiresGrad = inputs.contains { $0.requiresGrad }
        return record(Variable(rows: rows, cols: cols, value: value, requiresGrad: requiresGrad, backward: requiresGrad ? backward : nil))
    }

    // MARK: - Primitives

    /// a (n,k) · b (k,m) → (n,m).
    public func matmul(_ a: Variable, _ b: Variable) -> Variable {
        precondition(a.cols == b.rows && a !== b, "matmul: (\(a.rows), \(a.cols)) · (\(b.rows), \(b.cols))")
        let (n, k, m) = (a.rows, a.cols, b.cols)
        return output(rows: n, cols: m, inputs: [a, b], forward: { out in
            matmulForward(out, a.value, b.value, n: n, k: k, m: m)
        }, backward: { out in
            if a.requiresGrad { matmulBackwardInput(&a.grad, out.grad, b.value, n: n, k: k, m: m) }
            if b.requiresGrad { matmulBackwardWeight(&b.grad, out.grad, a.value, n: n, k: k, m: m) }
        })
    }

    /// SiLU, elementwise.
    public func silu(_ x: Variable) -> Variable {
        output(rows: x.rows, cols: x.cols, inputs: [x], forward: { out in
            siluForward(out, x.value, count: x.count)
        }, backward: { out in
            siluBackward(&x.grad, out.grad, x.value, count: x.count)
        })
    }

    /// a ⊙ b, elementwise.
    public func multiply(_ a: Variable, _ b: Variable) -> Variable {
        precondition(a.rows == b.rows && a.cols == b.cols && a !== b, "multiply: shapes differ or inputs alias")
        return output(rows: a.rows, cols: a.cols, inputs: [a, b], forward: { out in
            multiplyForward(out, a.value, b.value, count: a.count)
        }, backward: { out in
            withOptionalGrad(a) { da in
                withOptionalGrad(b) { db in multiplyBackward(da, db, out.grad, a.value, b.value, count: a.count) }
            }
        })
    }

    /// Softmax of each row.
    public func softmaxRows(_ z: Variable) -> Variable {
        output(rows: z.rows, cols: z.cols, inputs: [z], forward: { out in
            softmaxRowsForward(out, z.value, rows: z.rows, cols: z.cols)
        }, backward: { out in
            softmaxRowsBackward(&z.grad, out.grad, out.value, rows: z.rows, cols: z.cols)
        })
    }

    /// Log-softmax of each row: `z − log Σ_j exp(z_j)`.
    public func logSoftmaxRows(_ z: Variable) -> Variable {
        output(rows: z.rows, cols: z.cols, inputs: [z], forward: { out in
            logSoftmaxRowsForward(out, z.value, rows: z.rows, cols: z.cols)
        }, backward: { out in
            logSoftmaxRowsBackward(&z.grad, out.grad, out.value, rows: z.rows, cols: z.cols)
        })
    }

    /// Maximum of each run of `groupSize` consecutive rows, per column: (n, m) → (n / groupSize, m).
    /// The gradient goes to the first row holding the maximum.
    public func maxOfRowGroups(_ a: Variable, groupSize: Int) -> Variable {
        precondition(groupSize > 0 && a.rows % groupSize == 0, "maxOfRowGroups: \(a.rows) rows in groups of \(groupSize)")
        let winners = maxOfRowGroupsWinners(a.value, rows: a.rows, cols: a.cols, groupSize: groupSize)
        return output(rows: a.rows / groupSize, cols: a.cols, inputs: [a], forward: { out in
            for (i, row) in winners.enumerated() { out[i] = a.value[row * a.cols + i % a.cols] }
        }, backward: { out in
            for (i, row) in winners.enumerated() { a.grad[row * a.cols + i % a.cols] += out.grad[i] }
        })
    }

    /// Mean of each run of `groupSize` consecutive rows: (n, m) → (n / groupSize, m).
    public func meanOfRowGroups(_ a: Variable, groupSize: Int) -> Variable {
        precondition(groupSize > 0 && a.rows % groupSize == 0, "meanOfRowGroups: \(a.rows) rows in groups of \(groupSize)")
        return output(rows: a.rows / groupSize, cols: a.cols, inputs: [a], forward: { out in
            meanOfRowGroupsForward(out, a.value, rows: a.rows, cols: a.cols, groupSize: groupSize)
        }, backward: { out in
            meanOfRowGroupsBackward(&a.grad, out.grad, rows: a.rows, cols: a.cols, groupSize: groupSize)
        })
    }

    /// One element per row: (n, m) → (n, 1) holding `a[i, columns[i]]`.
    public func pick(_ a: Variable, columns: [Int]) -> Variable {
        precondition(columns.count == a.rows && columns.allSatisfy { (0..<a.cols).contains($0) }, "pick: bad columns")
        return output(rows: a.rows, cols: 1, inputs: [a], forward: { out in
            pickForward(out, a.value, columns: columns, cols: a.cols)
        }, backward: { out in
            pickBackward(&a.grad, out.grad, columns: columns, cols: a.cols)
        })
    }

    /// Σ_i w_i a_i over all elements → (1, 1); the weights are constants.
    public func weightedSum(_ a: Variable, weights: [Float]) -> Variable {
        precondition(weights.count == a.count, "weightedSum: \(weights.count) weights for \(a.count) values")
        return output(rows: 1, cols: 1, inputs: [a], forward: { out in
            weightedSumForward(out, a.value, weights: weights)
        }, backward: { out in
            weightedSumBackward(&a.grad, out.grad, weights: weights)
        })
    }

    /// a + b, elementwise.
    public func add(_ a: Variable, _ b: Variable) -> Variable {
        precondition(a.rows == b.rows && a.cols == b.cols, "add: shapes differ")
        return output(rows: a.rows, cols: a.cols, inputs: [a, b], forward: { out in
            for i in 0..<a.count { out[i] = a.value[i] + b.value[i] }
        }, backward: { out in
            if a.requiresGrad { for i in 0..<a.count { a.grad[i] += out.grad[i] } }
            if b.requiresGrad { for i in 0..<b.count { b.grad[i] += out.grad[i] } }
        })
    }

    /// c · a, elementwise, for a constant c.
    public func scale(_ a: Variable, by c: Float) -> Variable {
        output(rows: a.rows, cols: a.cols, inputs: [a], forward: { out in
            for i in 0..<a.count { out[i] = c * a.value[i] }
        }, backward: { out in
            for i in 0..<a.count { a.grad[i] += c * out.grad[i] }
        })
    }
}

/// Calls `body` with a pointer to `v.grad`, or with nil when `v` needs no gradient.
private func withOptionalGrad(_ v: Variable, _ body: (UnsafeMutablePointer<Float>?) -> Void) {
    if v.requiresGrad {
        v.grad.withUnsafeMutableBufferPointer { buffer in buffer.baseAddress.map(body) }
    } else {
        body(nil)
    }
}
