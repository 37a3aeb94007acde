import COpenBLAS
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Forward/backward kernel pairs on raw row-major buffers. A backward kernel adds (+=) into its
// gradient outputs. Shapes are given as (rows, cols).

/// out (n,m) = a (n,k) · b (k,m), through `cblas_sgemm`.
func matmulForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, n: Int, k: Int, m: Int) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(m), Int32(k),
                1, a, Int32(k), b, Int32(m), 0, out, Int32(m))
}

/// da (n,k) += dout (n,m) · bᵀ.
func matmulBackwardInput(_ da: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, _ b: UnsafePointer<Float>, n: Int, k: Int, m: Int) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(n), Int32(k), Int32(m),
                1, dout, Int32(m), b, Int32(m), 1, da, Int32(k))
}

/// db (k,m) += aᵀ · dout, for a (n,k) and dout (n,m).
func matmulBackwardWeight(_ db: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, _ a: UnsafePointer<Float>, n: Int, k: Int, m: Int) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(k), Int32(m), Int32(n),
                1, a, Int32(k), dout, Int32(m), 1, db, Int32(m))
}

@inline(__always) func sigmoid(_ x: Float) -> Float { 1 / (1 + expf(-x)) }

/// out = x · σ(x), elementwise over `count` values.
func siluForward(_ out: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, count: Int) {
    for i in 0..<count { out[i] = x[i] * sigmoid(x[i]) }
}

/// dx += dout · σ(x) (1 + x (1 − σ(x))).
func siluBackward(_ dx: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, _ x: UnsafePointer<Float>, count: Int) {
    for i in 0..<count {
        let s = sigmoid(x[i])
        dx[i] += dout[i] * s * (1 + x[i] * (1 - s))
    }
}

/// out = a ⊙ b.
func multiplyForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
    for i in 0..<count { out[i] = a[i] * b[i] }
}

/// da += dout ⊙ b; db += dout ⊙ a.
func multiplyBackward(_ da: UnsafeMutablePointer<Float>?, _ db: UnsafeMutablePointer<Float>?, _ dout: UnsafePointer<Float>,
                      _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
    if let da { for i in 0..<count { da[i] += dout[i] * b[i] } }
    if let db { for i in 0..<count { db[i] += dout[i] * a[i] } }
}

/// out (n,m) = softmax of each row of z (n,m), max-subtracted.
func softmaxRowsForward(_ out: UnsafeMutablePointer<Float>, _ z: UnsafePointer<Float>, rows: Int, cols: Int) {
    for r in 0..<rows {
        let zr = z + r * cols, pr = out + r * cols
        var maximum = zr[0]
        for j in 1..<cols { maximum = max(maximum, zr[j]) }
        var sum: Float = 0
        for j in 0..<cols {
            pr[j] = expf(zr[j] - maximum)
            sum += pr[j]
        }
        for j in 0..<cols { pr[j] /= sum }
    }
}

/// dz += p ⊙ (dp − Σ_j dp_j p_j), row by row.
func softmaxRowsBackward(_ dz: UnsafeMutablePointer<Float>, _ dp: UnsafePointer<Float>, _ p: UnsafePointer<Float>, rows: Int, cols: Int) {
    for r in 0..<rows {
        let o = r * cols
        var dot: Float = 0
        for j in 0..<cols { dot += dp[o + j] * p[o + j] }
        for j in 0..<cols { dz[o + j] += p[o + j] * (dp[o + j] - dot) }
    }
}

/// out = z − max − log Σ exp(z − max), row by row.
func logSoftmaxRowsForward(_ out: UnsafeMutablePointer<Float>, _ z: UnsafePointer<Float>, rows: Int, cols: Int) {
    for r in 0..<rows {
        let o = r * cols
        var maximum = z[o]
        for j in 1..<cols { maximum = max(maximum, z[o + j]) }
        var sum: Float = 0
        for j in 0..<cols { sum += expf(z[o + j] - maximum) }
        let logSum = maximum + logf(sum)
        for j in 0..<cols { out[o + j] = z[o + j] - logSum }
    }
}

/// dz += dℓ − softmax(z) · Σ_j dℓ_j, row by row, with softmax(z) = exp(ℓ).
func logSoftmaxRowsBackward(_ dz: UnsafeMutablePointer<Float>, _ dl: UnsafePointer<Float>, _ l: UnsafePointer<Float>, rows: Int, cols: Int) {
    for r in 0..<rows {
        let o = r * cols
        var total: Float = 0
        for j in 0..<cols { total += dl[o + j] }
        for j in 0..<cols { dz[o + j] += dl[o + j] - expf(l[o + j]) * total }
    }
}

/// For each output element (g, j) of the row-group maximum of a (n, m): the row of a holding it,
/// the first among equals. `(n/g · m)` row indices.
func maxOfRowGroupsWinners(_ a: [Float], rows: Int, cols: Int, groupSize: Int) -> [Int] {
    (0..<(rows / groupSize * cols)).map { i in
        let (g, j) = (i / cols, i % cols)
        var best = g * groupSize
        for row in (g * groupSize + 1)..<((g + 1) * groupSize) where a[row * cols + j] > a[best * cols + j] { best = row }
        return best
    }
}

/// out (n/g, m) = mean of each run of g consecutive rows of a (n, m).
func meanOfRowGroupsForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, rows: Int, cols: Int, groupSize: Int) {
    let scale = 1 / Float(groupSize)
    for g in 0..<(rows / groupSize) {
        for j in 0..<cols {
            var sum: Float = 0
            for i in 0..<groupSize { sum += a[(g * groupSize + i) * cols + j] }
            out[g * cols + j] = sum * scale
        }
    }
}

/// da[g·s + i, j] += dout[g, j] / s.
func meanOfRowGroupsBackward(_ da: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, rows: Int, cols: Int, groupSize: Int) {
    let scale = 1 / Float(groupSize)
    for r in 0..<rows {
        for j in 0..<cols { da[r * cols + j] += dout[(r / groupSize) * cols + j] * scale }
    }
}

/// out (n,1) = a[i, columns[i]].
func pickForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, columns: [Int], cols: Int) {
    for (i, column) in columns.enumerated() { out[i] = a[i * cols + column] }
}

/// da[i, columns[i]] += dout[i].
func pickBackward(_ da: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, columns: [Int], cols: Int) {
    for (i, column) in columns.enumerated() { da[i * cols + column] += dout[i] }
}

/// out (1,1) = Σ_i w_i a_i, summed in double precision.
func weightedSumForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, weights: [Float]) {
    var sum: Double = 0
    for (i, w) in weights.enumerated() { sum += Double(w) * Double(a[i]) }
    out[0] = Float(sum)
}

/// da_i += w_i · dout.
func weightedSumBackward(_ da: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, weights: [Float]) {
    for (i, w) in weights.enumerated() { da[i] += w * dout[0] }
}

