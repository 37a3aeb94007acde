import Foundation
import MoQAEStore
import MoQAETraining
import Testing

/// The fuzzers' seed corpora (Fuzz/Corpus) stay valid files of their formats, so fuzzing starts from
/// inputs that reach every parser's end; and every crash reproducer kept in Fuzz/Regressions is
/// rejected with a typed error rather than a crash.
@Suite struct FuzzCorpusTests {
    static let fuzzDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz").path

    static func files(_ kind: String, _ target: String) -> [String] {
        let directory = fuzzDirectory + "/" + kind + "/" + target
        return ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted().map { directory + "/" + $0 }
    }

    /// Parses `bytes` as `target`'s format; throws the parser's error.
    static func parse(_ target: String, _ bytes: [UInt8], path: String) throws {
        switch target {
        case "safetensors": _ = try bytes.withUnsafeBytes { try SafeTensorsHeader(file: $0) }
        case "manifest": _ = try Manifest.parse(bytes)
        case "config": _ = try TrainingConfig.load(yaml: String(decoding: bytes, as: UTF8.self), source: path)
        case "checkpoint": _ = try bytes.withUnsafeBytes { try Checkpoint.parse(file: $0, path: path) }
        case "export": _ = try RouterExport.parse(bytes, path: path)
        default: Issue.record("unknown fuzz target \(target)")
        }
    }

    @Test(arguments: ["safetensors", "manifest", "config", "checkpoint", "export"])
    func seedsParse(target: String) throws {
        let seeds = Self.files("Corpus", target)
        #expect(!seeds.isEmpty)
        for path in seeds { try Self.parse(target, try readFileBytes(path, limit: 1 << 26), path: path) }
    }

    /// Whether `error` is the error type of `target`'s parser.
    static func isFormatError(_ error: any Error, of target: String) -> Bool {
        switch target {
        case "safetensors": error is SafeTensorsError
        case "manifest": error is ManifestError
        case "config": error is ConfigError
        case "checkpoint": error is CheckpointError
        case "export": error is ExportError
        default: false
        }
    }

    @Test(arguments: ["safetensors", "manifest", "config", "checkpoint", "export"])
    func reproducersAreRejected(target: String) throws {
        #expect(!Self.files("Regressions", target).isEmpty, "Fuzz/Regressions/\(target) holds no reproducer")
        for path in Self.files("Regressions", target) {
            let bytes = try readFileBytes(path, limit: 1 << 26)
            let error = try #require(throws: (any Error).self, "\(path)") { try Self.parse(target, bytes, path: path) }
            #expect(Self.isFormatError(error, of: target), "\(path): \(error)")
        }
    }
}
