import Foundation
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

@Suite struct ConfigTests {
    func load(_ yaml: String, overrides: [String] = []) throws(ConfigError) {
        _ = try TrainingConfig.load(yaml: yaml, source: "test.yaml", overrides: overrides)
    }

    @Test func defaultsAreThePapers() throws {
        let config = try TrainingConfig.load(yaml: "", source: "empty")
        #expect(config.chunkSize == 32 && config.lambda == 0.5 && config.groupSize == 3 && config.freezeFirstChunk)
        #expect(config.expertNames == ["fp16", "int4", "int2"])
        #expect(config.optimizer == AdamWSettings(learningRate: 3e-4, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0.01))
        #expect(config.batchSize == 8 && config.calibrationFraction == 0.05 && config.validationFraction == 0.05 && config.seed == 0)
    }

    /// The README documents every key with its default, and configs/default.yaml parses.
    @Test func documentationCoversEveryKey() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        for key in TrainingConfig.keys {
            #expect(readme.contains("| `\(key.path)` |"), "README lacks \(key.path)")
        }
        _ = try TrainingConfig.load(file: root.appendingPathComponent("configs/default.yaml").path)
    }

    @Test func readsNestedKeysAndOverrides() throws {
        let config = try TrainingConfig.load(yaml: "loss:\n  lambda: 0.25\ntrain:\n  lr: 1e-3\n", source: "t",
                                             overrides: ["train.lr=1e-4", "router.experts=[fp16, int2]", "train.max_steps=7"])
        #expect(config.lambda == 0.25 && config.optimizer.learningRate == 1e-4 && config.expertNames == ["fp16", "int2"] && config.maxSteps == 7)
    }

    @Test func yamlRoundTrip() throws {
        let config = try TrainingConfig.load(yaml: "", source: "t", overrides: ["store=a b/c", "train.betas=[0.5, 0.75]", "seed=3"])
        #expect(try TrainingConfig.load(yaml: config.yaml, source: "t") == config)
    }

    @Test(arguments: [
        ("train:\n  lrr: 1\n", ConfigError(location: "test.yaml:2", key: "train.lrr", reason: .unknownKey(suggestion: "train.lr"))),
        ("zzz: 1\n", ConfigError(location: "test.yaml:1", key: "zzz", reason: .unknownKey(suggestion: nil))),
        ("loss:\n  lambda: 1.5\n", ConfigError(location: "test.yaml:2", key: "loss.lambda", reason: .invalidValue(expected: "a number in [0.0, 1.0]", got: "1.5"))),
        ("train:\n  batch_size: 0\n", ConfigError(location: "test.yaml:2", key: "train.batch_size",
                                                 reason: .invalidValue(expected: "an integer in 1...1000000", got: "0"))),
        ("train:\n  batch_size: \"8\"\n", ConfigError(location: "test.yaml:2", key: "train.batch_size",
                                                     reason: .invalidValue(expected: "an integer in 1...1000000", got: "the string \"8\""))),
        ("router:\n  freeze_first_chunk: 1\n", ConfigError(location: "test.yaml:2", key: "router.freeze_first_chunk",
                                                          reason: .invalidValue(expected: "true or false", got: "1"))),
        ("train: 3\n", ConfigError(location: "test.yaml:1", key: "train", reason: .sectionNotMapping)),
        ("data:\n  calibration_fraction: 0.7\n  validation_fraction: 0.7\n",
         ConfigError(location: "test.yaml", key: "data.validation_fraction", reason: .fractionsAboveOne(0.7 + 0.7))),
        ("- a\n", ConfigError(location: "test.yaml", key: "", reason: .topLevelNotMapping)),
        ("train:\n  lr: !!python/object:os.system 1e-4\n", ConfigError(location: "test.yaml:2", key: "train.lr",
                                                                      reason: .unsupportedTag("tag:yaml.org,2002:python/object:os.system"))),
        ("router:\n  experts: [fp16, !x int2]\n", ConfigError(location: "test.yaml:2", key: "router.experts", reason: .unsupportedTag("!x"))),
        ("router:\n  experts: [fp16, fp16]\n", ConfigError(location: "test.yaml", key: "router.experts", reason: .invalidExpertList)),
        ("train:\n  max_steps: 4294967296\n", ConfigError(location: "test.yaml:2", key: "train.max_steps",
                                                        reason: .invalidValue(expected: "null or an integer in 0...2147483647", got: "4294967296"))),
    ])
    func rejectsWithKeyAndLine(yaml: String, expected: ConfigError) throws {
        #expect(throws: expected) { try load(yaml) }
    }

    /// Nested aliases that expand exponentially (2^40 nodes here) inside a known key, in a file or through --set,
    /// are refused at once as the wrong kind of value: no config value nests, so nothing walks the expansion.
    @Test func anAliasBombIsRefusedAtOnce() throws {
        var levels = ["&a0 [0.9, 0.999]"]
        for level in 1..<40 { levels.append("&a\(level) [*a\(level - 1), *a\(level - 1)]") }
        let bomb = "[" + levels.joined(separator: ", ") + "]"
        let expected = ConfigError(location: "test.yaml:2", key: "train.betas",
                                   reason: .invalidValue(expected: "two numbers in [0.0, 1.0)", got: "a list"))
        #expect(throws: expected) { try load("train:\n  betas: \(bomb)\n") }
        #expect(throws: ConfigError.self) { try TrainingConfig.load(yaml: "", source: "test.yaml", overrides: ["train.betas=\(bomb)"]) }
    }

    /// YAML syntax errors carry the parser's message, joined onto one line.
    @Test(arguments: [
        ("seed: 1\nseed: 2\n", "Parser: expected all keys to be unique but found the following duplicated key(s): 'seed'"),
        ("train: [\n", ""),
    ])
    func rejectsInvalidYAMLOnOneLine(yaml: String, parserMessage: String) throws {
        let error = try #require(throws: ConfigError.self) { try load(yaml) }
        #expect(error.location == "test.yaml" && error.key.isEmpty)
        guard case let .invalidYAML(message) = error.reason else { Issue.record("\(error)"); return }
        #expect(message.hasPrefix(parserMessage) && !message.isEmpty, "\(message)")
        #expect(!error.description.contains("\n"))
    }

    @Test func rejectsBadOverrides() throws {
        #expect(throws: ConfigError(location: "--set", key: "train.lrr", reason: .unknownKey(suggestion: "train.lr"))) { try load("", overrides: ["train.lrr=1"]) }
        #expect(throws: ConfigError(location: "--set", key: "train.lr", reason: .malformedOverride)) { try load("", overrides: ["train.lr"]) }
        #expect(throws: ConfigError(location: "--set", key: "train.lr", reason: .invalidValue(expected: "a number in (0.0, 1000.0]", got: "-1"))) {
            try load("", overrides: ["train.lr=-1"])
        }
        #expect(throws: ConfigError(location: "test.yaml with --set", key: "data.validation_fraction", reason: .fractionsAboveOne(0.9 + 0.2))) {
            try load("", overrides: ["data.calibration_fraction=0.9", "data.validation_fraction=0.2"])
        }
    }

    /// The message is one line that names the file and line (or --set), the key, and what was expected.
    @Test func messagesNameTheFileTheKeyAndTheExpectation() {
        #expect(ConfigError(location: "test.yaml:2", key: "train.lrr", reason: .unknownKey(suggestion: "train.lr")).description
                == "test.yaml:2: train.lrr: unknown key (did you mean train.lr?)")
        #expect(ConfigError(location: "--set", key: "train.lr", reason: .invalidValue(expected: "a number in (0.0, 1000.0]", got: "-1")).description
                == "--set: train.lr: expected a number in (0.0, 1000.0], got -1")
        #expect(ConfigError(location: "test.yaml", key: "", reason: .topLevelNotMapping).description
                == "test.yaml: expected a mapping of keys at the top level")
        let unknown = ConfigError(location: "--set", key: "zzz", reason: .unknownKey(suggestion: nil)).description
        #expect(unknown.hasPrefix("--set: zzz: unknown key (known keys: store, run_dir, seed, ") && unknown.hasSuffix(")"))
    }

    @Test func checksAgainstTheStore() throws {
        let directory = makeTemporaryDirectory()
        try makeSmallStore(at: directory, sequences: 6)
        let store = try CalibrationStore(path: directory)
        let oneChunk = makeTemporaryDirectory()   // one chunk per sequence: only the frozen one
        try makeSmallStore(at: oneChunk, chunkSize: 96)
        func routedStore(_ overrides: [String]) throws {
            let config = try TrainingConfig.load(yaml: "", source: "c.yaml", overrides: overrides)
            _ = try RoutedStore(store: store, config: config, source: "c.yaml")
        }
        #expect(throws: ConfigError(location: "c.yaml", key: "router.experts",
                                    reason: .expertNotInStore(expert: "int8", store: store.path, available: ["fp16", "int4", "int2"]))) {
            try routedStore(["router.experts=[fp16, int8]"])
        }
        #expect(throws: ConfigError(location: "c.yaml", key: "router.chunk_size", reason: .chunkSizeMismatch(configured: 16, store: store.path, stored: 32))) {
            try routedStore(["router.chunk_size=16"])
        }
        #expect(throws: ConfigError(location: "c.yaml", key: "data.calibration_fraction",
                                    reason: .fractionsExceedStore(requested: 0.5 + 0.1, available: 0.5, store: store.path))) {
            try routedStore(["data.calibration_fraction=0.5", "data.validation_fraction=0.1"])
        }
        #expect(throws: ConfigError(location: "c.yaml", key: "router.freeze_first_chunk", reason: .nothingToRoute(tokens: 96, chunks: 1, chunkSize: 96))) {
            try RoutedStore(store: CalibrationStore(path: oneChunk), config: TrainingConfig.load(yaml: "", source: "c.yaml", overrides: ["router.chunk_size=96"]),
                            source: "c.yaml")
        }
        try routedStore(["data.calibration_fraction=0.3", "data.validation_fraction=0.2"])
    }
}

