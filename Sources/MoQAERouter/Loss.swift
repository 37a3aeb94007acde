import MoQAEExperts

/// `delta_nll` of one sequence, `[L, H, C, storeExperts]` as stored, read through the columns of the
/// experts the router chooses among.
public struct SensitivityTable: Sendable {
    /// `(L, H, C, storeExperts)` row-major.
    public let values: [Float]
    public let heads: Int
    public let chunks: Int
    public let storeExperts: Int
    /// Store column of each router expert.
    public let columns: [Int]

    public init(values: [Float], heads: Int, chunks: Int, storeExperts: Int, columns: [Int]) {
        self.values = values
        self.heads = heads
        self.chunks = chunks
        self.storeExperts = storeExperts
        self.columns = columns
    }

    @inline(__always)
    public func delta(layer: Int, head: Int, chunk: Int, expert: Int) -> Float {
        values[((layer * heads + head) * chunks + chunk) * storeExperts + columns[expert]]
    }

    /// `D_u[j] = Σ_{l in layers} delta_nll[l, head, chunk, j]`: what choosing expert j for the unit
    /// costs over the layers its decision holds for.
    public func unitDelta(layers: Range<Int>, head: Int, chunk: Int, expert: Int) -> Float {
        layers.reduce(0) { $0 + delta(layer: $1, head: head, chunk: chunk, expert: expert) }
    }

    /// `(units, M)` row-major: `D_u[j]` of every unit of `router`, in the layout's unit order.
    public func unitDeltas(router: Int, layout: RoutingLayout) -> [Float] {
        (0..<layout.units(of: router)).flatMap { unit in
            let (head, chunk) = layout.headAndChunk(ofUnit: unit, router: router)
            return columns.indices.map { unitDelta(layers: layout.layers(of: router), head: head, chunk: chunk, expert: $0) }
        }
    }
}

/// Which loss trains the routers.
public enum LossKind: String, CaseIterable, Sendable {
    /// docs/FORMATS.md, Losses, the paper's: every unit is pushed by the sequence's `L_nll` and its chosen expert's bits.
    case paper
    /// The expected per-unit cost: each unit is pushed by its own `delta_nll`, for every expert.
    case expected
}

/// A loss and its trade-off λ between accuracy (1) and memory (0).
public struct LossSettings: Equatable, Sendable {
    public var kind: LossKind
    public var lambda: Double

    public init(kind: LossKind = .paper, lambda: Double) {
        self.kind = kind
        self.lambda = lambda
    }

    /// `λ · model + (1 − λ) · memory`.
    public func combined(model: Double, memory: Double) -> Double { lambda * model + (1 - lambda) * memory }
}

/// The weight each loss term gives a unit's probability (docs/FORMATS.md, Losses), with U the routed
/// units of a sequence. The streaming pass and the reference tape both take them from here.
public enum UnitLossWeight {
    /// Of `P_u[R_u]` in the paper's `L_model`: `L_nll / (U · B_R)`.
    public static func paperModel(estimatedNLL: Double, expert: Expert, units: Double) -> Double {
        estimatedNLL / (units * expert.bitWidth)
    }

    /// Of `P_u[j]` in `L_mem`: `B_j / (16 U)` (the paper's loss weighs only `j = R_u`).
    public static func memory(expert: Expert, units: Double) -> Double { expert.bitWidth / (16 * units) }
}

/// `L_nll(s) = nll(s) + Σ_u Σ_{layers l of u's group} delta_nll[l, head, c, R_u]`.
///
/// - Parameter decisions: `[router][unit]` expert indices.
public func estimatedNLL(nll: Float, decisions: [[Int]], layout: RoutingLayout, sensitivity: SensitivityTable) -> Double {
    var total = Double(nll)
    for (router, routerDecisions) in decisions.enumerated() {
        for (unit, expert) in routerDecisions.enumerated() {
            let (head, chunk) = layout.headAndChunk(ofUnit: unit, router: router)
            for layer in layout.layers(of: router) {
                total += Double(sensitivity.delta(layer: layer, head: head, chunk: chunk, expert: expert))
            }
        }
    }
    return total
}
