import MoQAEReference
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing
#if canImport(Glibc)
import Glibc
#else
import Darwin
#endif

/// The streaming pass the trainer runs against the tape, on a store with several heads, routers and
/// blocks per head, F16 inputs and a partial last batch.
@Suite struct StreamingTests {
    let store: CalibrationStore
    let data: RoutedStore
    let parameters: RouterParameters

    init() throws {
        let path = makeTemporaryDirectory("streaming")
        try SyntheticStore.write(shape: .init(name: "test", layers: 5, heads: 3, headDim: 16, tokens: 320), sequences: 5, to: path)
        store = try CalibrationStore(path: path)
        data = Self.routed(store, pooling: .vote)
        var random = RandomGenerator(seed: 3)
        parameters = RouterParameters.initialized(routers: 3, inputDim: 16, experts: 3, random: &random)
    }

    static func routed(_ store: CalibrationStore, pooling: ChunkPooling, hidden: Int? = nil, firstHeldChunks: [Int]? = nil) -> RoutedStore {
        let layout = RoutingLayout(layers: 5, heads: 3, tokens: 320, inputDim: 16, chunkSize: 32, groupSize: 2, freezeFirstChunk: true,
                                   pooling: pooling, firstHeldChunks: firstHeldChunks)
        return RoutedStore(store: store, setup: RouterSetup(layout: layout, experts: store.manifest.experts, valueGroup: 16,
                                                           headDim: 16, routerInput: .key, hiddenWidth: hidden),
                           expertColumns: [0, 1, 2], calibrationFraction: 0.1, validationFraction: 0)
    }

    @Test(arguments: LossKind.allCases, [0.0, 0.3, 1.0])
    func matchesTheTape(kind: LossKind, lambda: Double) throws {
        try expectStreamingMatchesTheTape(data: data, kind: kind, lambda: lambda)
    }

    /// Routers of sliding layers route only the chunks their caches hold (router 0 from chunk 3, router 2 from chunk
    /// 6, router 1 from 1): blocks, units and the memory term per router, streamed as the tape computes them.
    @Test(arguments: LossKind.allCases, [ChunkPooling.vote, .max])
    func slidingLayersMatchTheTape(kind: LossKind, pooling: ChunkPooling) throws {
        let sliding = Self.routed(store, pooling: pooling, firstHeldChunks: [3, 3, 0, 0, 6])
        #expect(sliding.layout.units(of: 0) == 3 * 7 && sliding.layout.units(of: 2) == 3 * 4)
        try expectStreamingMatchesTheTape(data: sliding, kind: kind, lambda: 0.3)
    }

    /// The pooled chunk probabilities, streamed, against the tape's independent log-softmax and pooling.
    @Test(arguments: [ChunkPooling.mean, .max], LossKind.allCases)
    func pooledMatchesTheTape(pooling: ChunkPooling, kind: LossKind) throws {
        let pooled = Self.routed(store, pooling: pooling)
        try expectStreamingMatchesTheTape(data: pooled, kind: kind, lambda: 0.3)
        let vote = try SequenceStreamer(data: data, workers: 1).decisions(data.calibration, parameters: parameters)
        #expect(try SequenceStreamer(data: pooled, workers: 1).decisions(pooled.calibration, parameters: parameters) != vote,
                "pooling should change some decision")
    }

    /// Decisions under an export's bits price against a Double brute force: token logits z − price · bits_j
    /// from the weights, log-softmax, the chunk's pooling, and the tie rule (more bits, then the lower index).
    @Test(arguments: ChunkPooling.allCases, [Float(-0.02), 0.03, 0.1])
    func bitsPriceDecisionsMatchABruteForce(pooling: ChunkPooling, price: Float) throws {
        let data = Self.routed(store, pooling: pooling)
        var parameters = self.parameters
        parameters.values = parameters.values.map { 2 * $0 }   // logits of a few nats, beside which the price matters
        let layout = data.layout, experts = data.experts, (D, M, H) = (16, 3, parameters.hidden)
        let streamed = try SequenceStreamer(data: data, workers: 1).decisions(data.calibration, parameters: parameters, bitsPrice: price)
        var chosen = Set<Int>()
        for (sequence, decisions) in zip(data.calibration, streamed) {
            for (router, inputs) in data.leaderInputs(of: sequence).enumerated() {
                let (w1, w2, w3) = (parameters.entry(router: router, .w1), parameters.entry(router: router, .w2), parameters.entry(router: router, .w3))
                /// One token's log-softmax of z − price · bits, in Double.
                func logProbabilities(_ row: Int) -> [Double] {
                    var h = [Double](repeating: 0, count: H)
                    for j in 0..<H {
                        var (a, b) = (0.0, 0.0)
                        for d in 0..<D {
                            let x = Double(inputs[row * D + d])
                            a += x * Double(parameters.values[w1.offset + d * H + j])
                            b += x * Double(parameters.values[w2.offset + d * H + j])
                        }
                        h[j] = a / (1 + exp(-a)) * b
                    }
                    var z = [Double](repeating: 0, count: M)
                    for k in 0..<M {
                        for j in 0..<H { z[k] += h[j] * Double(parameters.values[w3.offset + j * M + k]) }
                        z[k] -= Double(price) * experts[k].bitWidth
                    }
                    let top = z.max()!
                    let logTotal = log(z.reduce(0.0) { $0 + exp($1 - top) })
                    return z.map { $0 - top - logTotal }
                }
                let logP = (0..<(inputs.count / D)).map(logProbabilities)
                for unit in 0..<layout.units(of: router) {
                    let rows = logP[(unit * layout.chunkSize)..<((unit + 1) * layout.chunkSize)]
                    let score: [Double] = (0..<M).map { k in
                        switch pooling {
                        case .vote: Double(rows.filter { row in row.indices.max { row[$0] < row[$1] || (row[$0] == row[$1] && $0 > $1) } == k }.count)
                        case .mean: rows.reduce(0) { $0 + $1[k] } / Double(rows.count)
                        case .max: rows.map { $0[k] }.max()!
                        }
                    }
                    let best = (1..<M).reduce(0) { best, k in
                        score[k] > score[best] || (score[k] == score[best] && experts[k].totalBits > experts[best].totalBits) ? k : best
                    }
                    #expect(decisions[router][unit] == best, "router \(router) unit \(unit)")
                    chosen.insert(best)
                }
            }
        }
        let unpriced = try SequenceStreamer(data: data, workers: 1).decisions(data.calibration, parameters: parameters)
        #expect(chosen.count > 1 && unpriced != streamed, "the price should change some decisions, not all")
    }

    /// Hidden widths other than M (narrower and wider, odd, across the kernels' 6-column tiles).
    @Test(arguments: [2, 7, 16], [ChunkPooling.vote, .max])
    func hiddenWidthMatchesTheTape(hidden: Int, pooling: ChunkPooling) throws {
        let wide = Self.routed(store, pooling: pooling, hidden: hidden)
        var random = RandomGenerator(seed: 4)
        let parameters = RouterParameters.initialized(routers: 3, inputDim: 16, experts: 3, hidden: hidden, random: &random)
        try expectStreamingMatchesTheTape(data: wide, kind: .expected, lambda: 0.3, parameters: parameters)
    }

    func expectStreamingMatchesTheTape(data: RoutedStore, kind: LossKind, lambda: Double, parameters: RouterParameters? = nil) throws {
        let parameters = parameters ?? self.parameters
        #expect(data.calibration.count == 5)
        let loss = LossSettings(kind: kind, lambda: lambda)
        let reference = data.referenceBatchGradient(data.calibration, parameters: parameters, loss: loss)
        for blockChunks in [1, 4, 9] {
            let streamed = try SequenceStreamer(data: data, workers: 1, blockChunks: blockChunks)
                .batchGradient(data.calibration, parameters: parameters, loss: loss)
            #expect(streamed.decisions == reference.decisions)
            #expect(streamed.figures.decisionCounts == reference.figures.decisionCounts)
            #expect(abs(streamed.figures.loss - reference.figures.loss) <= 1e-5 * abs(reference.figures.loss))
            #expect(abs(streamed.figures.meanEstimatedNLL - reference.figures.meanEstimatedNLL) <= 1e-6 * reference.figures.meanEstimatedNLL)
            let scale = reference.gradient.map(abs).max()!
            let error = zip(streamed.gradient, reference.gradient).map { abs($0 - $1) }.max()!
            #expect(scale > 0 && error <= 1e-5 * scale, "block \(blockChunks): max error \(error), scale \(scale)")
        }
    }

    /// Each sequence is summed whole by one worker, in batch order: any worker count gives the same bits.
    @Test(arguments: LossKind.allCases)
    func workerCountDoesNotChangeTheResult(kind: LossKind) throws {
        let loss = LossSettings(kind: kind, lambda: 0.5)
        let one = try SequenceStreamer(data: data, workers: 1).batchGradient(data.calibration, parameters: parameters, loss: loss)
        for workers in [2, 3, 8] {
            let many = try SequenceStreamer(data: data, workers: workers).batchGradient(data.calibration, parameters: parameters, loss: loss)
            #expect(many.gradient == one.gradient && many.figures == one.figures && many.decisions == one.decisions)
        }
        let decisions = try SequenceStreamer(data: data, workers: 2).decisions(data.calibration, parameters: parameters)
        #expect(decisions == one.decisions)
    }
}
