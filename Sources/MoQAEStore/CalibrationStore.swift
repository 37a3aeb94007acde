#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
/// Why a calibration store could not be opened or read; every case names the file.
public enum StoreError: Error, CustomStringConvertible {
    case file(FileError)
    case manifest(path: String, ManifestError)
    case shard(path: String, SafeTensorsError)
    case tensor(path: String, tensor: String, reason: String)

    public var description: String {
        switch self {
        case let .file(error): return "\(error)"
        case let .manifest(path, error): return "\(path): \(error)"
        case let .shard(path, error): return "\(path): \(error)"
        case let .tensor(path, tensor, reason): return "\(path): tensor \"\(tensor)\": \(reason)"
        }
    }
}

/// A `moqae-calibration` store opened for streaming: the manifest and every shard header are checked
/// against each other at open, shards are memory-mapped, and input tensors are read layer by layer.
public final class CalibrationStore: @unchecked Sendable {
    /// One stored sequence and where its three tensors live.
    public struct Sequence: Sendable {
        public let id: UInt64
        public let tokens: Int
        let shard: Int
        /// `[L, H, T, W]` with W the router input width, F16, BF16 or F32.
        public let inputs: TensorInfo
        /// `[]`, F32.
        let nll: TensorInfo
        /// `[L, H, C, M]`, F32.
        let deltaNLL: TensorInfo
    }

    public let path: String
    public let manifest: Manifest
    public let sequences: [Sequence]
    /// Identifies the store's content: the manifest bytes and every shard's header and length.
    public let fingerprint: UInt64

    private let shards: [MappedFile]
    private let shardHeaders: [SafeTensorsHeader]

    public var model: ModelShape { manifest.model }
    public var chunksPerSequence: Int { manifest.chunksPerSequence }
    /// W: width of one router input vector (the head dimension, or twice it for key+value).
    public var inputWidth: Int { manifest.inputWidth }

    public init(path: String) throws(StoreError) {
        self.path = path
        let manifestPath = path + "/manifest.json"
        guard fileExists(path) else { throw .file(FileError(path: path, refusal: "no such store directory")) }
        guard isDirectory(path) else { throw .file(FileError(path: path, refusal: "is a file, expected a store directory")) }
        let manifestBytes: [UInt8]
        do { manifestBytes = try readFileBytes(manifestPath, limit: FileSizeLimit.manifest) } catch { throw .file(error) }
        let manifest: Manifest
        do { manifest = try Manifest.parse(manifestBytes) } catch { throw .manifest(path: manifestPath, error) }
        self.manifest = manifest

        var fingerprint = FNV1a64()
        fingerprint.update(manifestBytes)
        var shardIndex: [String: Int] = [:]
        var shards: [MappedFile] = []
        var headers: [SafeTensorsHeader] = []
        var sequenceShards: [Int] = []  // the index in `shards` of each manifest sequence
        for name in manifest.sequences.map(\.shard) {
            if let known = shardIndex[name] {
                sequenceShards.append(known)
                continue
            }
            let shardPath = path + "/" + name
            let file: MappedFile
            do { file = try MappedFile(path: shardPath) } catch { throw .file(error) }
            let header: SafeTensorsHeader
            do { header = try SafeTensorsHeader(file: file.bytes) } catch { throw .shard(path: shardPath, error) }
            fingerprint.update(header.headerBytes)
            fingerprint.update(UInt64(file.bytes.count))
            shardIndex[name] = shards.count
            sequenceShards.append(shards.count)
            shards.append(file)
            headers.append(header)
        }
        self.shards = shards
        self.shardHeaders = headers
        self.fingerprint = fingerprint.value

        let (L, H, W) = (manifest.model.numLayers, manifest.model.numKVHeads, manifest.inputWidth)
        let (C, M) = (manifest.chunksPerSequence, manifest.experts.count)
        var claimed = Array(repeating: Set<String>(), count: shards.count)
        var sequences: [Sequence] = []
        for (entry, shard) in zip(manifest.sequences, sequenceShards) {
            let shardPath = path + "/" + entry.shard
            func tensor(_ suffix: String, dtypes: [DType], shape: [Int]) throws(StoreError) -> TensorInfo {
                let name = "seq.\(entry.id).\(suffix)"
                guard let info = headers[shard].tensor(named: name) else {
                    throw .tensor(path: shardPath, tensor: name, reason: "listed in the manifest but missing from the shard")
                }
                guard dtypes.contains(info.dtype) else {
                    throw .tensor(path: shardPath, tensor: name, reason: "dtype \(info.dtype.rawValue), expected \(dtypes.map(\.rawValue).joined(separator: " or "))")
                }
                guard info.shape == shape else {
                    throw .tensor(path: shardPath, tensor: name, reason: "shape \(info.shape), expected \(shape)")
                }
                claimed[shard].insert(name)
                return info
            }
            sequences.append(Sequence(
                id: entry.id, tokens: entry.tokens, shard: shard,
                inputs: try tensor("inputs", dtypes: [.f16, .bf16, .f32], shape: [L, H, entry.tokens, W]),
                nll: try tensor("nll", dtypes: [.f32], shape: []),
                deltaNLL: try tensor("delta_nll", dtypes: [.f32], shape: [L, H, C, M])))
        }
        for (index, header) in headers.enumerated() {
            if let stray = header.tensors.first(where: { !claimed[index].contains($0.name) }) {
                throw .tensor(path: shards[index].path, tensor: stray.name, reason: "not listed in the manifest")
            }
        }
        self.sequences = sequences
        for sequence in sequences { try checkLossTensors(sequence) }
    }

    /// The shard file that holds a sequence.
    public func shardPath(of sequence: Sequence) -> String { shards[sequence.shard].path }

    /// Mean NLL (nats) of the unquantized model over the sequence, or of the background plan's (version 2).
    public func nll(of sequence: Sequence) -> Float { readFloats(sequence.shard, sequence.nll)[0] }

    /// `delta_nll[L, H, C, M]` of a sequence, row-major.
    public func deltaNLL(of sequence: Sequence) -> [Float] { readFloats(sequence.shard, sequence.deltaNLL) }

    /// Bytes of one layer's `[H, T, W]` inputs block.
    public func inputLayerBytes(_ sequence: Sequence) -> Int { sequence.inputs.dataRange.count / model.numLayers }

    /// Byte range of one layer's `[H, T, W]` inputs block inside the shard file.
    private func layerRange(_ sequence: Sequence, layer: Int) -> Range<Int> {
        let start = shardHeaders[sequence.shard].dataOffset + sequence.inputs.dataRange.lowerBound + layer * inputLayerBytes(sequence)
        return start..<(start + inputLayerBytes(sequence))
    }

    /// Offset in the shard file of the inputs of `tokens` of one head of one layer.
    private func inputOffset(_ sequence: Sequence, layer: Int, head: Int, tokens: Range<Int>) -> Int {
        layerRange(sequence, layer: layer).lowerBound + (head * sequence.tokens + tokens.lowerBound) * inputWidth * sequence.inputs.dtype.byteSize
    }

    /// The mapped bytes of the inputs of `tokens` of one head of one layer, `(tokens.count, W)` in the store's dtype.
    public func inputBytes(_ sequence: Sequence, layer: Int, head: Int, tokens: Range<Int>) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: shards[sequence.shard].start + inputOffset(sequence, layer: layer, head: head, tokens: tokens),
                               count: tokens.count * inputWidth * sequence.inputs.dtype.byteSize)
    }

    /// Converts the inputs of `tokens` of one head of one layer to Float32 rows: `out` is `(tokens.count, W)`.
    public func readInputs(_ sequence: Sequence, layer: Int, head: Int, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let source = shards[sequence.shard].start + inputOffset(sequence, layer: layer, head: head, tokens: tokens)
        let count = tokens.count * inputWidth
        switch sequence.inputs.dtype {
        case .f32:
            UnsafeMutableRawPointer(out).copyMemory(from: source, byteCount: count * 4)
        case .f16:
            HalfPrecision.decodeF16(source, count: count, into: out)
        case .bf16:
            HalfPrecision.decodeBF16(source, count: count, into: out)
        default:
            preconditionFailure("input dtype was checked at open")
        }
    }

    /// Maps the inputs of `tokens` of one head of one layer into the process ahead of use (see
    /// `MappedFile.populate`) and returns their bytes, as `inputBytes`.
    public func populateInputs(_ sequence: Sequence, layer: Int, head: Int, tokens: Range<Int>) -> UnsafeRawBufferPointer {
        let (bytes, start) = (inputBytes(sequence, layer: layer, head: head, tokens: tokens), inputOffset(sequence, layer: layer, head: head, tokens: tokens))
        shards[sequence.shard].populate(start..<(start + bytes.count))
        return bytes
    }

    /// Throws if the shard holding a sequence no longer has the size it had when it was mapped: a shard
    /// truncated while in use would fault (SIGBUS) on its first page past the new end. Called before each
    /// block is read, it turns that into an error (a truncation between the check and the read remains
    /// a race, of one block's time).
    public func checkShardIntact(_ sequence: Sequence) throws(StoreError) {
        let shard = shards[sequence.shard]
        var info = stat()
        guard stat(shard.path, &info) == 0, Int(info.st_size) == shard.bytes.count else {
            throw .file(FileError(path: shard.path, refusal: "changed size while in use (mapped \(shard.bytes.count) bytes, now \(info.st_size)); the store was modified during the run"))
        }
    }

    /// Asks the kernel to read a layer's inputs ahead of use.
    public func prefetchInputs(_ sequence: Sequence, layer: Int) {
        shards[sequence.shard].willNeed(layerRange(sequence, layer: layer))
    }

    /// Drops a layer's pages from this process once it has been used.
    public func releaseInputs(_ sequence: Sequence, layer: Int) {
        shards[sequence.shard].release(layerRange(sequence, layer: layer))
    }

    /// Checks every input value of a sequence is finite (a full read; used by `inspect`).
    public func checkInputsFinite(_ sequence: Sequence) throws(StoreError) {
        let T = sequence.tokens
        let W = inputWidth
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: max(1, T * W))
        defer { buffer.deallocate() }
        let row = UnsafeBufferPointer(start: buffer, count: T * W)   // (T, W)
        for layer in 0..<model.numLayers {
            for head in 0..<model.numKVHeads {
                readInputs(sequence, layer: layer, head: head, tokens: 0..<T, into: buffer)
                if let bad = row.firstIndex(where: { !$0.isFinite }) {
                    throw .tensor(path: shardPath(of: sequence), tensor: "seq.\(sequence.id).inputs",
                                  reason: "non-finite value \(row[bad]) at [\(layer), \(head), \(bad / W), \(bad % W)]")
                }
            }
            releaseInputs(sequence, layer: layer)
        }
    }

    private func checkLossTensors(_ sequence: Sequence) throws(StoreError) {
        let nll = nll(of: sequence)
        guard nll.isFinite else {
            throw .tensor(path: shardPath(of: sequence), tensor: "seq.\(sequence.id).nll", reason: "value \(nll) is not finite")
        }
        let delta = deltaNLL(of: sequence)
        let M = manifest.experts.count, C = manifest.chunksPerSequence, H = model.numKVHeads
        let unquantized = Set(manifest.experts.indices.filter { manifest.experts[$0].isUnquantized })
        for (index, value) in delta.enumerated() {
            let layer = index / (H * C * M), chunk = index / M % C, expert = index % M
            // A unit's delta is 0 at the expert it was measured around (fp16, or its background expert), and at
            // every expert where the layer's cache does not hold the chunk (version 3).
            let isHeld = chunk >= manifest.firstHeldChunks[layer]
            let isZeroPoint = !isHeld || (manifest.background.map {
                chunk >= $0.frozenChunks ? expert == $0.experts[layer] : unquantized.contains(expert)
            } ?? unquantized.contains(expert))
            guard !value.isFinite || (isZeroPoint && value != 0) else { continue }
            let position = "[\(layer), \(index / (C * M) % H), \(chunk), \(expert)]"
            throw .tensor(path: shardPath(of: sequence), tensor: "seq.\(sequence.id).delta_nll",
                          reason: !value.isFinite ? "value \(value) at \(position) is not finite"
                              : !isHeld ? "the value at \(position) is \(value), expected 0: layer \(layer)'s cache holds chunks "
                                  + "from \(manifest.firstHeldChunks[layer]) only"
                              : manifest.background == nil ? "the 16/16 expert's value at \(position) is \(value), expected 0"
                              : "the background expert's value at \(position) is \(value), expected 0")
        }
    }

    /// Copies a small F32 tensor out of the mapping and drops its pages from the process.
    private func readFloats(_ shard: Int, _ info: TensorInfo) -> [Float] {
        let offset = shardHeaders[shard].dataOffset + info.dataRange.lowerBound
        let values = (0..<info.elementCount).map { shards[shard].bytes.loadUnaligned(fromByteOffset: offset + 4 * $0, as: Float.self) }
        shards[shard].release(offset..<(offset + info.dataRange.count))
        return values
    }
}

