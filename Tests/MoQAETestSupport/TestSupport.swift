import Foundation
import MoQAEExperts
import MoQAEStore

/// A fresh empty directory under the system temporary directory.
public func makeTemporaryDirectory(_ label: String = "moqae-test") -> String {
    let path = NSTemporaryDirectory() + "/\(label)-\(UUID().uuidString)"
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// A small deterministic store: `sequences` sequences of pseudo-random inputs and delta_nll.
@discardableResult
public func makeSmallStore(at directory: String, layers: Int = 4, heads: Int = 2, headDim: Int = 8, tokens: Int = 96,
                           chunkSize: Int = 32, sequences count: Int = 6, inputDType: DType = .f32, fraction: Double = 0.5,
                           experts: [Expert] = [Expert(name: "fp16", keyBits: 16, valueBits: 16),
                                                Expert(name: "int4", keyBits: 4, valueBits: 4),
                                                Expert(name: "int2", keyBits: 2, valueBits: 2)],
                           sequencesPerShard: Int = 4, routerInput: RouterInput = .key) throws -> [SequenceTensors] {
    var state: UInt64 = 0x1234_5678
    func next() -> Float {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(state >> 40) * 0x1p-24
    }
    let C = tokens / chunkSize, M = experts.count
    var ids: [UInt64] = []
    var id: UInt64 = 0
    while ids.count < count {
        if Selection.unitValue(id: id, seed: 0) < fraction { ids.append(id) }
        id += 1
    }
    let sequences = ids.map { id in
        SequenceTensors(
            id: id,
            inputs: (0..<(layers * heads * tokens * routerInput.width(headDim: headDim))).map { _ in 4 * next() - 2 },
            nll: 2 + next(),
            deltaNLL: (0..<(layers * heads * C * M)).map { index in
                experts[index % M].isUnquantized ? 0 : 0.01 * next() * Float(16 - experts[index % M].keyBits)
            })
    }
    let manifest = Manifest(
        model: ModelShape(name: "test", numLayers: layers, numKVHeads: heads, headDim: headDim), routerInput: routerInput, chunkSize: chunkSize,
        valueGroup: headDim, experts: experts, sensitivity: "taylor", selectionSeed: 0, selectionFraction: fraction,
        corpusSource: "test", tokenizer: "none", seqLen: tokens, numSequences: Int(id), sequences: [])
    try StoreWriter.write(sequences, manifest: manifest, inputDType: inputDType, sequencesPerShard: sequencesPerShard, to: directory)
    return sequences
}

/// The result of running a process to completion.
public struct ProcessResult {
    public let status: Int32
    /// True when the process ended by a signal (a crash or trap) rather than exiting.
    public let crashed: Bool
    public let stdout: String
    public let stderr: String
    /// True when the process was still running at its deadline and was killed.
    public let timedOut: Bool
}

/// Runs an executable with arguments in `directory`, optionally sending `signal` (SIGINT by default) once
/// `interruptWhen` holds; a process still running after `deadline` seconds (a hang) is killed and reported
/// as timed out.
public func runProcess(_ executable: String, _ arguments: [String], in directory: String? = nil,
                       interruptWhen: (() -> Bool)? = nil, signal: Int32 = SIGINT, deadline: Double = 300) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let outFile = makeTemporaryDirectory("proc") + "/out", errFile = outFile + ".err"
    _ = FileManager.default.createFile(atPath: outFile, contents: nil)
    _ = FileManager.default.createFile(atPath: errFile, contents: nil)
    process.standardOutput = FileHandle(forWritingAtPath: outFile)
    process.standardError = FileHandle(forWritingAtPath: errFile)
    try process.run()
    if let interruptWhen {
        while process.isRunning && !interruptWhen() { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, signal) }
    }
    let end = Date().addingTimeInterval(deadline)
    while process.isRunning && Date() < end { usleep(20_000) }
    let timedOut = process.isRunning
    if timedOut { kill(process.processIdentifier, SIGKILL) }
    process.waitUntilExit()
    return ProcessResult(status: process.terminationStatus, crashed: process.terminationReason == .uncaughtSignal,
                         stdout: (try? String(contentsOfFile: outFile, encoding: .utf8)) ?? "",
                         stderr: (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? "", timedOut: timedOut)
}

/// The built `moqae-train` next to the test bundle.
public var moqaeTrainExecutable: String {
    let testBinary = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var directory = testBinary.deletingLastPathComponent()
    while !FileManager.default.fileExists(atPath: directory.appendingPathComponent("moqae-train").path), directory.path != "/" {
        directory = directory.deletingLastPathComponent()
    }
    return directory.appendingPathComponent("moqae-train").path
}

/// Deterministic pseudo-random floats in [-1, 1).
public struct Sampler {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> Float {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(state >> 40) * 0x1p-23 - 1
    }
    public mutating func values(_ count: Int, scale: Float = 1) -> [Float] { (0..<count).map { _ in scale * next() } }
}
