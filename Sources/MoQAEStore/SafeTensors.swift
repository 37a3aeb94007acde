/// Element types a safetensors file may declare, with their size in bytes.
public enum DType: String, CaseIterable, Sendable {
    case bool = "BOOL", u8 = "U8", i8 = "I8", f8e5m2 = "F8_E5M2", f8e4m3 = "F8_E4M3"
    case i16 = "I16", u16 = "U16", f16 = "F16", bf16 = "BF16"
    case i32 = "I32", u32 = "U32", f32 = "F32", f64 = "F64", i64 = "I64", u64 = "U64"

    public var byteSize: Int {
        switch self {
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3: return 1
        case .i16, .u16, .f16, .bf16: return 2
        case .i32, .u32, .f32: return 4
        case .f64, .i64, .u64: return 8
        }
    }
}

/// One tensor's entry in a safetensors header: offsets are relative to the start of the data section.
public struct TensorInfo: Equatable, Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let dataRange: Range<Int>

    public var elementCount: Int { shape.reduce(1, *) }
}

/// Why a safetensors file was rejected. The checks follow the reference loader.
public enum SafeTensorsError: Error, CustomStringConvertible, Equatable {
    case tooSmall(fileSize: Int)
    case notSafeTensors
    case headerTooLarge(UInt64)
    case headerOutOfBounds(headerSize: UInt64, fileSize: Int)
    case headerNotJSON(JSONError)
    case headerNotObject
    case invalidMetadata(String)
    case invalidEntry(tensor: String, reason: String)
    case unknownDType(tensor: String, dtype: String)
    case sizeMismatch(tensor: String, expected: Int, actual: Int)
    case notContiguous(tensor: String, expectedStart: Int, actualStart: Int)
    case lengthMismatch(expected: Int, actual: Int)

    public var description: String {
        switch self {
        case let .tooSmall(size): return "file is \(size) bytes, too small for a safetensors header"
        case .notSafeTensors: return "not a safetensors file (it does not start with a header length and a JSON object)"
        case let .headerTooLarge(size): return "header length \(size) exceeds the \(SafeTensorsHeader.maxHeaderSize)-byte cap"
        case let .headerOutOfBounds(header, file): return "header length \(header) runs past the end of the \(file)-byte file"
        case let .headerNotJSON(error): return "header is not valid JSON: \(error)"
        case .headerNotObject: return "header is not a JSON object"
        case let .invalidMetadata(reason): return "__metadata__ \(reason)"
        case let .invalidEntry(name, reason): return "tensor \"\(name)\": \(reason)"
        case let .unknownDType(name, dtype): return "tensor \"\(name)\": unknown dtype \"\(dtype)\""
        case let .sizeMismatch(name, expected, actual):
            return "tensor \"\(name)\": shape × dtype is \(expected) bytes but its offsets span \(actual)"
        case let .notContiguous(name, expected, actual):
            return "tensor \"\(name)\": data starts at \(actual), expected \(expected) (tensors must be contiguous, without gaps or overlap)"
        case let .lengthMismatch(expected, actual): return "file is \(actual) bytes, header implies \(expected)"
        }
    }
}

/// A parsed and fully validated safetensors header.
public struct SafeTensorsHeader: Sendable {
    public static let maxHeaderSize: UInt64 = 100_000_000

    /// Tensors in header order.
    public let tensors: [TensorInfo]
    public let metadata: [String: String]
    /// Byte offset of the data section in the file (8 + header length).
    public let dataOffset: Int
    /// The raw header bytes (for fingerprints).
    public let headerBytes: [UInt8]

    public func tensor(named name: String) -> TensorInfo? { tensorsByName[name] }

    private let tensorsByName: [String: TensorInfo]

    /// Parses and checks a header against the whole file's bytes: header length cap, UTF-8 JSON object,
    /// string-to-string metadata, known dtypes, non-negative shapes with overflow-checked byte sizes
    /// that match the offsets, tensors sorted and contiguous from 0, and the exact file length.
    public init(file: UnsafeRawBufferPointer) throws(SafeTensorsError) {
        guard file.count >= 8 else { throw .tooSmall(fileSize: file.count) }
        let headerSize = file.loadUnaligned(as: UInt64.self).littleEndian
        guard file.count == 8 || file[8] == UInt8(ascii: "{") else { throw .notSafeTensors }
        guard headerSize <= SafeTensorsHeader.maxHeaderSize else { throw .headerTooLarge(headerSize) }
        guard Int(headerSize) + 8 <= file.count else {
            throw .headerOutOfBounds(headerSize: headerSize, fileSize: file.count)
        }
        let headerBuffer = UnsafeRawBufferPointer(rebasing: file[8..<(8 + Int(headerSize))])
        let json: JSON
        do { json = try JSON.parse(headerBuffer) } catch { throw .headerNotJSON(error) }
        guard case let .object(entries) = json else { throw .headerNotObject }

        var tensors: [TensorInfo] = []
        var metadata: [String: String] = [:]
        for (name, entry) in entries {
            if name == "__metadata__" {
                guard case let .object(pairs) = entry else { throw .invalidMetadata("is not an object") }
                for (key, value) in pairs {
                    guard case let .string(text) = value else { throw .invalidMetadata("value of \"\(key)\" is not a string") }
                    metadata[key] = text
                }
                continue
            }
            tensors.append(try SafeTensorsHeader.parseEntry(name: name, entry: entry))
        }

        var expectedStart = 0
        for info in tensors.sorted(by: { ($0.dataRange.lowerBound, $0.dataRange.upperBound) < ($1.dataRange.lowerBound, $1.dataRange.upperBound) }) {
            guard info.dataRange.lowerBound == expectedStart else {
                throw .notContiguous(tensor: info.name, expectedStart: expectedStart, actualStart: info.dataRange.lowerBound)
            }
            expectedStart = info.dataRange.upperBound
        }
        let expectedLength = 8 + Int(headerSize) + expectedStart
        guard expectedLength == file.count else { throw .lengthMismatch(expected: expectedLength, actual: file.count) }

        self.tensors = tensors
        self.metadata = metadata
        self.dataOffset = 8 + Int(headerSize)
        self.headerBytes = Array(headerBuffer)
        self.tensorsByName = Dictionary(uniqueKeysWithValues: tensors.map { ($0.name, $0) })
    }

    private static func parseEntry(name: String, entry: JSON) throws(SafeTensorsError) -> TensorInfo {
        guard case let .object(fields) = entry else { throw .invalidEntry(tensor: name, reason: "entry is not an object") }
        for (key, _) in fields where !["dtype", "shape", "data_offsets"].contains(key) {
            throw .invalidEntry(tensor: name, reason: "unknown field \"\(key)\"")
        }
        guard let dtypeName = entry["dtype"]?.stringValue else { throw .invalidEntry(tensor: name, reason: "missing dtype") }
        guard let dtype = DType(rawValue: dtypeName) else { throw .unknownDType(tensor: name, dtype: dtypeName) }
        guard let shapeItems = entry["shape"]?.arrayValue else { throw .invalidEntry(tensor: name, reason: "missing shape") }
        var shape: [Int] = []
        var elementCount = 1
        for item in shapeItems {
            guard let dim = item.intValue, dim >= 0 else {
                throw .invalidEntry(tensor: name, reason: "shape holds a value that is not a non-negative integer")
            }
            let (product, overflow) = elementCount.multipliedReportingOverflow(by: dim)
            guard !overflow else { throw .invalidEntry(tensor: name, reason: "shape × dtype size overflows") }
            elementCount = product
            shape.append(dim)
        }
        let (byteCount, overflow) = elementCount.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else { throw .invalidEntry(tensor: name, reason: "shape × dtype size overflows") }
        guard let offsets = entry["data_offsets"]?.arrayValue, offsets.count == 2,
              let begin = offsets[0].intValue, let end = offsets[1].intValue, begin >= 0, end >= begin
        else { throw .invalidEntry(tensor: name, reason: "data_offsets must be two integers [begin, end] with 0 <= begin <= end") }
        guard end - begin == byteCount else { throw .sizeMismatch(tensor: name, expected: byteCount, actual: end - begin) }
        return TensorInfo(name: name, dtype: dtype, shape: shape, dataRange: begin..<end)
    }
}

/// Builds a safetensors file in memory: a header padded with spaces to 8 bytes, then the data.
public struct SafeTensorsBuilder {
    private var entries: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
    public var metadata: [(String, String)] = []

    public init() {}

    public mutating func add(_ name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        precondition(shape.reduce(1, *) * dtype.byteSize == bytes.count, "tensor \(name): bytes do not match its shape")
        entries.append((name, dtype, shape, bytes))
    }

    public mutating func add(_ name: String, shape: [Int], floats: [Float]) {
        add(name, dtype: .f32, shape: shape, bytes: floats.withUnsafeBytes { Array($0) })
    }

    /// The data section: every tensor's bytes in order.
    public var dataSection: [UInt8] { entries.flatMap(\.bytes) }

    /// The complete file.
    public func serialized() -> [UInt8] {
        var file = SafeTensorsBuilder.header(tensors: entries.map { ($0.name, $0.dtype, $0.shape) }, metadata: metadata)
        file.reserveCapacity(file.count + entries.reduce(0) { $0 + $1.bytes.count })
        for entry in entries { file.append(contentsOf: entry.bytes) }
        return file
    }

    /// The bytes before the data section: the header length, then the header padded with spaces to 8
    /// bytes. Tensors follow in the given order, each as `shape × dtype size` bytes.
    public static func header(tensors: [(name: String, dtype: DType, shape: [Int])], metadata: [(String, String)] = []) -> [UInt8] {
        var header: [(String, JSON)] = []
        if !metadata.isEmpty { header.append(("__metadata__", .object(metadata.map { ($0.0, .string($0.1)) }))) }
        var offset = 0
        for tensor in tensors {
            let byteCount = tensor.shape.reduce(1, *) * tensor.dtype.byteSize
            header.append((tensor.name, .object([
                ("dtype", .string(tensor.dtype.rawValue)),
                ("shape", .array(tensor.shape.map { .int($0) })),
                ("data_offsets", .array([.int(offset), .int(offset + byteCount)])),
            ])))
            offset += byteCount
        }
        var headerBytes = Array(JSON.object(header).serialized.utf8)
        while headerBytes.count % 8 != 0 { headerBytes.append(0x20) }
        var file: [UInt8] = []
        withUnsafeBytes(of: UInt64(headerBytes.count).littleEndian) { file.append(contentsOf: $0) }
        file.append(contentsOf: headerBytes)
        return file
    }
}
