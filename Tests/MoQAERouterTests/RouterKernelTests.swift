import CRouterKernels
import Foundation
import MoQAETestSupport
import Testing

/// The streaming pass's C kernels against a float64 reference of docs/FORMATS.md, Router, over shapes that reach
/// every tile and tail: token counts that are not a multiple of the 4-token tile, head widths below,
/// at and between multiples of 16 and 64, and expert counts whose 2M columns do not fill a 6-column tile,
/// with the wide (AVX-512) register tiles and the narrow ones.
@Suite struct RouterKernelTests {
    /// One router's weights and a block of token vectors.
    struct Case {
        let rows: Int, d: Int, m: Int
        let x: [Float]  // (rows, d)
        let w12t: [Float]  // (2m, d)
        let w3: [Float]  // (m, m)

        init(rows: Int, d: Int, m: Int, seed: UInt64) {
            var s = Sampler(state: seed)
            (self.rows, self.d, self.m) = (rows, d, m)
            x = s.values(rows * d, scale: 2)
            w12t = s.values(2 * m * d, scale: 1 / Float(d).squareRoot())
            w3 = s.values(m * m, scale: 1 / Float(m).squareRoot())
        }

        /// Per token a, b, σ(a), h and p, in float64, with weights perturbed by `dw12t` and `dw3` (column j of W1 is row j of w12t).
        func reference(dw12t: [Double]? = nil, dw3: [Double]? = nil) -> [(a: [Double], b: [Double], s: [Double], h: [Double], p: [Double])] {
            (0..<rows).map { t in
                let pre = (0..<(2 * m)).map { c in
                    (0..<d).reduce(0.0) { $0 + Double(x[t * d + $1]) * (Double(w12t[c * d + $1]) + (dw12t?[c * d + $1] ?? 0)) }
                }
                let a = Array(pre[0..<m]), b = Array(pre[m...])
                let s = a.map { 1 / (1 + exp(-$0)) }
                let h = (0..<m).map { a[$0] * s[$0] * b[$0] }
                let z = (0..<m).map { k in (0..<m).reduce(0.0) { $0 + h[$1] * (Double(w3[$1 * m + k]) + (dw3?[$1 * m + k] ?? 0)) } }
                let e = z.map { exp($0 - z.max()!) }
                return (a, b, s, h, e.map { $0 / e.reduce(0, +) })
            }
        }

        /// Σ_k upstream_k · P_k with P the mean of p over the tokens: the function the chunk backward differentiates.
        func upstreamLoss(_ upstream: [Float], dw12t: [Double]? = nil, dw3: [Double]? = nil) -> Double {
            let tokens = reference(dw12t: dw12t, dw3: dw3)
            return tokens.reduce(0.0) { total, token in total + (0..<m).reduce(0.0) { $0 + Double(upstream[$1]) * token.p[$1] } } / Double(rows)
        }
    }

    static let shapes: [(rows: Int, d: Int, m: Int)] = [
        (1, 8, 3), (7, 8, 3), (32, 16, 3), (9, 20, 2), (32, 64, 3), (13, 80, 5), (64, 128, 3), (33, 136, 4), (5, 16, 8),
    ]

    @Test(arguments: shapes, [Int32(1), 0]) func forwardMatchesFloat64(shape: (rows: Int, d: Int, m: Int), wide: Int32) {
        let c = Case(rows: shape.rows, d: shape.d, m: shape.m, seed: UInt64(shape.rows * 1000 + shape.d * 10 + shape.m))
        let (rows, m) = (c.rows, c.m)
        let stride = rows + 3  // a stride wider than the block, as in a block's last, shorter call
        var ab = [Float](repeating: .nan, count: 2 * m * stride)
        var (s, h, p) = ([Float](repeating: .nan, count: m * stride), [Float](repeating: .nan, count: m * stride), [Float](repeating: .nan, count: m * stride))
        var choice = [Int32](repeating: -1, count: rows)
        var scratch = [Float](repeating: .nan, count: 2 * rows)
        moqae_router_forward(c.x, rows, c.d, m, m, c.w12t, c.w3, stride, &ab, &s, &h, &p, &choice, &scratch, wide, c.x, c.x.count * 4)
        for (t, token) in c.reference().enumerated() {
            for j in 0..<m {
                #expect(abs(Double(ab[j * stride + t]) - token.a[j]) <= 1e-5 * (1 + abs(token.a[j])), "a[\(j)] of token \(t)")
                #expect(abs(Double(ab[(m + j) * stride + t]) - token.b[j]) <= 1e-5 * (1 + abs(token.b[j])), "b[\(j)] of token \(t)")
                #expect(abs(Double(s[j * stride + t]) - token.s[j]) <= 1e-6, "σ(a)[\(j)] of token \(t)")
                #expect(abs(Double(h[j * stride + t]) - token.h[j]) <= 1e-5 * (1 + abs(token.h[j])), "h[\(j)] of token \(t)")
                #expect(abs(Double(p[j * stride + t]) - token.p[j]) <= 1e-6, "p[\(j)] of token \(t)")
            }
            let best = token.p.max()!
            let expected = token.p.firstIndex(of: best)!
            // The kernel's float32 argmax may only differ where two probabilities are equal to float precision.
            #expect(Int(choice[t]) == expected || abs(token.p[Int(choice[t])] - best) < 1e-6, "argmax of token \(t)")
        }
    }

    @Test(arguments: shapes, [Int32(1), 0]) func chunkBackwardMatchesFiniteDifferences(shape: (rows: Int, d: Int, m: Int), wide: Int32) {
        let c = Case(rows: shape.rows, d: shape.d, m: shape.m, seed: UInt64(shape.rows * 7 + shape.d * 3 + shape.m))
        let (n, d, m) = (c.rows, c.d, c.m)
        var sampler = Sampler(state: 99)
        let upstream = sampler.values(m)
        var ab = [Float](repeating: 0, count: 2 * m * n)
        var (s, h, p) = ([Float](repeating: 0, count: m * n), [Float](repeating: 0, count: m * n), [Float](repeating: 0, count: m * n))
        var choice = [Int32](repeating: 0, count: n)
        var scratch = [Float](repeating: .nan, count: 2 * n)
        moqae_router_forward(c.x, n, d, m, m, c.w12t, c.w3, n, &ab, &s, &h, &p, &choice, &scratch, wide, nil, 0)
        // The kernel adds into the parts: start them away from zero.
        let (start12, start3) = (sampler.values(2 * m * d), sampler.values(m * m))
        var (part12, part3) = (start12, start3)
        scratch = [Float](repeating: .nan, count: (4 * m + 1) * n)
        moqae_router_backward_chunk(c.x, n, d, m, m, c.w3, n, ab, s, h, p, upstream, &scratch, &part12, &part3, wide, c.x, c.x.count * 4)

        let step = 1e-4
        func numeric(w12t index: Int?, w3 index3: Int?) -> Double {
            func shifted(_ sign: Double) -> Double {
                var (d12, d3) = ([Double](repeating: 0, count: 2 * m * d), [Double](repeating: 0, count: m * m))
                if let index { d12[index] = sign * step }
                if let index3 { d3[index3] = sign * step }
                return c.upstreamLoss(upstream, dw12t: d12, dw3: d3)
            }
            return (shifted(1) - shifted(-1)) / (2 * step)
        }
        // Every W3 entry, and the W1/W2 entries of every column at the first and last dims and a middle one.
        for i in 0..<(m * m) {
            let expected = numeric(w12t: nil, w3: i)
            #expect(abs(Double(part3[i] - start3[i]) - expected) <= 1e-4 * (1 + abs(expected)), "W3[\(i)]")
        }
        for column in 0..<(2 * m) {
            for k in Set([0, d / 2 + 1, d - 1]) {
                let i = column * d + k
                let expected = numeric(w12t: i, w3: nil)
                #expect(abs(Double(part12[i] - start12[i]) - expected) <= 1e-4 * (1 + abs(expected)), "[W1 W2] column \(column), dim \(k)")
            }
        }
    }

    /// The kernels' exp agrees with libm's expf to a few ulp over the range it is used on, and clamps outside it.
    @Test func expAgreesWithExpf() {
        let inputs = (0...200_000).map { -87 + Float($0) * (175 / 200_000) } + [-1000, 1000]
        var outputs = [Float](repeating: 0, count: inputs.count)
        moqae_router_exp(inputs, &outputs, inputs.count)
        var worst: Float = 0
        for (x, y) in zip(inputs.dropLast(2), outputs) { worst = max(worst, abs(y - expf(x)) / expf(x)) }
        #expect(worst < 4e-7, "worst relative error \(worst)")
        #expect(outputs[outputs.count - 2] > 0 && outputs[outputs.count - 1].isFinite)
    }
}
