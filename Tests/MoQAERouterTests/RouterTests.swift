import MoQAEExperts
import MoQAERouter
import Testing

@Suite struct DecisionTests {
    let experts = [Expert(name: "fp16", keyBits: 16, valueBits: 16), Expert(name: "int4", keyBits: 4, valueBits: 4),
                   Expert(name: "int2", keyBits: 2, valueBits: 2)]

    /// Token rows of a 4-token chunk whose argmaxes are `winners`.
    func chunk(_ winners: [Int]) -> [Float] {
        winners.flatMap { w in (0..<3).map { $0 == w ? Float(0.6) : Float(0.2) } }
    }

    @Test func majorityOfTokenArgmaxes() {
        #expect(chunkDecisions(probabilities: chunk([2, 2, 1, 0]), chunkSize: 4, experts: experts) == [2])
        #expect(chunkDecisions(probabilities: chunk([1, 1, 1, 2]) + chunk([0, 2, 2, 2]), chunkSize: 4, experts: experts) == [1, 2])
    }

    @Test func tiesGoToMoreBitsThenLowerIndex() {
        #expect(chunkDecisions(probabilities: chunk([2, 2, 1, 1]), chunkSize: 4, experts: experts) == [1])
        #expect(chunkDecisions(probabilities: chunk([2, 0, 0, 2]), chunkSize: 4, experts: experts) == [0])
        let equalBits = [Expert(name: "k4v2", keyBits: 4, valueBits: 2), Expert(name: "k2v4", keyBits: 2, valueBits: 4),
                         Expert(name: "int2", keyBits: 2, valueBits: 2)]
        #expect(chunkDecisions(probabilities: chunk([1, 0, 1, 0]), chunkSize: 4, experts: equalBits) == [0])
    }

    @Test func layoutCountsUnits() {
        let layout = RoutingLayout(layers: 32, heads: 8, tokens: 4100, inputDim: 128, chunkSize: 32, groupSize: 3, freezeFirstChunk: true)
        #expect(layout.routers == 11)
        #expect(layout.layers(of: 10) == 30..<32)
        #expect(layout.chunks == 128)
        #expect(layout.units(of: 0) == 8 * 127)
        #expect(layout.routedTokens(of: 0) == 32..<4096)
        #expect(layout.headAndChunk(ofUnit: 127, router: 0).head == 1 && layout.headAndChunk(ofUnit: 127, router: 0).chunk == 1)
        #expect(layout.heldTokens == 32 * 4100)
    }

    /// Sliding layers whose caches hold chunks from 100 (layers 0-2) and 127 (layers 30-31): their routers route
    /// only those, and the held tokens leave out what they do not hold.
    @Test func layoutRoutesOnlyTheChunksACacheHolds() {
        let held = [100, 100, 100] + Array(repeating: 0, count: 27) + [127, 127]
        let layout = RoutingLayout(layers: 32, heads: 8, tokens: 4100, inputDim: 128, chunkSize: 32, groupSize: 3, freezeFirstChunk: true,
                                   firstHeldChunks: held)
        #expect(layout.firstRoutedChunk(of: 0) == 100 && layout.firstRoutedChunk(of: 1) == 1 && layout.firstRoutedChunk(of: 10) == 127)
        #expect(layout.units(of: 0) == 8 * 28 && layout.units(of: 1) == 8 * 127 && layout.units(of: 10) == 8)
        #expect(layout.unitsPerSequence == 8 * (28 + 9 * 127 + 1))
        #expect(layout.layerUnitsPerSequence == 8 * (3 * 28 + 27 * 127 + 2 * 1))
        #expect(layout.routedTokens(of: 0) == 3200..<4096 && layout.rows(of: 10) == 8 * 32)
        #expect(layout.headAndChunk(ofUnit: 29, router: 0).head == 1 && layout.headAndChunk(ofUnit: 29, router: 0).chunk == 101)
        #expect(layout.heldTokens == 3 * (4100 - 3200) + 27 * 4100 + 2 * (4100 - 127 * 32))
    }
}
