import Foundation
import MoQAEReference
import MoQAERouter
import MoQAEStore
import MoQAETraining
import Testing

/// Compares the trainer with values PyTorch computed in float64 (`Golden/make_golden.py`): for the
/// paper's and the expected loss, under every chunk pooling and at hidden widths M and 5, the loss
/// terms, decisions, every gradient, and the weights after 5 AdamW steps, each by name.
@Suite struct GoldenTests {
    /// Agreement asked of every compared tensor: max |swift − torch| ≤ 1e-4 · max |torch|.
    static let relativeTolerance = 1e-4

    let golden: SafeTensorsHeader
    let goldenFile: MappedFile
    let store: CalibrationStore
    let data: RoutedStore

    init() throws {
        let url = try #require(Bundle.module.url(forResource: "golden", withExtension: "safetensors"))
        goldenFile = try MappedFile(path: url.path)
        golden = try SafeTensorsHeader(file: goldenFile.bytes)
        let storePath = try #require(Bundle.module.url(forResource: "store", withExtension: nil)).path
        store = try CalibrationStore(path: storePath)
        data = Self.routed(store, pooling: .vote)
    }

    /// The router kinds of the golden file: every pooling at the paper's hidden width M = 3 and at 5.
    static let kinds = [3, 5].flatMap { hidden in ChunkPooling.allCases.map { (pooling: $0, hidden: hidden) } }

    static func routed(_ store: CalibrationStore, pooling: ChunkPooling, hidden: Int = 3) -> RoutedStore {
        let layout = RoutingLayout(layers: 4, heads: 2, tokens: 96, inputDim: 8, chunkSize: 32, groupSize: 3, freezeFirstChunk: true,
                                   pooling: pooling)
        return RoutedStore(store: store, setup: RouterSetup(layout: layout, experts: store.manifest.experts, valueGroup: 8,
                                                           headDim: 8, routerInput: .key, hiddenWidth: hidden),
                           expertColumns: [0, 1, 2], calibrationFraction: 1, validationFraction: 0)
    }

    /// Golden tensor names of a router kind start with `h5.` for hidden width 5, then the pooling,
    /// except the paper's vote.
    func prefix(_ pooling: ChunkPooling, _ hidden: Int) -> String {
        (hidden == 3 ? "" : "h\(hidden).") + (pooling == .vote ? "" : pooling.rawValue + ".")
    }

    /// A golden tensor as doubles (F64 or I64).
    func tensor(_ name: String) throws -> [Double] {
        let info = try #require(golden.tensor(named: name), "golden tensor \(name)")
        let base = goldenFile.bytes.baseAddress! + golden.dataOffset + info.dataRange.lowerBound
        return (0..<info.elementCount).map { index in
            switch info.dtype {
            case .f64: return base.loadUnaligned(fromByteOffset: 8 * index, as: Double.self)
            case .f32: return Double(base.loadUnaligned(fromByteOffset: 4 * index, as: Float.self))
            case .i64: return Double(base.loadUnaligned(fromByteOffset: 8 * index, as: Int64.self))
            default: return .nan
            }
        }
    }

    func expectClose(_ name: String, _ actual: [Double], _ expected: [Double]) {
        #expect(actual.count == expected.count, "\(name): \(actual.count) values, golden has \(expected.count)")
        let scale = expected.map(abs).max() ?? 0
        let error = zip(actual, expected).map { abs($0 - $1) }.max() ?? 0
        #expect(error <= Self.relativeTolerance * max(scale, 1e-12), "\(name): max error \(error), golden scale \(scale)")
    }

    func initialParameters(hidden: Int = 3) throws -> RouterParameters {
        var parameters = RouterParameters(routers: 2, inputDim: 8, experts: 3, hidden: hidden,
                                          values: Array(repeating: 0, count: 2 * (16 * hidden + 3 * hidden)))
        for entry in parameters.table {
            parameters.values.replaceSubrange(entry.range, with: try tensor((hidden == 3 ? "" : "h\(hidden).") + "init." + entry.name).map(Float.init))
        }
        return parameters
    }

    /// The two implementations of the loss gradient: the tape (the reference) and the streaming pass
    /// the trainer runs, with one and with two workers.
    enum Implementation: String, CaseIterable { case tape, streaming, streamingTwoWorkers }

    func batchGradient(_ implementation: Implementation, _ kind: LossKind, _ pooling: ChunkPooling,
                       parameters: RouterParameters) throws -> (gradient: [Float], figures: BatchFigures, decisions: [[[Int]]]) {
        let loss = LossSettings(kind: kind, lambda: 0.5)
        let data = Self.routed(store, pooling: pooling, hidden: parameters.hidden)
        switch implementation {
        case .tape:
            return data.referenceBatchGradient(data.calibration, parameters: parameters, loss: loss)
        case .streaming, .streamingTwoWorkers:
            let streamer = SequenceStreamer(data: data, workers: implementation == .streaming ? 1 : 2, blockChunks: 1)
            return try streamer.batchGradient(data.calibration, parameters: parameters, loss: loss)
        }
    }

    @Test(arguments: Implementation.allCases, LossKind.allCases)
    func lossTermsDecisionsAndGradients(_ implementation: Implementation, _ kind: LossKind) throws {
        for (pooling, hidden) in Self.kinds { try checkLossTermsDecisionsAndGradients(implementation, kind, pooling, hidden) }
    }

    func checkLossTermsDecisionsAndGradients(_ implementation: Implementation, _ kind: LossKind, _ pooling: ChunkPooling, _ hidden: Int) throws {
        #expect(data.calibration.count == 3)
        let parameters = try initialParameters(hidden: hidden)
        let (gradient, figures, decisions) = try batchGradient(implementation, kind, pooling, parameters: parameters)
        let pool = self.prefix(pooling, hidden)
        let prefix = pool + kind.rawValue + "."
        expectClose(prefix + "loss", [figures.loss], try tensor(prefix + "loss"))
        expectClose(prefix + "l_model", [figures.modelTerm], try tensor(prefix + "l_model"))
        expectClose(prefix + "l_mem", [figures.memoryTerm], try tensor(prefix + "l_mem"))
        let lNLL = zip(data.calibration, decisions).map { sequence, routerDecisions in
            estimatedNLL(nll: store.nll(of: sequence), decisions: routerDecisions, layout: data.layout, sensitivity: data.sensitivity(of: sequence))
        }
        expectClose(pool + "l_nll", lNLL, try tensor(pool + "l_nll"))
        #expect(decisions.map { $0.joined().map(Double.init) }.joined().map { $0 } == (try tensor(pool + "decisions")), "\(pool)decisions")
        for entry in parameters.table {
            expectClose(prefix + "grad." + entry.name, gradient[entry.range].map(Double.init), try tensor(prefix + "grad." + entry.name))
        }
    }

    /// The Swift exports of the initial weights equal those the Python script wrote on its own: the
    /// paper's router (version 1) and a max-pooling router of hidden width 5 (version 2).
    @Test(arguments: [("router-init", ChunkPooling.vote, 3), ("router-h5-max", .max, 5)])
    func exportMatchesIndependentWriter(resource: String, pooling: ChunkPooling, hidden: Int) throws {
        let url = try #require(Bundle.module.url(forResource: resource, withExtension: "bin"))
        let expected = [UInt8](try Data(contentsOf: url))
        let setup = Self.routed(store, pooling: pooling, hidden: hidden).setup
        let export = RouterExport(parameters: try initialParameters(hidden: hidden), setup: setup, weightType: .binary32)
        #expect(export.serialized() == expected)
        #expect(try RouterExport.parse(expected, path: url.path) == export)
    }

    @Test(arguments: Implementation.allCases, LossKind.allCases)
    func fiveAdamWSteps(_ implementation: Implementation, _ kind: LossKind) throws {
        for (pooling, hidden) in Self.kinds { try checkFiveAdamWSteps(implementation, kind, pooling, hidden) }
    }

    func checkFiveAdamWSteps(_ implementation: Implementation, _ kind: LossKind, _ pooling: ChunkPooling, _ hidden: Int) throws {
        let prefix = self.prefix(pooling, hidden) + kind.rawValue + "."
        var parameters = try initialParameters(hidden: hidden)
        var optimizer = AdamW(settings: AdamWSettings(), parameterCount: parameters.values.count)
        var losses: [Double] = []
        for _ in 0..<5 {
            let (gradient, figures, _) = try batchGradient(implementation, kind, pooling, parameters: parameters)
            losses.append(figures.loss)
            optimizer.update(&parameters.values, gradient: gradient)
        }
        expectClose(prefix + "step_losses", losses, try tensor(prefix + "step_losses"))
        for entry in parameters.table {
            expectClose(prefix + "after5." + entry.name, parameters.values[entry.range].map(Double.init), try tensor(prefix + "after5." + entry.name))
        }
        // The comparison can fail: 5 steps move the weights by far more than the tolerance.
        let initial = try initialParameters(hidden: hidden)
        #expect(zip(initial.values, parameters.values).map { abs($0 - $1) }.max()! > 1e-3)
    }
}
