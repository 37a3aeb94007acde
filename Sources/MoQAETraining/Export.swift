import MoQAEExperts
import MoQAERouter
import MoQAEStore

/// Why a router export was rejected; every case names the file.
public struct ExportError: Error, CustomStringConvertible, Equatable {
    /// What is wrong with the file: in the order `RouterExport.parse` checks, then what evaluating it on a
    /// store finds (`TrainingConfig.routing(of:path:on:)`).
    public enum Reason: Equatable, Sendable {
        /// Shorter than a header and a CRC.
        case tooSmall(bytes: Int)
        /// The first four bytes are not `MQAE`.
        case notAnExport
        case unsupportedVersion(Int)
        /// Header byte 6 is neither 1 (binary16) nor 2 (binary32).
        case unknownWeightType(UInt8)
        /// A version 2 header's hidden width H is 0.
        case zeroHiddenWidth
        /// The file's length differs from the one its header implies.
        case sizeMismatch(actual: Int, expected: Int)
        case checksumMismatch
        /// One of M, D, N, G, L, H is 0.
        case zeroDimension
        /// R is not ceil(L / G).
        case routerCountMismatch(routers: Int, layers: Int, groupSize: Int)
        case reservedBitsSet
        /// Version 2's router kind byte names no pooling.
        case unknownRouterKind(UInt8)
        /// Flags bits 1–2 name no router input.
        case unknownRouterInput(UInt8)
        /// Key+value inputs with an odd width D.
        case oddKeyAndValueWidth(Int)
        case invalidExpertBits(index: Int, keyBits: Int, valueBits: Int)
        case nonFiniteWeight
        /// Version 3's bits price is NaN or infinite.
        case nonFiniteBitsPrice
        /// Evaluating on a store: an expert of the export has no expert of the same bits in the store.
        case expertNotInStore(keyBits: Int, valueBits: Int, store: String)
        /// Evaluating on a store: the routers were trained for another number of layers or KV heads.
        case modelShapeMismatch(layers: Int, heads: Int, store: String, storeLayers: Int, storeHeads: Int)
        /// Evaluating on a store: the routers read another router input than the store holds.
        case routerInputMismatch(export: RouterInput, store: String, stored: RouterInput)
        /// Evaluating on a store: the routers decide for chunks of another size than the store's.
        case chunkSizeMismatch(export: Int, store: String, stored: Int)
        /// Evaluating on a store: the routers' count, input width or expert count differ from the routing the store and config give.
        case routersDoNotFit(routers: Int, inputDim: Int, experts: Int, store: String)

        /// The reason as the command line prints it, after the path.
        public var message: String {
            switch self {
            case let .tooSmall(bytes): "file is \(bytes) bytes, too small for a router export"
            case .notAnExport: "not a router export (magic is not MQAE)"
            case let .unsupportedVersion(version): "export version \(version) is not supported (expected 1, 2 or 3)"
            case let .unknownWeightType(code): "weight dtype \(code) is unknown (expected 1 = binary16 or 2 = binary32)"
            case .zeroHiddenWidth: "header holds a zero hidden width"
            case let .sizeMismatch(actual, expected): "file is \(actual) bytes, its header implies \(expected)"
            case .checksumMismatch: "CRC-32 mismatch: the file is damaged"
            case .zeroDimension: "header holds a zero dimension"
            case let .routerCountMismatch(routers, layers, groupSize):
                "header says \(routers) routers, but \(layers) layers in groups of \(groupSize) need \((layers + groupSize - 1) / groupSize)"
            case .reservedBitsSet: "reserved header bits are not zero"
            case let .unknownRouterKind(code): "router kind \(code) is unknown (expected 0 = vote, 1 = mean, 2 = max)"
            case let .unknownRouterInput(code):
                "router input code \(code) in the flags is unknown (expected 0 = key, 1 = key-prerope, 2 = key+value, 3 = key+chunk)"
            case let .oddKeyAndValueWidth(width): "D = \(width) is odd, but key+value inputs are two head vectors"
            case let .invalidExpertBits(index, keyBits, valueBits): "expert \(index) has invalid bits (\(keyBits), \(valueBits))"
            case .nonFiniteWeight: "holds a non-finite weight"
            case .nonFiniteBitsPrice: "holds a non-finite bits price"
            case let .expertNotInStore(keyBits, valueBits, store): "expert (\(keyBits), \(valueBits)) is not in the store \(store)"
            case let .modelShapeMismatch(layers, heads, store, storeLayers, storeHeads):
                "routers for \(layers) layers × \(heads) heads, the store \(store) has \(storeLayers) × \(storeHeads)"
            case let .routerInputMismatch(export, store, stored):
                "the routers read router_input \(export.rawValue), the store \(store) holds \(stored.rawValue)"
            case let .chunkSizeMismatch(export, store, stored):
                "the routers decide for chunks of \(export) tokens, the store \(store) was dumped with chunk_size \(stored)"
            case let .routersDoNotFit(routers, inputDim, experts, store):
                "routers (\(routers) × D \(inputDim) × M \(experts)) do not fit the store \(store) under this config"
            }
        }
    }

    public let path: String
    public let reason: Reason

    public init(path: String, reason: Reason) {
        self.path = path
        self.reason = reason
    }

    public var description: String { "\(path): \(reason.message)" }
}

/// The router export, format `MQAE`: a 32-byte header, the expert table, every router's W1, W2, W3 as
/// binary16 or binary32, and a CRC-32 of all preceding bytes. Little-endian, no padding. Version 1 is
/// the paper's router (vote pooling, hidden width M); version 2 adds the router kind (the pooling) in
/// header byte 21 and the hidden width H as a u16 at bytes 22–23; version 3 adds a binary32 bits price
/// at bytes 24–27 (`moqae calibrate-bits`). Each is written only where the one before cannot say it,
/// so that paper routers keep their version 1 bytes.
public struct RouterExport: Equatable {
    public enum WeightType: UInt8, Sendable {
        case binary16 = 1
        case binary32 = 2
        var byteSize: Int { self == .binary16 ? 2 : 4 }
    }

    public static let magic: [UInt8] = Array("MQAE".utf8)
    /// The versions this reader knows.
    public static let versions: ClosedRange<Int> = 1...3
    public static let headerSize = 32

    public var weightType: WeightType
    /// `(key_bits, value_bits)` of each expert.
    public var expertBits: [(keyBits: Int, valueBits: Int)]
    public var layers: Int
    public var heads: Int
    public var chunkSize: Int
    public var groupSize: Int
    public var freezeFirstChunk: Bool
    /// What the routers read (flags bits 1–2); D is its width.
    public var routerInput: RouterInput
    /// How a chunk decides (the router kind: version 2's header byte 21; version 1 is vote).
    public var pooling: ChunkPooling
    /// Nats per average bit taken from every token logit before the chunk decides (version 3; 0 before).
    public var bitsPrice: Float
    /// The version this export is written as.
    public var version: Int { bitsPrice != 0 ? 3 : pooling == .vote && parameters.hidden == parameters.experts ? 1 : 2 }
    /// The weights as stored (binary16 weights widened exactly to Float).
    public var parameters: RouterParameters

    public static func == (lhs: RouterExport, rhs: RouterExport) -> Bool {
        lhs.weightType == rhs.weightType && lhs.expertBits.elementsEqual(rhs.expertBits, by: { $0 == $1 })
            && lhs.layers == rhs.layers && lhs.heads == rhs.heads && lhs.chunkSize == rhs.chunkSize
            && lhs.groupSize == rhs.groupSize && lhs.freezeFirstChunk == rhs.freezeFirstChunk && lhs.routerInput == rhs.routerInput
            && lhs.pooling == rhs.pooling && lhs.bitsPrice == rhs.bitsPrice && lhs.parameters == rhs.parameters
    }

    public init(weightType: WeightType, expertBits: [(keyBits: Int, valueBits: Int)], layers: Int, heads: Int,
                chunkSize: Int, groupSize: Int, freezeFirstChunk: Bool, routerInput: RouterInput, pooling: ChunkPooling = .vote,
                bitsPrice: Float = 0, parameters: RouterParameters) {
        self.weightType = weightType
        self.expertBits = expertBits
        self.layers = layers
        self.heads = heads
        self.chunkSize = chunkSize
        self.groupSize = groupSize
        self.freezeFirstChunk = freezeFirstChunk
        self.routerInput = routerInput
        self.pooling = pooling
        self.bitsPrice = bitsPrice
        self.parameters = parameters
    }

    /// An export of a checkpoint's weights; binary16 rounds each weight to nearest even.
    public init(parameters: RouterParameters, setup: RouterSetup, weightType: WeightType) {
        var rounded = parameters
        if weightType == .binary16 { rounded.values = parameters.values.map { Float(Float16($0)) } }
        let layout = setup.layout
        self.init(weightType: weightType, expertBits: setup.experts.map { ($0.keyBits, $0.valueBits) }, layers: layout.layers,
                  heads: layout.heads, chunkSize: layout.chunkSize, groupSize: layout.groupSize,
                  freezeFirstChunk: layout.frozenChunks == 1, routerInput: setup.routerInput, pooling: layout.pooling,
                  parameters: rounded)
    }

    /// File size for the given dimensions (hidden width H: nil for M).
    public static func fileSize(experts M: Int, inputDim D: Int, routers R: Int, hidden H: Int? = nil, weightType: WeightType) -> Int {
        headerSize + 2 * M + RouterParameters.parameterCount(routers: R, inputDim: D, experts: M, hidden: H) * weightType.byteSize + 4
    }

    public func serialized() -> [UInt8] {
        var bytes = RouterExport.magic
        func u16(_ value: Int) { withUnsafeBytes(of: UInt16(value).littleEndian) { bytes.append(contentsOf: $0) } }
        u16(version)
        bytes.append(weightType.rawValue)
        bytes.append(UInt8(expertBits.count))
        u16(parameters.inputDim)
        u16(parameters.routers)
        u16(chunkSize)
        u16(groupSize)
        u16(layers)
        u16(heads)
        bytes.append((freezeFirstChunk ? 1 : 0) | routerInput.exportCode << 1)
        if version == 1 {
            bytes.append(contentsOf: [UInt8](repeating: 0, count: 11))
        } else {
            bytes.append(pooling.exportCode)
            u16(parameters.hidden)
            if version == 3 { withUnsafeBytes(of: bitsPrice.bitPattern.littleEndian) { bytes.append(contentsOf: $0) } }
            bytes.append(contentsOf: [UInt8](repeating: 0, count: version == 3 ? 4 : 8))
        }
        for expert in expertBits { bytes.append(contentsOf: [UInt8(expert.keyBits), UInt8(expert.valueBits)]) }
        for value in parameters.values {
            switch weightType {
            case .binary16: withUnsafeBytes(of: Float16(value).bitPattern.littleEndian) { bytes.append(contentsOf: $0) }
            case .binary32: withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes.append(contentsOf: $0) }
            }
        }
        withUnsafeBytes(of: CRC32.checksum(bytes).littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// Reads and checks an export: magic, version, dtype, header fields, the exact file size the
    /// header implies, and the CRC, before any weight is used.
    public static func parse(_ bytes: [UInt8], path: String) throws(ExportError) -> RouterExport {
        func fail(_ reason: ExportError.Reason) -> ExportError { ExportError(path: path, reason: reason) }
        guard bytes.count >= headerSize + 4 else { throw fail(.tooSmall(bytes: bytes.count)) }
        guard Array(bytes[0..<4]) == magic else { throw fail(.notAnExport) }
        func u16(_ offset: Int) -> Int { Int(bytes[offset]) | Int(bytes[offset + 1]) << 8 }
        let version = u16(4)
        guard versions.contains(version) else { throw fail(.unsupportedVersion(version)) }
        guard let weightType = WeightType(rawValue: bytes[6]) else { throw fail(.unknownWeightType(bytes[6])) }
        let (M, D, R, N, G, L, H) = (Int(bytes[7]), u16(8), u16(10), u16(12), u16(14), u16(16), u16(18))
        let hidden = version == 1 ? M : u16(22)
        guard hidden >= 1 else { throw fail(.zeroHiddenWidth) }
        let expected = fileSize(experts: M, inputDim: D, routers: R, hidden: hidden, weightType: weightType)
        guard bytes.count == expected else { throw fail(.sizeMismatch(actual: bytes.count, expected: expected)) }
        #if !FUZZING  // fuzzing builds skip the CRC so that damaged inputs reach the checks behind it
        let stored = UInt32(bytes[expected - 4]) | UInt32(bytes[expected - 3]) << 8 | UInt32(bytes[expected - 2]) << 16 | UInt32(bytes[expected - 1]) << 24
        guard CRC32.checksum(Array(bytes[0..<(expected - 4)])) == stored else { throw fail(.checksumMismatch) }
        #endif
        guard M >= 1, D >= 1, N >= 1, G >= 1, L >= 1, H >= 1 else { throw fail(.zeroDimension) }
        guard R == (L + G - 1) / G else { throw fail(.routerCountMismatch(routers: R, layers: L, groupSize: G)) }
        guard bytes[20] & ~7 == 0, bytes[[21, 24, 28][version - 1]..<32].allSatisfy({ $0 == 0 }) else { throw fail(.reservedBitsSet) }
        guard let pooling = version == 1 ? .vote : ChunkPooling(exportCode: bytes[21]) else { throw fail(.unknownRouterKind(bytes[21])) }
        guard let routerInput = RouterInput(exportCode: bytes[20] >> 1) else { throw fail(.unknownRouterInput(bytes[20] >> 1)) }
        guard routerInput != .keyAndValue || D % 2 == 0 else { throw fail(.oddKeyAndValueWidth(D)) }
        var expertBits: [(keyBits: Int, valueBits: Int)] = []
        for index in 0..<M {
            let (kb, vb) = (Int(bytes[32 + 2 * index]), Int(bytes[33 + 2 * index]))
            guard Expert.isValidBits(kb), Expert.isValidBits(vb) else { throw fail(.invalidExpertBits(index: index, keyBits: kb, valueBits: vb)) }
            expertBits.append((kb, vb))
        }
        let start = headerSize + 2 * M
        let count = RouterParameters.parameterCount(routers: R, inputDim: D, experts: M, hidden: hidden)
        let values: [Float] = (0..<count).map { index in
            switch weightType {
            case .binary16: return Float(Float16(bitPattern: UInt16(bytes[start + 2 * index]) | UInt16(bytes[start + 2 * index + 1]) << 8))
            case .binary32:
                let o = start + 4 * index
                return Float(bitPattern: UInt32(bytes[o]) | UInt32(bytes[o + 1]) << 8 | UInt32(bytes[o + 2]) << 16 | UInt32(bytes[o + 3]) << 24)
            }
        }
        guard values.allSatisfy(\.isFinite) else { throw fail(.nonFiniteWeight) }
        let bitsPrice = version == 3 ? Float(bitPattern: UInt32(bytes[24]) | UInt32(bytes[25]) << 8 | UInt32(bytes[26]) << 16 | UInt32(bytes[27]) << 24) : 0
        guard bitsPrice.isFinite else { throw fail(.nonFiniteBitsPrice) }
        return RouterExport(weightType: weightType, expertBits: expertBits, layers: L, heads: H, chunkSize: N, groupSize: G,
                            freezeFirstChunk: bytes[20] & 1 == 1, routerInput: routerInput, pooling: pooling, bitsPrice: bitsPrice,
                            parameters: RouterParameters(routers: R, inputDim: D, experts: M, hidden: hidden, values: values))
    }
}
