import MoQAEExperts

/// How a chunk's decision `R_u` and the probability `P_u` that training pushes come from the
/// probabilities `p_t` of its N tokens.
public enum ChunkPooling: String, CaseIterable, Sendable {
    /// The paper's (Eq. 2): the expert most tokens pick (`chunkDecisions`); `P_u = (1/N) Σ_t p_t`.
    case vote
    /// `P_u = softmax_j((1/N) Σ_t log p_tj)`, the normalised geometric mean; `R_u = argmax P_u`.
    case mean
    /// `P_u = softmax_j(max_t log p_tj)`: one confident token is enough; `R_u = argmax P_u`.
    case max

    /// The code of the router kind in an export's header (docs/FORMATS.md, export version 2).
    public var exportCode: UInt8 {
        switch self {
        case .vote: return 0
        case .mean: return 1
        case .max: return 2
        }
    }

    public init?(exportCode: UInt8) {
        guard let pooling = ChunkPooling.allCases.first(where: { $0.exportCode == exportCode }) else { return nil }
        self = pooling
    }
}

/// Which layers and chunks are routed: R = ceil(L / G) routers, router r reads its leader layer r·G
/// and decides for layers r·G ..< min(L, (r+1)·G); chunks `firstRoutedChunk(of: r) ..< C` of every head
/// are routed: from chunk 1 when route freezing is on (chunk 0 stays at 16 bits), and never before the
/// first chunk the group's caches hold (`firstHeldChunks`: a sliding layer's older chunks are not in its
/// cache; docs/FORMATS.md, Sliding-window layers); tail tokens after the last chunk never are. Each routed
/// chunk decides by `pooling`.
public struct RoutingLayout: Equatable, Sendable {
    public let layers: Int
    public let heads: Int
    public let tokens: Int
    public let inputDim: Int
    public let chunkSize: Int
    public let groupSize: Int
    /// Chunks left at 16 bits at the front of every layer: 1 when chunk 0 is frozen.
    public let frozenChunks: Int
    /// Per layer, the first chunk its cache holds at the sequence's end (0 but in a sliding layer); a
    /// router's chunks are its leader's (`RoutedStore` refuses groups whose layers differ).
    public let firstHeldChunks: [Int]
    public let pooling: ChunkPooling

    public init(layers: Int, heads: Int, tokens: Int, inputDim: Int, chunkSize: Int, groupSize: Int, freezeFirstChunk: Bool,
                pooling: ChunkPooling = .vote, firstHeldChunks: [Int]? = nil) {
        self.layers = layers
        self.heads = heads
        self.tokens = tokens
        self.inputDim = inputDim
        self.chunkSize = chunkSize
        self.groupSize = groupSize
        self.frozenChunks = freezeFirstChunk ? 1 : 0
        self.firstHeldChunks = firstHeldChunks ?? Array(repeating: 0, count: layers)
        self.pooling = pooling
        precondition(self.firstHeldChunks.count == layers, "\(self.firstHeldChunks.count) first held chunks for \(layers) layers")
    }

    /// C = floor(T / N).
    public var chunks: Int { tokens / chunkSize }
    /// R = ceil(L / G).
    public var routers: Int { (layers + groupSize - 1) / groupSize }
    public func leaderLayer(of router: Int) -> Int { router * groupSize }
    public func layers(of router: Int) -> Range<Int> { (router * groupSize)..<min(layers, (router + 1) * groupSize) }
    public func firstRoutedChunk(ofLayer layer: Int) -> Int { max(frozenChunks, firstHeldChunks[layer]) }
    public func firstRoutedChunk(of router: Int) -> Int { firstRoutedChunk(ofLayer: leaderLayer(of: router)) }
    public func routedChunksPerHead(of router: Int) -> Int { max(0, chunks - firstRoutedChunk(of: router)) }
    /// Units of one router in one sequence, ordered head-major then chunk.
    public func units(of router: Int) -> Int { heads * routedChunksPerHead(of: router) }
    /// U: routed units of one sequence.
    public var unitsPerSequence: Int { (0..<routers).reduce(0) { $0 + units(of: $1) } }
    /// Routed (layer, head, chunk) units of one sequence: each router's units in every layer of its group.
    public var layerUnitsPerSequence: Int { (0..<routers).reduce(0) { $0 + layers(of: $1).count * units(of: $1) } }
    /// Tokens of each head of the router's layers that are routed.
    public func routedTokens(of router: Int) -> Range<Int> { (firstRoutedChunk(of: router) * chunkSize)..<(chunks * chunkSize) }
    /// Rows of one router's input matrix for one sequence: every routed token of every head.
    public func rows(of router: Int) -> Int { units(of: router) * chunkSize }
    /// Tokens of one head that the caches of all layers hold together at the sequence's end.
    public var heldTokens: Int { firstHeldChunks.reduce(0) { $0 + tokens - $1 * chunkSize } }

    /// (head, chunk) of unit `u` of a router.
    public func headAndChunk(ofUnit u: Int, router: Int) -> (head: Int, chunk: Int) {
        let perHead = routedChunksPerHead(of: router)
        return (u / perHead, firstRoutedChunk(of: router) + u % perHead)
    }
}

/// Weights of all routers in one flat buffer, with an ordered table of tensor names and shapes:
/// per router `W1 (D×H)`, `W2 (D×H)`, `W3 (H×M)`, row-major, with the hidden width H = M in the paper. The optimizer is one loop over it and
/// a checkpoint or export writes it in table order.
public struct RouterParameters: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public let name: String
        public let rows: Int
        public let cols: Int
        public let offset: Int
        public var count: Int { rows * cols }
        public var range: Range<Int> { offset..<(offset + count) }
    }

    public let routers: Int
    public let inputDim: Int
    public let experts: Int
    /// H: columns of W1 and W2, rows of W3.
    public let hidden: Int
    public let table: [Entry]
    /// All weights, in table order.
    public var values: [Float]

    /// - Parameter hidden: H (nil: M, the paper's).
    public init(routers: Int, inputDim: Int, experts: Int, hidden: Int? = nil, values: [Float]) {
        let hidden = hidden ?? experts
        var table: [Entry] = []
        var offset = 0
        for r in 0..<routers {
            for matrix in Matrix.allCases {
                let (rows, cols) = matrix == .w3 ? (hidden, experts) : (inputDim, hidden)
                table.append(Entry(name: "router.\(r).\(matrix)", rows: rows, cols: cols, offset: offset))
                offset += rows * cols
            }
        }
        precondition(values.count == offset, "\(values.count) weights for \(offset) parameters")
        self.routers = routers
        self.inputDim = inputDim
        self.experts = experts
        self.hidden = hidden
        self.table = table
        self.values = values
    }

    public static func parameterCount(routers: Int, inputDim: Int, experts: Int, hidden: Int? = nil) -> Int {
        let hidden = hidden ?? experts
        return routers * (2 * inputDim * hidden + hidden * experts)
    }

    /// torch.nn.Linear's initialisation: W1, W2 ~ U(-1/√D, 1/√D), W3 ~ U(-1/√H, 1/√H).
    public static func initialized(routers: Int, inputDim: Int, experts: Int, hidden: Int? = nil,
                                   random: inout RandomGenerator) -> RouterParameters {
        let hidden = hidden ?? experts
        var values: [Float] = []
        let boundD = 1 / Float(inputDim).squareRoot(), boundH = 1 / Float(hidden).squareRoot()
        for _ in 0..<routers {
            for _ in 0..<(2 * inputDim * hidden) { values.append(random.uniform(-boundD, boundD)) }
            for _ in 0..<(hidden * experts) { values.append(random.uniform(-boundH, boundH)) }
        }
        return RouterParameters(routers: routers, inputDim: inputDim, experts: experts, hidden: hidden, values: values)
    }

    /// The three weight matrices of a router, in table order.
    public enum Matrix: Int, CaseIterable, Sendable {
        case w1, w2, w3
    }

    public func entry(router: Int, _ matrix: Matrix) -> Entry { table[router * 3 + matrix.rawValue] }
}

/// Decision of each chunk under a pooled rule: the expert of highest `P_u`; a tie goes to the expert
/// with more bits `kb+vb`, then to the lower index.
///
/// - Parameter unitProbabilities: `(units, M)`.
public func pooledDecisions(unitProbabilities: [Float], experts: [Expert]) -> [Int] {
    let M = experts.count
    return (0..<(unitProbabilities.count / M)).map { u in
        unitProbabilities.withUnsafeBufferPointer { pooledChoice(UnsafeBufferPointer(rebasing: $0[(u * M)..<((u + 1) * M)]), experts: experts) }
    }
}

/// The expert of highest probability in `unitP (M)`; ties go to more bits, then to the lower index.
@inline(__always)
func pooledChoice(_ unitP: UnsafeBufferPointer<Float>, experts: [Expert]) -> Int {
    bestExpert(experts: experts) { unitP[$0] }
}

/// The expert of highest `score`; a tie goes to more bits `kb+vb`, then to the lower index. The one
/// tie rule of every chunk decision.
@inline(__always)
func bestExpert<Score: Comparable>(experts: [Expert], score: (Int) -> Score) -> Int {
    var choice = 0
    for j in 1..<experts.count {
        let (candidate, best) = (score(j), score(choice))
        if candidate > best || (candidate == best && experts[j].totalBits > experts[choice].totalBits) { choice = j }
    }
    return choice
}

/// Decision of each chunk (Eq. 2 of the paper): the expert that is the argmax of the most tokens;
/// a tie in counts goes to the expert with more bits `kb+vb`, then to the lower index. A token's
/// argmax takes the lowest index among equal probabilities.
///
/// - Parameter probabilities: `(units · N, M)` token probabilities, unit-major.
/// - Returns: one expert index per unit.
public func chunkDecisions(probabilities: [Float], chunkSize: Int, experts: [Expert]) -> [Int] {
    let M = experts.count
    let units = probabilities.count / (chunkSize * M)
    return (0..<units).map { u in
        chunkChoice(experts: experts) { counts in
            for t in 0..<chunkSize {
                let row = (u * chunkSize + t) * M
                var best = 0
                for j in 1..<M where probabilities[row + j] > probabilities[row + best] { best = j }
                counts[best] += 1
            }
        }
    }
}

/// The expert with the most votes; a tie goes to more bits `kb+vb`, then to the lower index.
/// `vote` adds each token's argmax into the zeroed per-expert counts.
@inline(__always)
func chunkChoice(experts: [Expert], vote: (UnsafeMutableBufferPointer<Int>) -> Void) -> Int {
    withUnsafeTemporaryAllocation(of: Int.self, capacity: experts.count) { counts in
        counts.initialize(repeating: 0)
        vote(counts)
        return bestExpert(experts: experts) { counts[$0] }
    }
}
