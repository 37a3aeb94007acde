import Foundation
import MoQAEStore
import MoQAETestSupport
import Testing

@Suite struct StoreTests {
    @Test(arguments: [DType.f32, .f16, .bf16])
    func readsInputsInEveryDType(_ dtype: DType) throws {
        let directory = makeTemporaryDirectory()
        let written = try makeSmallStore(at: directory, inputDType: dtype)
        let store = try CalibrationStore(path: directory)
        #expect(store.sequences.map(\.id) == written.map(\.id))
        let (L, H, T, D) = (4, 2, 96, 8)
        for (sequence, original) in zip(store.sequences, written) {
            #expect(store.nll(of: sequence) == original.nll)
            #expect(store.deltaNLL(of: sequence) == original.deltaNLL)
            var rows = [Float](repeating: 0, count: 64 * D)
            let (layer, head) = (L - 1, H - 1)
            rows.withUnsafeMutableBufferPointer { store.readInputs(sequence, layer: layer, head: head, tokens: 32..<96, into: $0.baseAddress!) }
            let start = ((layer * H + head) * T + 32) * D
            let expected = Array(original.inputs[start..<(start + 64 * D)])
            let tolerance: Float = dtype == .f32 ? 0 : (dtype == .f16 ? 1e-3 : 8e-3)
            #expect(zip(rows, expected).allSatisfy { abs($0 - $1) <= tolerance * max(1, abs($1)) })
        }
    }

    /// A key+value store's inputs are twice the head dimension wide; the manifest says which input it holds.
    @Test func keyAndValueInputsAreTwiceTheHeadDimension() throws {
        let directory = makeTemporaryDirectory()
        let written = try makeSmallStore(at: directory, routerInput: .keyAndValue)
        let store = try CalibrationStore(path: directory)
        #expect(store.manifest.routerInput == .keyAndValue && store.model.headDim == 8 && store.inputWidth == 16)
        let (H, T, W) = (2, 96, 16)
        var rows = [Float](repeating: 0, count: 32 * W)
        rows.withUnsafeMutableBufferPointer { store.readInputs(store.sequences[1], layer: 2, head: 1, tokens: 64..<96, into: $0.baseAddress!) }
        let start = ((2 * H + 1) * T + 64) * W
        #expect(rows == Array(written[1].inputs[start..<(start + 32 * W)]))

        try rewriteManifest(directory) { $0 = $0.replacingOccurrences(of: #""router_input":"key+value""#, with: #""router_input":"key""#) }
        #expect(openError(directory)?.contains("shape [4, 2, 96, 16], expected [4, 2, 96, 8]") == true)
        try rewriteManifest(directory) { $0 = $0.replacingOccurrences(of: #""router_input":"key""#, with: #""router_input":"query""#) }
        let refusal = try #require(manifestError(directory))
        #expect(refusal == ManifestError(key: "router_input", reason: .unknownRouterInput("query")))
        // The message names the key, what it may be and what it is, on one line.
        #expect(refusal.description == #"router_input: expected one of ["key", "key-prerope", "key+value", "key+chunk"], got "query""#)
    }

    /// Rewrites one shard tensor's header entry and the data it points to.
    func rewriteManifest(_ directory: String, _ transform: (inout String) -> Void) throws {
        var text = try String(contentsOfFile: directory + "/manifest.json", encoding: .utf8)
        transform(&text)
        try text.write(toFile: directory + "/manifest.json", atomically: true, encoding: .utf8)
    }

    func openError(_ directory: String) -> String? {
        do { _ = try CalibrationStore(path: directory); return nil } catch { return "\(error)" }
    }

    /// The manifest's refusal, when opening the store fails on its manifest.
    func manifestError(_ directory: String) -> ManifestError? {
        do { _ = try CalibrationStore(path: directory); return nil } catch {
            guard case let .manifest(path, refusal) = error, path == directory + "/manifest.json" else { return nil }
            return refusal
        }
    }

    @Test func rejectsTruncatedShard() throws {
        let directory = makeTemporaryDirectory()
        try makeSmallStore(at: directory)
        let shard = directory + "/shard-00000.safetensors"
        let bytes = try Data(contentsOf: URL(fileURLWithPath: shard))
        try bytes.dropLast(10).write(to: URL(fileURLWithPath: shard))
        let message = try #require(openError(directory))
        #expect(message.contains("shard-00000.safetensors") && message.contains("header implies"))
    }

    @Test func rejectsNaNInDeltaNLL() throws {
        let directory = makeTemporaryDirectory()
        var sequences = try makeSmallStore(at: directory)
        sequences[1].deltaNLL[7] = .nan
        let manifest = try Manifest.parse(Array(try Data(contentsOf: URL(fileURLWithPath: directory + "/manifest.json"))))
        try StoreWriter.write(sequences, manifest: manifest, to: directory)
        let message = try #require(openError(directory))
        #expect(message.contains("seq.\(sequences[1].id).delta_nll") && message.contains("not finite"))
    }

    /// A version 2 store measures delta_nll around a background: the zero of each unit is its background
    /// expert (16 bits before the frozen chunks), and the manifest round-trips the background.
    @Test func backgroundStoresTakeTheBackgroundExpertAsTheZero() throws {
        let directory = makeTemporaryDirectory()
        var sequences = try makeSmallStore(at: directory)   // 4 layers, 2 heads, 3 chunks, experts fp16, int4, int2
        var manifest = try Manifest.parse(Array(try Data(contentsOf: URL(fileURLWithPath: directory + "/manifest.json"))))
        manifest.background = Background(experts: [1, 2, 2, 2], frozenChunks: 1)
        manifest.sensitivity = "taylor+exact-answers"
        let (M, C, H) = (3, 3, 2)
        for s in sequences.indices {
            for index in sequences[s].deltaNLL.indices {
                let layer = index / (H * C * M), chunk = index / M % C, expert = index % M
                let zero = chunk < 1 ? 0 : (layer == 0 ? 1 : 2)
                sequences[s].deltaNLL[index] = expert == zero ? 0 : Float(expert) - Float(zero)   // fp16 below the background: negative
            }
        }
        try StoreWriter.write(sequences, manifest: manifest, to: directory)
        let store = try CalibrationStore(path: directory)
        #expect(store.manifest.background == manifest.background)
        #expect(store.manifest.json.serialized.contains(#""version":2"#))
        #expect(store.manifest.json.serialized.contains(#""background":{"experts":["int4","int2","int2","int2"],"frozen_chunks":1}"#))

        sequences[0].deltaNLL[(0 * H * C + 0 * C + 2) * M + 1] = 0.5   // layer 0, head 0, chunk 2: its background int4
        try StoreWriter.write(sequences, manifest: manifest, to: directory)
        let message = try #require(openError(directory))
        #expect(message.contains("the background expert's value at [0, 0, 2, 1] is 0.5, expected 0"))

        try rewriteManifest(directory) { $0 = $0.replacingOccurrences(of: #""int4","int2","int2","int2""#, with: #""int4","int2","int3","int2""#) }
        #expect(manifestError(directory) == ManifestError(key: "background.experts", reason: .invalidBackground(layers: 4)))
    }

    /// A version 3 store says where each layer's cache starts (sliding layers): a chunk it does not hold has no
    /// sensitivity at any expert, the manifest round-trips the list, and a damaged list is named.
    @Test func heldChunkStoresHaveNoSensitivityBeforeTheFirstHeldChunk() throws {
        let directory = makeTemporaryDirectory()
        var sequences = try makeSmallStore(at: directory)   // 4 layers, 2 heads, 3 chunks, experts fp16, int4, int2
        var manifest = try Manifest.parse(Array(try Data(contentsOf: URL(fileURLWithPath: directory + "/manifest.json"))))
        manifest.firstHeldChunks = [2, 0, 2, 0]
        let (M, C, H) = (3, 3, 2)
        for s in sequences.indices {
            for index in sequences[s].deltaNLL.indices where index / (H * C * M) % 2 == 0 && index / M % C < 2 {
                sequences[s].deltaNLL[index] = 0
            }
        }
        try StoreWriter.write(sequences, manifest: manifest, to: directory)
        let store = try CalibrationStore(path: directory)
        #expect(store.manifest.firstHeldChunks == [2, 0, 2, 0])
        #expect(store.manifest.json.serialized.contains(#""version":3"#))
        #expect(store.manifest.json.serialized.contains(#""first_held_chunks":[2,0,2,0]"#))

        sequences[0].deltaNLL[(2 * H * C + 1 * C + 1) * M + 2] = 0.25   // layer 2, head 1, chunk 1: not held
        try StoreWriter.write(sequences, manifest: manifest, to: directory)
        let message = try #require(openError(directory))
        #expect(message.contains("the value at [2, 1, 1, 2] is 0.25, expected 0: layer 2's cache holds chunks from 2 only"))

        for damaged in [#"[2,0,2]"#, #"[2,0,4,0]"#, #"[0,0,0,0]"#, #"[2,0,"2",0]"#] {
            try rewriteManifest(directory) { $0 = $0.replacingOccurrences(of: #"[2,0,2,0]"#, with: damaged) }
            #expect(manifestError(directory) == ManifestError(key: "first_held_chunks", reason: .invalidFirstHeldChunks(layers: 4, chunks: 3)),
                    "\(damaged)")
            try rewriteManifest(directory) { $0 = $0.replacingOccurrences(of: damaged, with: #"[2,0,2,0]"#) }
        }
    }

    @Test func rejectsManifestInconsistencies() throws {
        let directory = makeTemporaryDirectory()
        _ = try makeSmallStore(at: directory)
        let pristine = try String(contentsOfFile: directory + "/manifest.json", encoding: .utf8)
        let outside = try #require(try Manifest.parse(Array(pristine.utf8)).sequences.enumerated().first { $0.element.id >= 1 })
        let cases: [(ManifestError, (inout String) -> Void)] = [
            (ManifestError(key: "sequences[\(outside.offset)].id", reason: .idOutsideCorpus(id: outside.element.id, sequences: 1)),
             { $0 = $0.replacingOccurrences(of: #""num_sequences":"#, with: #""num_sequences":1,"x":"#) }),
            (ManifestError(key: "model.head_dim", reason: .notAnInteger(min: 1, max: 65535)),
             { $0 = $0.replacingOccurrences(of: #""head_dim":8"#, with: #""head_dim":"8""#) }),
            (ManifestError(key: "experts", reason: .noUnquantizedExpert), { text in   // fp16 declared as 8/8: reports would call it fp16
                let json = try! JSON.parse(text)
                let edited = json.objectValue!.map { key, value -> (String, JSON) in
                    guard key == "experts" else { return (key, value) }
                    return (key, .array(value.arrayValue!.map { expert in
                        .object(expert.objectValue!.map { field, bits in field.hasSuffix("_bits") && bits == .number("16") ? (field, .number("8")) : (field, bits) })
                    }))
                }
                text = JSON.object(edited).serialized
            }),
            (ManifestError(key: "sequences[0].shard", reason: .invalidShardName("../shard-00000.safetensors")),
             { $0 = $0.replacingOccurrences(of: #""shard-00000.safetensors""#, with: #""../shard-00000.safetensors""#) }),
        ]
        for (expected, transform) in cases {
            try pristine.write(toFile: directory + "/manifest.json", atomically: true, encoding: .utf8)
            try rewriteManifest(directory, transform)
            #expect(manifestError(directory) == expected)
        }
    }

    /// A manifest that parses but disagrees with the shards; the message names the store.
    @Test func rejectsManifestsThatDisagreeWithTheShards() throws {
        let directory = makeTemporaryDirectory()
        _ = try makeSmallStore(at: directory)
        let pristine = try String(contentsOfFile: directory + "/manifest.json", encoding: .utf8)
        let cases: [(String, (inout String) -> Void)] = [
            ("missing from the shard", { text in
                let first = text.range(of: "shard-00000.safetensors")!
                text.replaceSubrange(first, with: "shard-00001.safetensors")
            }),
            ("shape", { $0 = $0.replacingOccurrences(of: #""num_layers":4"#, with: #""num_layers":3"#) }),
            ("not listed in the manifest", { text in
                let json = try! JSON.parse(text)
                let trimmed = json.objectValue!.map { key, value -> (String, JSON) in
                    key == "sequences" ? (key, .array(Array(value.arrayValue!.dropFirst()))) : (key, value)
                }
                text = JSON.object(trimmed).serialized
            }),
        ]
        for (expected, transform) in cases {
            try pristine.write(toFile: directory + "/manifest.json", atomically: true, encoding: .utf8)
            try rewriteManifest(directory, transform)
            let message = try #require(openError(directory), "\(expected)")
            #expect(message.contains(expected), "\(message)")
            #expect(message.contains(directory))
        }
    }

    @Test func rejectsWrongDType() throws {
        let directory = makeTemporaryDirectory()
        let sequences = try makeSmallStore(at: directory, sequences: 1)
        var builder = SafeTensorsBuilder()
        let s = sequences[0]
        builder.add("seq.\(s.id).inputs", shape: [4, 2, 96, 8], floats: s.inputs)
        builder.add("seq.\(s.id).nll", dtype: .f64, shape: [], bytes: withUnsafeBytes(of: Double(s.nll), Array.init))
        builder.add("seq.\(s.id).delta_nll", shape: [4, 2, 3, 3], floats: s.deltaNLL)
        try AtomicFile.write(builder.serialized(), to: directory + "/shard-00000.safetensors")
        let message = try #require(openError(directory))
        #expect(message.contains("seq.\(s.id).nll") && message.contains("dtype F64"))
    }

    /// The fingerprint covers the manifest, every shard header and every shard's size (not the data, which
    /// checkpoints would otherwise have to hash in full): it is the same for a store opened twice and for
    /// an identical copy, and changes with the sequence count or any manifest field.
    @Test func fingerprintIsDeterministicAndFollowsManifestAndHeaders() throws {
        let a = makeTemporaryDirectory(), copy = makeTemporaryDirectory(), fewer = makeTemporaryDirectory()
        try makeSmallStore(at: a)
        try makeSmallStore(at: copy)
        try makeSmallStore(at: fewer, sequences: 5)
        let fingerprint = try CalibrationStore(path: a).fingerprint
        #expect(try CalibrationStore(path: a).fingerprint == fingerprint && CalibrationStore(path: copy).fingerprint == fingerprint)
        #expect(try CalibrationStore(path: fewer).fingerprint != fingerprint)
        try rewriteManifest(copy) { $0 = $0.replacingOccurrences(of: #""source":"test""#, with: #""source":"tesT""#) }
        #expect(try CalibrationStore(path: copy).fingerprint != fingerprint)
    }
}
