import Foundation
import MoQAEExperts
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

/// A config for a small store in `directory`, run directory `run`.
func smallConfig(store: String, run: String, _ overrides: [String] = []) throws -> TrainingConfig {
    try TrainingConfig.load(yaml: "", source: "test", overrides: [
        "store=\(store)", "run_dir=\(run)", "data.calibration_fraction=0.3", "data.validation_fraction=0.2",
        "train.batch_size=4", "train.eval_every=4", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
    ] + overrides)
}

func train(_ config: TrainingConfig, resume: ResumeSource? = nil) throws -> Trainer {
    let trainer = try Trainer(config: config, configSource: "test", resume: resume, progress: ProgressReporter(interactive: false))
    _ = try trainer.run()
    return trainer
}

@Suite struct TrainingTests {
    let store = makeTemporaryDirectory("store")

    init() throws { try makeSmallStore(at: store, sequences: 16) }

    /// λ = 0 rewards memory alone: routing must move to the fewest bits; λ = 1 rewards accuracy: to the most.
    ///
    /// The paper's loss only ever lowers the chosen expert's probability, by a weight that is smallest for
    /// the expert the loss prefers, so routing settles in a mix where that expert holds the majority
    /// (about 55-80% in our runs), not all of it. The test asks for that majority, of both losses, under
    /// three seeds (initial weights and shuffle order), so that it does not hang on one draw.
    @Test(arguments: LossKind.allCases, [(0.0, 2, 0), (1.0, 0, 0), (0.0, 2, 1), (1.0, 0, 1), (0.0, 2, 2), (1.0, 0, 2)])
    func lambdaExtremes(kind: LossKind, extreme: (lambda: Double, expectedExpert: Int, seed: Int)) throws {
        let (lambda, expectedExpert, seed) = extreme
        let store = makeTemporaryDirectory("synthetic")
        try SyntheticStore.write(shape: .init(name: "test", layers: 4, heads: 2, headDim: 16, tokens: 128), sequences: 48, to: store)
        let config = try smallConfig(store: store, run: makeTemporaryDirectory("run"),
                                     ["seed=\(seed)", "loss.kind=\(kind.rawValue)", "loss.lambda=\(lambda)", "train.lr=3e-3", "train.epochs=60", "train.eval_every=0",
                                      "data.calibration_fraction=0.05", "data.validation_fraction=0.05"])
        let trainer = try train(config)
        let report = try #require(try validationReport(streamer: trainer.streamer, parameters: trainer.state.parameters))
        let fractions = report.router.expertFractions
        #expect(fractions[expectedExpert] > 0.5 && fractions.max() == fractions[expectedExpert], "\(kind) λ=\(lambda) seed \(seed): fractions \(fractions)")
    }

    /// Stop after 5 steps, resume, and finish: checkpoint, export and logs equal an uninterrupted run's,
    /// also under a bits budget, whose λ changes every step.
    @Test(arguments: [[], ["loss.kind=expected", "router.target_bits=8", "loss.budget_rate=0.5"]])
    func resumeIsBitIdentical(_ settings: [String]) throws {
        let whole = makeTemporaryDirectory("whole"), split = makeTemporaryDirectory("split")
        let a = try train(try smallConfig(store: store, run: whole, ["train.epochs=100", "train.max_steps=12"] + settings))
        _ = try train(try smallConfig(store: store, run: split, ["train.epochs=100", "train.max_steps=5"] + settings))
        let b = try train(try smallConfig(store: store, run: split, ["train.epochs=100", "train.max_steps=12"] + settings), resume: .latest)
        if !settings.isEmpty { #expect(Set([a.state.lambda, 0.5]).count == 2, "the budget should have moved λ") }
        #expect(a.state.step == 12 && b.state.step == 12)
        let last = Checkpoint.fileName(step: 12)
        var fromDisk = [try Checkpoint.load(path: whole + "/" + last), try Checkpoint.load(path: split + "/" + last)]
        fromDisk[1].config = fromDisk[0].config   // only run_dir differs
        #expect(fromDisk[0] == fromDisk[1])
        #expect(fromDisk[0].parameters == a.state.parameters && fromDisk[0].optimizer == a.state.optimizer)
        let exportA = RouterExport(parameters: a.state.parameters, setup: a.data.setup, weightType: .binary16).serialized()
        let exportB = RouterExport(parameters: b.state.parameters, setup: b.data.setup, weightType: .binary16).serialized()
        #expect(exportA == exportB)
        // The stopped run also reported at its last step (5); every report of the whole run is there, equal.
        func evals(_ run: String) throws -> [String] { try String(contentsOfFile: run + "/eval.jsonl", encoding: .utf8).split(separator: "\n").map(String.init) }
        #expect(try evals(split).filter { !$0.hasPrefix(#"{"step":5,"#) } == evals(whole))
        func metrics(_ run: String) throws -> [String] {
            try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n").map { line in
                let json = try JSON.parse(String(line))
                return JSON.object(json.objectValue!.filter { !["step_seconds", "vectors_per_second"].contains($0.0) }).serialized
            }
        }
        #expect(try metrics(whole).count == 12)
        #expect(try metrics(whole) == metrics(split))
    }

    @Test func keepsLastCheckpointsAndSkipsDamagedOnes() throws {
        let run = makeTemporaryDirectory("run")
        _ = try train(try smallConfig(store: store, run: run, ["train.epochs=100", "train.max_steps=12"]))
        let directory = CheckpointDirectory(path: run)
        #expect(directory.candidates().map(\.step) == [12, 8])
        var bytes = try Data(contentsOf: URL(fileURLWithPath: run + "/" + Checkpoint.fileName(step: 12)))
        bytes[bytes.count - 3] ^= 0x10
        try bytes.write(to: URL(fileURLWithPath: run + "/" + Checkpoint.fileName(step: 12)))
        let found = try #require(directory.latest())
        #expect(found.checkpoint.step == 8)
        #expect(found.skipped == [CheckpointError(path: run + "/" + Checkpoint.fileName(step: 12), reason: .checksumMismatch)])
    }

    @Test func resumeRefusesModelShapingChangesAndReportsOthers() throws {
        let run = makeTemporaryDirectory("run")
        _ = try train(try smallConfig(store: store, run: run, ["train.epochs=100", "train.max_steps=4"]))
        #expect {
            _ = try Trainer(config: try smallConfig(store: store, run: run, ["router.group_size=2"]), configSource: "test",
                            resume: .latest, progress: ProgressReporter(interactive: false))
        } throws: { error in
            if case .incompatibleCheckpoint(key: "router.group_size", checkpoint: .int(3), config: .int(2))? = error as? TrainingError { true } else { false }
        }
        #expect {
            _ = try Trainer(config: try smallConfig(store: store, run: run, ["train.epochs=100", "train.batch_size=3"]), configSource: "test",
                            resume: .latest, progress: ProgressReporter(interactive: false))
        } throws: { error in
            if case .incompatibleCheckpoint(key: "train.batch_size", checkpoint: .int(4), config: .int(3))? = error as? TrainingError { true } else { false }
        }
        #expect(TrainingError.incompatibleCheckpoint(key: "train.batch_size", checkpoint: .int(4), config: .int(3)).description
                == "cannot resume: train.batch_size is 3 but the checkpoint was trained with 4")
        let resumed = try Trainer(config: try smallConfig(store: store, run: run, ["train.epochs=100", "train.max_steps=4", "train.lr=1e-4"]), configSource: "test",
                                  resume: .latest, progress: ProgressReporter(interactive: false))
        #expect(resumed.state.optimizer.settings.learningRate == 1e-4 && resumed.state.step == 4)
        #expect {
            _ = try Trainer(config: try smallConfig(store: store, run: run), configSource: "test", resume: nil,
                            progress: ProgressReporter(interactive: false))
        } throws: { error in
            if case .runAlreadyExists(directory: run)? = error as? TrainingError { true } else { false }
        }
    }

    /// A key+value store's routers read 2·head_dim-wide vectors, while memory is still counted over the
    /// head dimension; the input kind reaches the checkpoint and the export, and a resume checks it.
    @Test func keyAndValueInputsTrainAtTwiceTheWidth() throws {
        let pairStore = makeTemporaryDirectory("store-kv"), run = makeTemporaryDirectory("run")
        try makeSmallStore(at: pairStore, sequences: 16, routerInput: .keyAndValue)
        do {   // the trainers (and their run directories' locks) end before the resume below
            let key = try train(try smallConfig(store: store, run: makeTemporaryDirectory("run"), ["train.epochs=100", "train.max_steps=4"]))
            let pair = try train(try smallConfig(store: pairStore, run: run, ["train.epochs=100", "train.max_steps=4"]))
            #expect(pair.data.layout.inputDim == 16 && pair.data.setup.headDim == 8 && pair.data.setup.routerInput == .keyAndValue)
            #expect(pair.state.parameters.values.count == 2 * (2 * 16 * 3 + 3 * 3))
            let keyReport = try #require(try validationReport(streamer: key.streamer, parameters: key.state.parameters))
            let pairReport = try #require(try validationReport(streamer: pair.streamer, parameters: pair.state.parameters))
            #expect(pairReport.uniform.map(\.memory) == keyReport.uniform.map(\.memory))
            #expect(try Checkpoint.load(path: run + "/" + Checkpoint.fileName(step: 4)).setup == pair.data.setup)
        }

        let checkpoint = try Checkpoint.load(path: run + "/" + Checkpoint.fileName(step: 4))
        let export = try RouterExport.parse(RouterExport(parameters: checkpoint.parameters, setup: checkpoint.setup, weightType: .binary16).serialized(), path: "x")
        #expect(export.routerInput == .keyAndValue && export.parameters.inputDim == 16)
        #expect {
            _ = try Trainer(config: try smallConfig(store: store, run: run, ["train.epochs=100", "train.max_steps=8"]), configSource: "test",
                            resume: .latest, progress: ProgressReporter(interactive: false))
        } throws: { error in
            if case .routerInputChanged(checkpoint: .keyAndValue, store: store, stored: .key)? = error as? TrainingError { true } else { false }
        }
    }

    /// `eval` of an export takes its routing from the export: a pooled router of hidden width 5 with
    /// routed chunk 0 gives back the config it was trained with; experts missing from the store and
    /// routers for another model shape are refused.
    @Test func anExportBringsItsRouting() throws {
        let trained = try smallConfig(store: store, run: makeTemporaryDirectory("run"),
                                      ["router.pooling=max", "router.hidden_width=5", "router.freeze_first_chunk=false", "router.group_size=3",
                                       "router.experts=[int2, fp16]"])
        let storeFile = try CalibrationStore(path: store)
        let data = try RoutedStore(store: storeFile, config: trained, source: "test")
        var random = RandomGenerator(seed: 2)
        let parameters = RouterParameters.initialized(routers: data.layout.routers, inputDim: data.layout.inputDim, experts: 2, hidden: 5, random: &random)
        let export = RouterExport(parameters: parameters, setup: data.setup, weightType: .binary32)
        let base = try smallConfig(store: store, run: "elsewhere")
        let config = try base.routing(of: export, path: "r.bin", on: storeFile)
        for key in TrainingConfig.keys.map(\.path) {
            #expect(config.value(key) == (key.hasPrefix("router.") ? trained : base).value(key), "\(key)")
        }

        var foreign = export
        foreign.expertBits[0] = (keyBits: 3, valueBits: 3)
        #expect(throws: ExportError(path: "r.bin", reason: .expertNotInStore(keyBits: 3, valueBits: 3, store: store))) {
            try base.routing(of: foreign, path: "r.bin", on: storeFile)
        }
        var taller = export
        taller.layers += 1
        #expect(throws: ExportError(path: "r.bin", reason: .modelShapeMismatch(layers: taller.layers, heads: taller.heads, store: store,
                                                                                storeLayers: export.layers, storeHeads: export.heads))) {
            try base.routing(of: taller, path: "r.bin", on: storeFile)
        }
        var otherInput = export
        otherInput.routerInput = .keyPreRoPE
        #expect(throws: ExportError(path: "r.bin", reason: .routerInputMismatch(export: .keyPreRoPE, store: store, stored: .key))) {
            try base.routing(of: otherInput, path: "r.bin", on: storeFile)
        }
        var otherChunks = export
        otherChunks.chunkSize = 16
        #expect(throws: ExportError(path: "r.bin", reason: .chunkSizeMismatch(export: 16, store: store, stored: 32))) {
            try base.routing(of: otherChunks, path: "r.bin", on: storeFile)
        }
    }

    /// A checkpoint written before router inputs other than the key (the fuzzers' seed is one) has no
    /// head_dim or router_input: it reads as key routers whose head dimension is the input width.
    /// A checkpoint whose counters were forged and its checksum recomputed is refused, not trusted into
    /// arithmetic that traps: each counter has the range the step implies, and the step that of max_steps.
    @Test func forgedCountersAreRefusedEvenWithAValidChecksum() throws {
        let trainer = try train(try smallConfig(store: store, run: makeTemporaryDirectory("run"), ["train.max_steps=3"]))
        let directory = makeTemporaryDirectory("forged")
        let optimizer = trainer.state.optimizer
        let forgeries: [(String, (inout Checkpoint) -> Void)] = [
            ("step", { $0.step = Int(Int64.max) - 1 }),
            ("adam_step", { $0.optimizer = AdamW(settings: optimizer.settings, step: Int(Int64.max) - 1, m: optimizer.m, v: optimizer.v) }),
            ("epoch", { $0.epoch = 4 }),
            ("position", { $0.position = Int(Int64.max) }),
        ]
        for (key, forge) in forgeries {
            var forged = trainer.state
            forge(&forged)
            let path = directory + "/\(key).safetensors"
            try forged.write(to: path)
            let max = key == "step" ? Int(Int32.max) : trainer.state.step   // counters are capped by the step
            #expect(throws: CheckpointError(path: path, reason: .invalidCounter(key: key, max: max))) { _ = try Checkpoint.load(path: path) }
        }
        // The message names the file and the metadata key, on one line.
        #expect(CheckpointError(path: "run/ckpt.safetensors", reason: .invalidCounter(key: "epoch", max: 3)).description
                == "run/ckpt.safetensors: metadata epoch is not an integer in 0...3")
    }

    @Test func checkpointsWithoutRouterInputReadAsKeyRouters() throws {
        let path = FuzzCorpusTests.fuzzDirectory + "/Corpus/checkpoint/default-320.safetensors"
        let checkpoint = try Checkpoint.load(path: path)
        #expect(checkpoint.setup.routerInput == .key && checkpoint.setup.headDim == checkpoint.setup.layout.inputDim)
    }

    @Test func validationReportIsConsistent() throws {
        let trainer = try train(try smallConfig(store: store, run: makeTemporaryDirectory("run"), ["train.max_steps=2"]))
        let report = try #require(try validationReport(streamer: trainer.streamer, parameters: trainer.state.parameters))
        let fp16 = report.uniform[0], int4 = report.uniform[1]
        #expect(fp16.memory.payloadBits == 16 && fp16.memory.fractionOfFP16 == 1)
        // 96 tokens: chunk 0 frozen, chunks 1-2 routed. int4 payload: (1/3)·16 + (2/3)·4.
        #expect(abs(int4.memory.payloadBits - (16.0 / 3 + 8.0 / 3)) < 1e-12)
        // int4 constants: 32·D per unit for keys, 32·N per unit for values, over 2·N·D elements.
        #expect(abs(int4.memory.bitsWithConstants - (int4.memory.payloadBits + (2.0 / 3) * (32.0 * 8 + 32.0 * 32) / (2 * 32 * 8))) < 1e-12)
        for plan in [report.prescient, report.staticPlan] {
            #expect(plan.memory.bitsWithConstants <= report.router.memory.bitsWithConstants + 1e-9)
        }
        // The prescient plan picks with the validation split's own delta_nll, so nothing at its bits does better.
        #expect(report.prescient.meanNLL <= min(report.router.meanNLL, report.staticPlan.meanNLL) + 1e-9)
        #expect(abs(report.routerVsStatic.mean - (report.router.meanNLL - report.staticPlan.meanNLL)) < 1e-9)
        #expect(report.routerVsStatic.halfWidth > 0 && report.routerVsStatic.sequences == report.sequences)
        #expect(report.text.contains("static (same bits)") && report.text.contains("router vs static at the same bits"))
        #expect(report.text.contains(ValidationReport.prescientNote))
        #expect(fp16.meanNLL <= int4.meanNLL && int4.meanNLL <= report.uniform[2].meanNLL)
        #expect(report.decisionsPerRouter.map { $0.reduce(0, +) } == [report.sequences * 4, report.sequences * 4])
    }
}

@Suite struct StaticPlanTests {
    /// On a store small enough to enumerate (2 layers × 1 head × 3 chunks, 3 experts: 729 plans), the
    /// static plan at every budget is the brute-force best content-blind plan: no assignment of experts
    /// to the six (layer, head, chunk) positions has a lower summed calibration delta_nll within the
    /// bits the static plan uses, and those bits are within the budget.
    @Test func staticPlanIsTheBruteForceOptimum() throws {
        let storePath = makeTemporaryDirectory("store")
        try makeSmallStore(at: storePath, layers: 2, heads: 1, sequences: 12)
        let config = try smallConfig(store: storePath, run: makeTemporaryDirectory("run"),
                                     ["router.freeze_first_chunk=false", "router.group_size=1"])
        let data = try RoutedStore(store: CalibrationStore(path: storePath), config: config, source: "test")
        let M = data.experts.count, units = 6, unitBits = data.setup.unitBits
        // (units, M) summed over the calibration split, computed here from the sensitivity tables directly.
        var costs = [Double](repeating: 0, count: units * M)
        for sequence in data.calibration {
            let table = data.sensitivity(of: sequence)
            for layer in 0..<2 {
                for chunk in 0..<3 {
                    for expert in 0..<M { costs[(layer * 3 + chunk) * M + expert] += Double(table.delta(layer: layer, head: 0, chunk: chunk, expert: expert)) }
                }
            }
        }
        func figures(_ plan: [Int]) -> (cost: Double, bits: Double) {
            plan.enumerated().reduce((0, 0)) { ($0.0 + costs[$1.offset * M + $1.element], $0.1 + unitBits[$1.element]) }
        }
        let plans: [[Int]] = (0..<729).map { code in (0..<units).map { unit in code / Int(pow(3.0, Double(unit))) % 3 } }
        var distinct = Set<[Int]>()
        for budget in stride(from: unitBits.min()! * 6, through: unitBits.max()! * 6, by: (unitBits.max()! - unitBits.min()!) / 4) {
            let plan = staticPlan(data: data, budget: budget)
            let (cost, bits) = figures(plan)
            let best = plans.map(figures).filter { $0.bits <= bits }.map(\.cost).min()!
            #expect(bits <= budget + 1e-9)
            #expect(abs(cost - best) < 1e-9, "budget \(budget): static \(plan) costs \(cost), the best within \(bits) bits \(best)")
            distinct.insert(plan)
        }
        #expect(distinct.count >= 4)   // the budgets really move the plan
    }
}

@Suite struct ExportTests {
    func export(inputDim: Int, routers: Int, type: RouterExport.WeightType, routerInput: RouterInput = .key,
                pooling: ChunkPooling = .vote) -> RouterExport {
        var random = RandomGenerator(seed: 1)
        let layers = routers * 3
        let headDim = routerInput == .keyAndValue ? inputDim / 2 : inputDim - (routerInput == .keyAndChunkStatistics ? RouterInput.chunkStatistics : 0)
        let layout = RoutingLayout(layers: layers, heads: 8, tokens: 64, inputDim: inputDim, chunkSize: 32, groupSize: 3, freezeFirstChunk: true,
                                   pooling: pooling)
        let setup = RouterSetup(layout: layout, experts: [Expert(name: "fp16", keyBits: 16, valueBits: 16), Expert(name: "int4", keyBits: 4, valueBits: 4),
                                                          Expert(name: "int2", keyBits: 2, valueBits: 2)], valueGroup: headDim,
                                headDim: headDim, routerInput: routerInput)
        return RouterExport(parameters: .initialized(routers: routers, inputDim: inputDim, experts: 3, random: &random), setup: setup, weightType: type)
    }

    @Test func sizeIsThePapers() {
        #expect(export(inputDim: 128, routers: 1, type: .binary16).serialized().count == 1596)
        #expect(export(inputDim: 128, routers: 2, type: .binary16).serialized().count == 1596 + 1554)
        #expect(export(inputDim: 128, routers: 1, type: .binary32).serialized().count == 32 + 6 + 2 * 1554 + 4)
    }

    @Test(arguments: [RouterExport.WeightType.binary16, .binary32], RouterInput.allCases)
    func roundTrip(type: RouterExport.WeightType, routerInput: RouterInput) throws {
        let original = export(inputDim: 16, routers: 2, type: type, routerInput: routerInput)
        let bytes = original.serialized()
        #expect(Array(bytes[0..<4]) == Array("MQAE".utf8) && bytes[4] == 1 && bytes[6] == type.rawValue && bytes[7] == 3)
        #expect(bytes[20] == 1 | routerInput.exportCode << 1)
        #expect(try RouterExport.parse(bytes, path: "x") == original)
    }

    /// A pooled router is version 2 with its kind in byte 21 and its hidden width (here M) at 22–23;
    /// otherwise the same bytes as version 1.
    @Test(arguments: [ChunkPooling.mean, .max])
    func pooledRoutersAreVersion2(pooling: ChunkPooling) throws {
        let paper = export(inputDim: 16, routers: 2, type: .binary16).serialized()
        let pooled = export(inputDim: 16, routers: 2, type: .binary16, pooling: pooling)
        let bytes = pooled.serialized()
        #expect(bytes[4] == 2 && bytes[21] == pooling.exportCode && bytes[21] != 0 && bytes[22] == 3 && bytes[23] == 0)
        /// Every byte but the version, the kind and the CRC.
        func rest(_ file: [UInt8]) -> [UInt8] {
            var body = Array(file.dropLast(4))
            for offset in [4, 21, 22] { body[offset] = 0 }
            return body
        }
        #expect(rest(bytes) == rest(paper))
        let parsed = try RouterExport.parse(bytes, path: "x")
        #expect(parsed == pooled && parsed.pooling == pooling)
    }

    /// A bits price makes version 3: the price as binary32 at bytes 24–27, otherwise version 2's bytes.
    @Test func aBitsPriceIsVersion3() throws {
        var priced = export(inputDim: 16, routers: 2, type: .binary16, pooling: .mean)
        let plain = priced.serialized()
        priced.bitsPrice = -0.627
        let bytes = priced.serialized()
        #expect(bytes.count == plain.count && bytes[4] == 3 && plain[4] == 2)
        #expect(Array(bytes[24..<28]) == withUnsafeBytes(of: Float(-0.627).bitPattern.littleEndian) { Array($0) })
        #expect(Array(bytes[5..<24]) == Array(plain[5..<24]) && bytes[28..<(bytes.count - 4)] == plain[28..<(plain.count - 4)])
        #expect(try RouterExport.parse(bytes, path: "x") == priced)
        func patched(_ changes: [Int: UInt8]) -> ExportError.Reason? {
            var body = Array(bytes.dropLast(4))
            for (offset, value) in changes { body[offset] = value }
            do { _ = try RouterExport.parse(body + withUnsafeBytes(of: CRC32.checksum(body).littleEndian) { Array($0) }, path: "r.bin") }
            catch { return error.reason }
            return nil
        }
        let infinity = withUnsafeBytes(of: Float.infinity.bitPattern.littleEndian) { Array($0) }
        #expect(patched([24: infinity[0], 25: infinity[1], 26: infinity[2], 27: infinity[3]]) == .nonFiniteBitsPrice)
        #expect(patched([28: 1]) == .reservedBitsSet)
    }

    @Test func rejectsDamage() throws {
        let bytes = export(inputDim: 16, routers: 1, type: .binary16).serialized()
        func reason(_ damaged: [UInt8]) -> ExportError.Reason? {
            do { _ = try RouterExport.parse(damaged, path: "r.bin"); return nil } catch { return error.reason }
        }
        var flipped = bytes
        flipped[40] ^= 1
        #expect(throws: ExportError(path: "r.bin", reason: .checksumMismatch)) { try RouterExport.parse(flipped, path: "r.bin") }
        #expect(reason(Array(bytes.dropLast())) == .sizeMismatch(actual: bytes.count - 1, expected: bytes.count))
        var version = bytes
        version[4] = 4
        #expect(reason(version) == .unsupportedVersion(4))
        var dtype = bytes
        dtype[6] = 7
        #expect(reason(dtype) == .unknownWeightType(7))
        #expect(reason(Array("MQAX".utf8) + bytes.dropFirst(4)) == .notAnExport)
        #expect(reason(Array(bytes.prefix(35))) == .tooSmall(bytes: 35))
        /// `file` with another flags byte and a CRC that matches again.
        func resealed(_ file: [UInt8], flags: UInt8) -> [UInt8] {
            var body = Array(file.dropLast(4))
            body[20] = flags
            return body + withUnsafeBytes(of: CRC32.checksum(body).littleEndian) { Array($0) }
        }
        #expect(try RouterExport.parse(resealed(bytes, flags: 1 | 3 << 1), path: "x").routerInput == .keyAndChunkStatistics)
        #expect(reason(resealed(bytes, flags: 1 | 1 << 3)) == .reservedBitsSet)
        /// `file` with header bytes replaced and a CRC that matches again.
        func patched(_ file: [UInt8], _ changes: [Int: UInt8]) -> [UInt8] {
            var body = Array(file.dropLast(4))
            for (offset, value) in changes { body[offset] = value }
            return body + withUnsafeBytes(of: CRC32.checksum(body).littleEndian) { Array($0) }
        }
        #expect(reason(patched(bytes, [21: 1])) == .reservedBitsSet)   // version 1 has no kind byte
        #expect(reason(patched(bytes, [4: 2, 21: 3, 22: 3])) == .unknownRouterKind(3))
        #expect(reason(patched(bytes, [4: 2, 21: 2, 22: 3, 24: 1])) == .reservedBitsSet)
        #expect(reason(patched(bytes, [4: 2, 21: 2])) == .zeroHiddenWidth)
        let hidden4 = RouterExport.fileSize(experts: 3, inputDim: 16, routers: 1, hidden: 4, weightType: .binary16)
        #expect(reason(patched(bytes, [4: 2, 21: 2, 22: 4])) == .sizeMismatch(actual: bytes.count, expected: hidden4))   // H = 4 needs other sizes
        let twoRouters = export(inputDim: 16, routers: 2, type: .binary16).serialized()   // 6 layers in groups of 3
        #expect(reason(patched(twoRouters, [16: 3])) == .routerCountMismatch(routers: 2, layers: 3, groupSize: 3))
        let oddWidth = export(inputDim: 15, routers: 1, type: .binary16).serialized()
        #expect(reason(resealed(oddWidth, flags: 1 | RouterInput.keyAndValue.exportCode << 1)) == .oddKeyAndValueWidth(15))
        // The message names the file and says what is wrong, on one line.
        #expect(ExportError(path: "r.bin", reason: .unknownRouterKind(3)).description
                == "r.bin: router kind 3 is unknown (expected 0 = vote, 1 = mean, 2 = max)")
        #expect(ExportError(path: "r.bin", reason: .routerCountMismatch(routers: 2, layers: 3, groupSize: 3)).description
                == "r.bin: header says 2 routers, but 3 layers in groups of 3 need 1")
    }
}
