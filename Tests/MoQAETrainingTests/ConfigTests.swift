import Foundation
import MoQAERouter
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

@Suite struct ConfigTests {
    func error(_ yaml: String, overrides: [String] = []) -> String? {
        do { _ = try TrainingConfig.load(yaml: yaml, source: "test.yaml", overrides: overrides); return nil } catch { return "\(error)" }
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
        ("train:\n  lrr: 1\n", "test.yaml:2: train.lrr: unknown key"),
        ("loss:\n  lambda: 1.5\n", "test.yaml:2: loss.lambda: expected a number in [0.0, 1.0], got 1.5"),
        ("train:\n  batch_size: 0\n", "test.yaml:2: train.batch_size: expected an integer in 1...1000000, got 0"),
        ("train:\n  batch_size: \"8\"\n", "test.yaml:2: train.batch_size: expected an integer in 1...1000000, got the string \"8\""),
        ("router:\n  freeze_first_chunk: 1\n", "test.yaml:2: router.freeze_first_chunk: expected true or false, got 1"),
        ("train: 3\n", "test.yaml:1: train: expected a mapping of keys"),
        ("seed: 1\nseed: 2\n", "test.yaml: not valid YAML: Parser: expected all keys to be unique but found the following duplicated key(s): 'seed'"),
        ("data:\n  calibration_fraction: 0.7\n  validation_fraction: 0.7\n", "data.validation_fraction: calibration_fraction + validation_fraction must be at most 1"),
        ("- a\n", "expected a mapping of keys at the top level"),
        ("train: [\n", "not valid YAML"),
        ("train:\n  lr: !!python/object:os.system 1e-4\n", "test.yaml:2: train.lr: YAML tag tag:yaml.org,2002:python/object:os.system is not supported"),
        ("router:\n  experts: [fp16, !x int2]\n", "test.yaml:2: router.experts: YAML tag !x is not supported"),
        ("train:\n  max_steps: 4294967296\n", "test.yaml:2: train.max_steps: expected null or an integer in 0...2147483647"),
    ])
    func rejectsWithKeyAndLine(yaml: String, expected: String) throws {
        let message = try #require(error(yaml))
        #expect(message.contains(expected), "\(message)")
        #expect(!message.contains("\n"))
    }

    @Test func rejectsBadOverrides() throws {
        #expect(try #require(error("", overrides: ["train.lrr=1"])).contains("--set: train.lrr: unknown key (did you mean train.lr?)"))
        #expect(try #require(error("", overrides: ["train.lr"])).contains("expected KEY=VALUE"))
        #expect(try #require(error("", overrides: ["train.lr=-1"])).contains("--set: train.lr: expected a number in (0.0, 1000.0], got -1"))
    }

    @Test func checksAgainstTheStore() throws {
        let directory = makeTemporaryDirectory()
        try makeSmallStore(at: directory, sequences: 6)
        let store = try CalibrationStore(path: directory)
        func storeError(_ overrides: [String]) -> String? {
            do {
                let config = try TrainingConfig.load(yaml: "", source: "c.yaml", overrides: overrides)
                _ = try RoutedStore(store: store, config: config, source: "c.yaml")
                return nil
            } catch { return "\(error)" }
        }
        #expect(storeError(["router.experts=[fp16, int8]"])?.contains("c.yaml: router.experts: expert \"int8\" is not in the store") == true)
        #expect(storeError(["router.chunk_size=16"])?.contains("router.chunk_size: is 16 but the store") == true)
        #expect(storeError(["data.calibration_fraction=0.5", "data.validation_fraction=0.1"])?.contains("exceeds the fraction 0.5 the store") == true)
        #expect(storeError(["data.calibration_fraction=0.3", "data.validation_fraction=0.2"]) == nil)
    }
}

