import MoQAEReference
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

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

    static func routed(_ store: CalibrationStore, pooling: ChunkPooling, hidden: Int? = nil) -> RoutedStore {
        let layout = RoutingLayout(layers: 5, heads: 3, tokens: 320, inputDim: 16, chunkSize: 32, groupSize: 2, freezeFirstChunk: true,
                                   pooling: pooling)
        return RoutedStore(store: store, setup: RouterSetup(layout: layout, experts: store.manifest.experts, valueGroup: 16,
                                                           headDim: 16, routerInput: .key, hiddenWidth: hidden),
                           expertColumns: [0, 1, 2], calibrationFraction: 0.1, validationFraction: 0)
    }

    @Test(arguments: LossKind.allCases, [0.0, 0.3, 1.0])
    func matchesTheTape(kind: LossKind, lambda: Double) throws {
        try expectStreamingMatchesTheTape(data: data, kind: kind, lambda: lambda)
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
