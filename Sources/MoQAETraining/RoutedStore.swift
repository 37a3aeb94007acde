import MoQAEExperts
import MoQAERouter
import MoQAEStore

/// What a router export or checkpoint needs to know about routing besides the weights.
public struct RouterSetup: Equatable, Sendable {
    public let layout: RoutingLayout
    public let experts: [Expert]
    public let valueGroup: Int
    /// The model's head dimension, for storage bits (the router's input width is `layout.inputDim`).
    public let headDim: Int
    public let routerInput: RouterInput
    /// H, the routers' hidden width (M in the paper).
    public let hiddenWidth: Int

    /// - Parameter hiddenWidth: H (nil: M, the paper's).
    public init(layout: RoutingLayout, experts: [Expert], valueGroup: Int, headDim: Int, routerInput: RouterInput, hiddenWidth: Int? = nil) {
        self.layout = layout
        self.experts = experts
        self.valueGroup = valueGroup
        self.headDim = headDim
        self.routerInput = routerInput
        self.hiddenWidth = hiddenWidth ?? experts.count
    }

    /// Number of router weights.
    public var parameterCount: Int {
        RouterParameters.parameterCount(routers: layout.routers, inputDim: layout.inputDim, experts: experts.count, hidden: hiddenWidth)
    }

    /// Bits (with constants) of one layer-unit at each expert.
    public var unitBits: [Double] {
        experts.map { Double($0.unitStorageBits(chunkSize: layout.chunkSize, headDim: headDim, valueGroup: valueGroup)) }
    }
}

/// A calibration store seen through a router setup: the calibration and validation splits, and
/// sequence loading that touches only the leader layers.
public final class RoutedStore: @unchecked Sendable {
    public let store: CalibrationStore
    public let setup: RouterSetup
    /// Store column of each router expert.
    public let expertColumns: [Int]
    public let calibration: [CalibrationStore.Sequence]
    public let validation: [CalibrationStore.Sequence]

    public var layout: RoutingLayout { setup.layout }
    public var experts: [Expert] { setup.experts }

    /// Checks the config against the store (experts, chunk size, fractions) and selects the splits.
    /// - Parameter source: where the config came from, for error messages.
    public convenience init(store: CalibrationStore, config: TrainingConfig, source: String) throws(ConfigError) {
        let manifest = store.manifest
        var columns: [Int] = []
        for name in config.expertNames {
            guard let column = manifest.experts.firstIndex(where: { $0.name == name }) else {
                throw ConfigError(location: source, key: "router.experts",
                                  reason: .expertNotInStore(expert: name, store: store.path, available: manifest.experts.map(\.name)))
            }
            columns.append(column)
        }
        guard config.chunkSize == manifest.chunkSize else {
            throw ConfigError(location: source, key: "router.chunk_size",
                              reason: .chunkSizeMismatch(configured: config.chunkSize, store: store.path, stored: manifest.chunkSize))
        }
        let available = manifest.selectionFraction
        guard config.calibrationFraction + config.validationFraction <= available + 1e-12 else {
            throw ConfigError(location: source, key: "data.calibration_fraction",
                              reason: .fractionsExceedStore(requested: config.calibrationFraction + config.validationFraction, available: available,
                                                           store: store.path))
        }
        let layout = RoutingLayout(layers: store.model.numLayers, heads: store.model.numKVHeads, tokens: manifest.seqLen,
                                   inputDim: store.inputWidth, chunkSize: config.chunkSize, groupSize: config.groupSize,
                                   freezeFirstChunk: config.freezeFirstChunk, pooling: config.pooling,
                                   firstHeldChunks: manifest.firstHeldChunks)
        if let router = (0..<layout.routers).first(where: { r in
            layout.layers(of: r).contains { manifest.firstHeldChunks[$0] != manifest.firstHeldChunks[layout.leaderLayer(of: r)] }
        }) {
            let layers = layout.layers(of: router)
            throw ConfigError(location: source, key: "router.group_size",
                              reason: .groupMixesHeldChunks(router: router, layers: layers,
                                                            firstHeldChunks: layers.map { manifest.firstHeldChunks[$0] }, store: store.path))
        }
        guard (0..<layout.routers).allSatisfy({ layout.units(of: $0) > 0 }) else {
            throw ConfigError(location: source, key: "router.freeze_first_chunk",
                              reason: .nothingToRoute(tokens: manifest.seqLen, chunks: layout.chunks, chunkSize: config.chunkSize))
        }
        let setup = RouterSetup(layout: layout, experts: columns.map { manifest.experts[$0] }, valueGroup: manifest.valueGroup,
                                headDim: store.model.headDim, routerInput: manifest.routerInput, hiddenWidth: config.hiddenWidth)
        self.init(store: store, setup: setup, expertColumns: columns,
                  calibrationFraction: config.calibrationFraction, validationFraction: config.validationFraction)
        guard !calibration.isEmpty else {
            throw ConfigError(location: source, key: "data.calibration_fraction",
                              reason: .noCalibrationSequences(store: store.path, sequences: store.sequences.count))
        }
    }

    public init(store: CalibrationStore, setup: RouterSetup, expertColumns: [Int], calibrationFraction: Double, validationFraction: Double) {
        self.store = store
        self.setup = setup
        self.expertColumns = expertColumns
        let seed = store.manifest.selectionSeed
        calibration = store.sequences.filter { Selection.contains(id: $0.id, seed: seed, lower: 0, upper: calibrationFraction) }
        validation = store.sequences.filter {
            Selection.contains(id: $0.id, seed: seed, lower: calibrationFraction, upper: calibrationFraction + validationFraction)
        }
    }

    /// A sequence's `delta_nll`, read through the router's experts.
    public func sensitivity(of sequence: CalibrationStore.Sequence) -> SensitivityTable {
        SensitivityTable(values: store.deltaNLL(of: sequence), heads: layout.heads, chunks: layout.chunks,
                         storeExperts: store.manifest.experts.count, columns: expertColumns)
    }
}
