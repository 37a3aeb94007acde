import Foundation
import MoQAEStore
import MoQAETestSupport
import MoQAETraining
import Testing

/// Runs the built `moqae-train` the way users do, on bad inputs and on the run lifecycle.
@Suite struct CommandLineTests {
    let workspace = makeTemporaryDirectory("cli")
    var store: String { workspace + "/store" }

    init() throws {
        try makeSmallStore(at: workspace + "/store", sequences: 16)
        try """
        store: store
        run_dir: run
        data: {calibration_fraction: 0.3, validation_fraction: 0.2}
        train: {batch_size: 4, epochs: 100000, eval_every: 0}
        checkpoint: {every_steps: 4, keep_last: 2}
        """.write(toFile: workspace + "/config.yaml", atomically: true, encoding: .utf8)
    }

    func run(_ arguments: [String], deadline: Double = 300, signal: Int32 = SIGINT,
             interruptWhen: (() -> Bool)? = nil) throws -> ProcessResult {
        try runProcess(moqaeTrainExecutable, arguments, in: workspace, interruptWhen: interruptWhen, signal: signal, deadline: deadline)
    }

    /// Lines of a run's log (metrics.jsonl or eval.jsonl); 0 when it does not exist.
    func logLines(_ name: String) -> [Substring] {
        ((try? String(contentsOfFile: workspace + "/run/" + name, encoding: .utf8)) ?? "").split(separator: "\n")
    }

    /// A failure must be one `error:` line naming `mentions`, exit status 1, no crash, and no run directory.
    func expectCleanFailure(_ result: ProcessResult, mentions: [String], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(!result.crashed, "crashed: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.status == 1, "status \(result.status): \(result.stderr)", sourceLocation: sourceLocation)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].hasPrefix("error: "), "stderr: \(result.stderr)", sourceLocation: sourceLocation)
        for text in mentions { #expect(result.stderr.contains(text), "\(result.stderr) should name \(text)", sourceLocation: sourceLocation) }
    }

    func damageShard(_ transform: (inout [UInt8]) -> Void) throws {
        let path = store + "/shard-00000.safetensors"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        transform(&bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    @Test func truncatedShard() throws {
        try damageShard { $0.removeLast(7) }
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["store/shard-00000.safetensors", "header implies"])
        #expect(!fileExists(workspace + "/run"))
        expectCleanFailure(try run(["inspect", "store"]), mentions: ["shard-00000.safetensors"])
    }

    @Test func flippedHeaderByte() throws {
        try damageShard { $0[12] ^= 0x80 }
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["store/shard-00000.safetensors", "header"])
    }

    @Test func wrongDTypeAndOutOfBoundsOffsets() throws {
        let path = store + "/shard-00000.safetensors"
        let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let header = try original.withUnsafeBytes { try SafeTensorsHeader(file: $0) }
        /// Rewrites header text without changing its length.
        func headerEdit(_ from: String, _ to: String) throws {
            var bytes = original
            let text = String(decoding: bytes[8..<header.dataOffset], as: UTF8.self)
            let edited = Array(text.replacingOccurrences(of: from, with: to).utf8)
            try #require(edited.count == text.utf8.count && edited != Array(text.utf8), "edit \(from) -> \(to)")
            bytes.replaceSubrange(8..<header.dataOffset, with: edited)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        let id = try CalibrationStore(path: store).sequences[0].id
        try headerEdit(#""seq.\#(id).nll":{"dtype":"F32""#, #""seq.\#(id).nll":{"dtype":"I32""#)
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["shard-00000.safetensors", "seq.\(id).nll", "dtype I32"])
        let end = header.tensors.map(\.dataRange.upperBound).max()!
        let beyond = String(repeating: "9", count: String(end).count)
        try headerEdit(",\(end)]", ",\(beyond)]")
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["shard-00000.safetensors"])
    }

    @Test func nanInDeltaNLL() throws {
        var sequences = try makeSmallStore(at: store, sequences: 16)
        sequences[0].deltaNLL[5] = .nan
        let manifest = try Manifest.parse([UInt8](try Data(contentsOf: URL(fileURLWithPath: store + "/manifest.json"))))
        try StoreWriter.write(sequences, manifest: manifest, sequencesPerShard: 4, to: store)
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["seq.\(sequences[0].id).delta_nll", "not finite"])
    }

    @Test func configTypos() throws {
        expectCleanFailure(try run(["--config", "config.yaml", "--set", "trian.lr=1"]), mentions: ["trian.lr", "unknown key"])
        try "train:\n  batch_sise: 4\n".write(toFile: workspace + "/typo.yaml", atomically: true, encoding: .utf8)
        expectCleanFailure(try run(["--config", "typo.yaml"]), mentions: ["typo.yaml:2", "train.batch_sise", "did you mean train.batch_size?"])
        expectCleanFailure(try run(["--config", "missing.yaml"]), mentions: ["missing.yaml", "cannot read"])
        expectCleanFailure(try run(["--config", "config.yaml", "--set", "router.experts=[fp16, int3]"]), mentions: ["router.experts", "int3"])
        #expect(!fileExists(workspace + "/run"))
    }

    @Test func lifecycle() throws {
        // --max-steps 0: only the initial checkpoint.
        let initial = try run(["--config", "config.yaml", "--max-steps", "0"])
        #expect(initial.status == 0, "\(initial.stderr)")
        #expect(CheckpointDirectory(path: workspace + "/run").candidates().map(\.step) == [0])
        #expect(!fileExists(workspace + "/run/metrics.jsonl"))

        // Ctrl-C: the step finishes, a checkpoint is written, exit 130.
        let interrupted = try run(["--config", "config.yaml", "--resume", "latest"]) {
            ((try? String(contentsOfFile: self.workspace + "/run/metrics.jsonl", encoding: .utf8))?.count ?? 0) > 0
        }
        #expect(interrupted.status == 130, "\(interrupted.stderr)")
        let stopped = try #require(CheckpointDirectory(path: workspace + "/run").latest())
        #expect(stopped.checkpoint.step >= 1)
        let lines = try String(contentsOfFile: workspace + "/run/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == stopped.checkpoint.step)
        for field in ["step", "epoch", "sequence_ids", "loss", "l_model", "l_mem", "mean_l_nll", "avg_bits", "expert_fractions", "lr", "grad_norm", "vectors_per_second"] {
            #expect(try JSON.parse(String(lines[0]))[field] != nil, "metrics line lacks \(field)")
        }

        // A damaged checkpoint is refused by path and skipped by 'latest'.
        let newest = stopped.path
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: newest)))
        bytes[bytes.count - 5] ^= 0x01   // a weight moment, inside the data section
        try Data(bytes).write(to: URL(fileURLWithPath: newest))
        expectCleanFailure(try run(["--config", "config.yaml", "--resume", newest]), mentions: [newest, "checksum mismatch"])
        expectCleanFailure(try run(["inspect", newest]), mentions: [newest])
        let resumed = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "\(stopped.checkpoint.step + 2)"])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(resumed.stderr.contains("skipped damaged checkpoint run/\(URL(fileURLWithPath: newest).lastPathComponent): checksum mismatch"))
        #expect(resumed.stdout.contains("validation:") && resumed.stdout.contains("static (same bits)") && resumed.stdout.contains("prescient (same bits)"))

        // Export, inspect, eval.
        let exported = try run(["export", "run", "--out", "router.bin"])
        #expect(exported.status == 0, "\(exported.stderr)")
        #expect(try run(["inspect", "router.bin"]).stdout.contains("OK (CRC-32 verified)"))
        #expect(try run(["inspect", "store"]).stdout.contains("every tensor verified"))
        let evalExport = try run(["eval", "router.bin", "--config", "config.yaml"])
        let evalCheckpoint = try run(["eval", "run"])
        #expect(evalExport.status == 0 && evalCheckpoint.status == 0, "\(evalExport.stderr) \(evalCheckpoint.stderr)")
        #expect(evalCheckpoint.stdout.contains("router ") && evalExport.stdout.contains("uniform int2"))
        // The JSON report names the static plan and labels the prescient row as a diagnostic.
        let evalJSON = try JSON.parse(try run(["eval", "run", "--json"]).stdout)
        #expect(evalJSON["static"]?["name"] == .string("static (same bits)"))
        #expect(evalJSON["prescient"]?["name"] == .string("prescient (same bits)"))
        #expect(evalJSON["prescient_note"] == .string(ValidationReport.prescientNote))
        #expect(evalJSON["router_vs_static"]?["ci95_half_width"] != nil)
        var export = [UInt8](try Data(contentsOf: URL(fileURLWithPath: workspace + "/router.bin")))
        export[40] ^= 0x04
        try Data(export).write(to: URL(fileURLWithPath: workspace + "/router.bin"))
        expectCleanFailure(try run(["inspect", "router.bin"]), mentions: ["router.bin", "CRC-32 mismatch"])
        expectCleanFailure(try run(["eval", "router.bin", "--config", "config.yaml"]), mentions: ["router.bin", "CRC-32 mismatch"])
    }

    /// A FIFO (or a directory) wherever a file is read is refused at once, without waiting for a writer.
    @Test func exportIntoAModelDirectoryChecksItsShape() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        func model(_ name: String, _ config: String) throws -> String {
            try FileManager.default.createDirectory(atPath: workspace + "/" + name, withIntermediateDirectories: true)
            try config.write(toFile: workspace + "/\(name)/config.json", atomically: true, encoding: .utf8)
            return name
        }
        // The small store: 4 layers × 2 KV heads × head dim 8 (hidden 32 over 4 heads; a multimodal config's text part).
        let fits = try model("fits", #"{"text_config": {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32}}"#)
        let exported = try run(["export", "run", "--into", fits])
        #expect(exported.status == 0 && exported.stdout.contains("wrote fits/moqae-router.bin"), "\(exported.stderr)")
        #expect(try run(["inspect", "fits/moqae-router.bin"]).stdout.contains("OK (CRC-32 verified)"))
        let other = try model("other", #"{"num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 16}"#)
        expectCleanFailure(try run(["export", "run", "--into", other]),
                           mentions: ["other: the routers are for 4 layers × 2 KV heads × head dim 8, the model has 4 × 2 × 16"])
        expectCleanFailure(try run(["export", "run", "--into", "nowhere"]), mentions: ["nowhere: not a directory"])
        let broken = try model("broken", "{")
        expectCleanFailure(try run(["export", "run", "--into", broken]), mentions: ["broken/config.json: invalid JSON"])
        #expect(!fileExists(workspace + "/other/moqae-router.bin") && !fileExists(workspace + "/broken/moqae-router.bin"))
        let both = try run(["export", "run", "--into", fits, "--out", "x.bin"])
        #expect(both.status == 64 && both.stderr.contains("--out and --into"))
    }

    @Test func versionAndCompletionComeFromTheParser() throws {
        let version = try run(["--version"])
        #expect(version.status == 0 && version.stdout == "0.1.0\n", "\(version.stdout)")
        let completion = try run(["--generate-completion-script", "bash"])
        #expect(completion.status == 0 && completion.stdout.contains("moqae-train") && completion.stdout.contains("export"))
    }

    @Test func nonRegularFilesAreRefusedWithoutBlocking() throws {
        func fifo(_ name: String) throws {
            unlink(workspace + "/" + name)
            try #require(mkfifo(workspace + "/" + name, 0o644) == 0)
        }
        func expectRefused(_ arguments: [String], _ mentions: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
            let result = try run(arguments, deadline: 60)
            #expect(!result.timedOut, "\(arguments) blocked", sourceLocation: sourceLocation)
            expectCleanFailure(result, mentions: mentions, sourceLocation: sourceLocation)
        }
        try fifo("fifo.yaml")
        try expectRefused(["--config", "fifo.yaml"], ["fifo.yaml", "is a FIFO, expected a regular file"])
        try fifo("router.bin")
        try expectRefused(["eval", "router.bin", "--config", "config.yaml"], ["router.bin", "is a FIFO"])
        try expectRefused(["inspect", "router.bin"], ["router.bin", "is a FIFO"])
        try expectRefused(["export", "router.bin"], ["router.bin", "is a FIFO"])
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        try fifo("run/ckpt-000000009.safetensors")                   // newer than the real step-0 checkpoint
        try expectRefused(["--config", "config.yaml", "--resume", "latest"],
                          ["run/ckpt-000000009.safetensors: not a regular file, where moqae-train writes its checkpoint"])
        try expectRefused(["inspect", "run/ckpt-000000009.safetensors"], ["is a FIFO"])
        let evaluated = try run(["eval", "run"], deadline: 60)
        #expect(!evaluated.timedOut && evaluated.status == 0, "\(evaluated.stderr)")
        #expect(evaluated.stderr.contains("skipped damaged checkpoint run/ckpt-000000009.safetensors: cannot read: run/ckpt-000000009.safetensors: is a FIFO"))
        try FileManager.default.removeItem(atPath: store + "/manifest.json")
        try fifo("store/manifest.json")
        try expectRefused(["inspect", "store"], ["store/manifest.json", "is a FIFO"])
    }

    /// Files read whole have caps that follow from their format, checked before anything is read.
    @Test func oversizedFilesAreRefusedBeforeReading() throws {
        for (name, size) in [("huge.yaml", FileSizeLimit.config + 1), ("store/manifest.json", FileSizeLimit.manifest + 1)] {
            let fd = open(workspace + "/" + name, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            try #require(fd >= 0 && ftruncate(fd, off_t(size)) == 0)   // sparse: no disk used
            close(fd)
        }
        expectCleanFailure(try run(["--config", "huge.yaml"]), mentions: ["huge.yaml", "more than the \(FileSizeLimit.config)"])
        expectCleanFailure(try run(["inspect", "store"]), mentions: ["store/manifest.json", "more than the \(FileSizeLimit.manifest)"])
    }

    @Test func messagesNameWhatIsWrong() throws {
        try "plain text, not a tensor file".write(toFile: workspace + "/notes.txt", atomically: true, encoding: .utf8)
        expectCleanFailure(try run(["inspect", "notes.txt"]), mentions: ["notes.txt", "not a safetensors file"])
        expectCleanFailure(try run(["eval", "notes.txt"]), mentions: ["notes.txt", "not a safetensors file"])
        expectCleanFailure(try run(["--config", "config.yaml", "--set", "store=nowhere"]), mentions: ["nowhere", "no such store directory"])
        expectCleanFailure(try run(["--config", "config.yaml", "--set", "store=config.yaml"]), mentions: ["config.yaml", "is a file, expected a store directory"])
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        let export = try run(["export", "run", "--out", "missing/router.bin"])
        expectCleanFailure(export, mentions: ["missing/router.bin: create failed"])
        #expect(!export.stderr.contains(".tmp-"), "names the temporary file: \(export.stderr)")
    }

    /// Files named like checkpoints that do not verify never cost a valid one: resuming with `keep_last: 1` beside
    /// a junk `ckpt-000000900` and 200 more keeps the newest checkpoint that verifies (export still finds it), leaves
    /// the junk in place, and says so in one line each time, not a line per file.
    @Test func junkCheckpointsNeverCostAValidOne() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "8"]).status == 0)
        try "junk".write(toFile: workspace + "/run/ckpt-000000900.safetensors", atomically: true, encoding: .utf8)
        for step in 1000..<1200 {
            try "junk".write(toFile: workspace + "/run/" + Checkpoint.fileName(step: step), atomically: true, encoding: .utf8)
        }
        let resumed = try run(["--config", "config.yaml", "--set", "checkpoint.keep_last=1", "--resume", "latest", "--max-steps", "12"])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        let lines = resumed.stderr.split(separator: "\n").filter { $0.contains("skipped") }
        #expect(!lines.isEmpty && lines.count <= 4, "\(lines.count) lines about skipped files")
        #expect(lines.allSatisfy { $0.contains("skipped 201 damaged checkpoints, newest first") && $0.contains("and 198 more") })
        let verified = CheckpointDirectory(path: workspace + "/run").candidates().compactMap { try? Checkpoint.load(path: $0.path) }
        #expect(verified.map(\.step) == [12], "the newest that verifies, and only it")
        #expect(FileManager.default.fileExists(atPath: workspace + "/run/ckpt-000000900.safetensors"))
        #expect(try run(["export", "run", "--out", "router.bin"]).status == 0)
    }

    /// Resuming reads and cuts only the log's tail: the lines a crash left after the checkpoint (and a partial one)
    /// go, every earlier byte stays; a tail of more than 64 MiB with no earlier step is refused in one line.
    @Test func resumingCutsOnlyTheLogsTail() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "8"]).status == 0)
        let metrics = workspace + "/run/metrics.jsonl"
        let logged = try Data(contentsOf: URL(fileURLWithPath: metrics))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: metrics))
        handle.seekToEndOfFile()
        handle.write(Data("{\"step\":9,\"loss\":1}\n{\"step\":10,\"lo".utf8))   // what a crash after step 8's checkpoint leaves
        handle.closeFile()
        #expect(try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "8"]).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: metrics)) == logged)

        let garbage = Data(repeating: UInt8(ascii: "x"), count: 65 << 20)
        try (logged + garbage).write(to: URL(fileURLWithPath: metrics))
        let refused = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "9"])
        #expect(refused.status == 1 && refused.stderr.split(separator: "\n").last
                    == "error: run/metrics.jsonl: no line of an earlier step in its last 64 MiB; not this run's log?", "\(refused.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: metrics)).count == logged.count + garbage.count, "the log is left as it was")
    }

    /// `export --out` replaces an export, never a checkpoint of the run, another file, a FIFO or a link; each refusal
    /// is one line and leaves the file as it was.
    @Test func exportReplacesOnlyAnExport() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        let checkpoint = try #require(CheckpointDirectory(path: workspace + "/run").candidates().first).path
        let before = try Data(contentsOf: URL(fileURLWithPath: checkpoint))
        expectCleanFailure(try run(["export", "run", "--out", checkpoint]), mentions: [checkpoint, "is not an MQAE export"])
        #expect(try Data(contentsOf: URL(fileURLWithPath: checkpoint)) == before)
        try "mine".write(toFile: workspace + "/notes.txt", atomically: true, encoding: .utf8)
        expectCleanFailure(try run(["export", "run", "--out", "notes.txt"]), mentions: ["notes.txt", "is not an MQAE export"])
        #expect(try String(contentsOfFile: workspace + "/notes.txt", encoding: .utf8) == "mine")
        #expect(mkfifo(workspace + "/fifo", 0o600) == 0)
        expectCleanFailure(try run(["export", "run", "--out", "fifo"]), mentions: ["fifo", "is a FIFO, expected a regular file or a new name"])
        #expect(try run(["export", "run", "--out", "router.bin"]).status == 0)
        #expect(try run(["export", "run", "--out", "router.bin"]).status == 0, "an export is replaced")
        #expect(symlink("router.bin", workspace + "/link") == 0)   // an export behind a link: the rename would replace the link
        expectCleanFailure(try run(["export", "run", "--out", "link"]), mentions: ["link", "is a symbolic link"])
    }

    /// Usage errors are one line with status 64; data and config errors one line with status 1.
    @Test func usageErrorsAreOneLine() throws {
        for arguments in [["--bogus"], ["--max-steps", "-1"], ["--max-steps=-1"], ["export", "run", "--dtype", "f64"],
                          ["synth", "--sequences", "0", "--out", "synthetic"], ["export"], ["eval"]] {
            let result = try run(arguments)
            #expect(!result.crashed && result.status == 64, "\(arguments): status \(result.status)")
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].hasPrefix("error: ") && lines[0].hasSuffix("(moqae-train --help for usage)"),
                    "\(arguments): \(result.stderr)")
        }
        #expect(!fileExists(workspace + "/synthetic") && !fileExists(workspace + "/run"))
        // A negative count is that option's value, named as out of range (it read "Missing value" before).
        #expect(try run(["--max-steps", "-1"]).stderr.contains("--max-steps must be in 0...2147483647, got -1"))
        #expect(try run(["synth", "--sequences", "-1", "--out", "synthetic"]).stderr.contains("--sequences must be at least 1, got -1"))
        let help = try run(["train", "--help"])
        #expect(help.status == 0 && help.stdout.contains("USAGE: moqae-train train"))
    }

    /// Refusals come before any write: no run directory is created or changed.
    @Test func badRunsWriteNothing() throws {
        expectCleanFailure(try run(["--config", "config.yaml", "--set", "router.target_bits=1.0"]), mentions: ["router.target_bits", "outside"])
        #expect(!fileExists(workspace + "/run"))
        try "a file".write(toFile: workspace + "/run", atomically: true, encoding: .utf8)
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["run: run_dir is a file"])
        try FileManager.default.removeItem(atPath: workspace + "/run")
        try FileManager.default.createDirectory(atPath: workspace + "/run/ckpt-000000004.safetensors", withIntermediateDirectories: true)
        expectCleanFailure(try run(["--config", "config.yaml"]), mentions: ["run/ckpt-000000004.safetensors: not a regular file"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: workspace + "/run") == ["ckpt-000000004.safetensors"])
    }

    /// A run killed before its first periodic checkpoint resumes from step 0; an empty run directory
    /// (a first checkpoint that failed to write) is started by --resume latest.
    @Test func aRunKilledBeforeItsFirstCheckpointResumes() throws {
        let killed = try run(["--config", "config.yaml", "--set", "checkpoint.every_steps=1000"], signal: SIGKILL) {
            !self.logLines("metrics.jsonl").isEmpty
        }
        #expect(killed.crashed)
        #expect(CheckpointDirectory(path: workspace + "/run").candidates().map(\.step) == [0])
        let resumed = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "3"])
        #expect(resumed.status == 0 && resumed.stderr.contains("resuming from run/ckpt-000000000.safetensors (step 0)"), "\(resumed.stderr)")
        #expect(logLines("metrics.jsonl").count == 3)

        try FileManager.default.removeItem(atPath: workspace + "/run")
        try FileManager.default.createDirectory(atPath: workspace + "/run", withIntermediateDirectories: true)
        let started = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "2"])
        #expect(started.status == 0 && started.stderr.contains("holds no checkpoint and no log yet: starting the run"), "\(started.stderr)")
    }

    /// A run stopped after its last step but before its final report writes the report when resumed.
    @Test func theFinalReportIsNeverLost() throws {
        let finished = try run(["--config", "config.yaml", "--max-steps", "4"])    // every_steps 4: checkpoint 4 in the loop
        #expect(finished.status == 0, "\(finished.stderr)")
        let reports = logLines("eval.jsonl")
        #expect(reports.count == 1 && reports[0].contains("\"step\":4"))
        try "".write(toFile: workspace + "/run/eval.jsonl", atomically: true, encoding: .utf8)   // as a kill before the report
        let resumed = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "4"])
        #expect(resumed.status == 0 && resumed.stderr.contains("final validation report is missing: writing it"), "\(resumed.stderr)")
        #expect(logLines("eval.jsonl") == reports)
        let again = try run(["--config", "config.yaml", "--resume", "latest", "--max-steps", "4"])
        #expect(again.stderr.contains("nothing to train") && logLines("eval.jsonl") == reports)
    }

    /// One trainer per run directory; --resume latest removes only the trainer's own temporary files.
    @Test func aSecondTrainerIsRefusedAndOthersFilesAreKept() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        let own = workspace + "/run/ckpt-000000008.safetensors.tmp-999999", users = workspace + "/run/notes.tmp-123"
        for path in [own, users] { try "x".write(toFile: path, atomically: false, encoding: .utf8) }
        var second: ProcessResult?
        let first = try run(["--config", "config.yaml", "--resume", "latest"]) {
            guard !self.logLines("metrics.jsonl").isEmpty else { return false }
            second = try? self.run(["--config", "config.yaml", "--resume", "latest"])
            return true
        }
        #expect(first.status == 130, "\(first.stderr)")
        let refused = try #require(second)
        expectCleanFailure(refused, mentions: ["run: another moqae-train (process", "is using this run directory"])
        #expect(!fileExists(own) && fileExists(users))
    }

    /// Non-finite router inputs are caught where they are first read, in training and in validation
    /// alike (and `inspect` reads every value): one line naming the tensor, never a silent report.
    @Test func nonFiniteInputsAreCaughtWhereverTheyAreRead() throws {
        #expect(try run(["--config", "config.yaml", "--max-steps", "0"]).status == 0)
        var sequences = try makeSmallStore(at: store, sequences: 16)
        let shape = try CalibrationStore(path: store).manifest
        for index in sequences.indices {   // layer 0, head 0, token 40 (chunk 1: routed), channel 0
            sequences[index].inputs[40 * shape.inputWidth] = .nan
        }
        let manifest = try Manifest.parse([UInt8](try Data(contentsOf: URL(fileURLWithPath: store + "/manifest.json"))))
        try StoreWriter.write(sequences, manifest: manifest, sequencesPerShard: 4, to: store)
        let reason = "a non-finite value in layer 0, head 0, tokens 32..<"
        for arguments in [["eval", "run"], ["--config", "config.yaml", "--resume", "latest"]] {
            let result = try run(arguments)
            #expect(!result.crashed && result.status == 1, "\(arguments): \(result.stderr)")
            #expect(result.stderr.split(separator: "\n").last.map { $0.hasPrefix("error: ") && $0.contains(reason) } == true, "\(result.stderr)")
        }
        expectCleanFailure(try run(["inspect", "store"]), mentions: [".inputs", "non-finite value nan at [0, 0, 40, 0]"])
    }

    /// A shard truncated while training runs is an error on the next block, not a SIGBUS.
    @Test func aShardTruncatedDuringTrainingIsAnError() throws {
        var truncated = false
        let result = try run(["--config", "config.yaml"], deadline: 120) {
            if !truncated, !self.logLines("metrics.jsonl").isEmpty {
                let handle = try! FileHandle(forWritingTo: URL(fileURLWithPath: self.store + "/shard-00000.safetensors"))
                try! handle.truncate(atOffset: 100)
                try! handle.close()
                truncated = true
            }
            return false   // the trainer stops by itself
        }
        #expect(truncated && !result.crashed && !result.timedOut && result.status == 1, "\(result.status): \(result.stderr)")
        // Checked before each block; a truncation that lands between a check and a read faults, and the
        // SIGBUS handler reports it in one line as well.
        let error = result.stderr.split(separator: "\n").filter { $0.hasPrefix("error: ") }
        #expect(error.count == 1 && (error[0].contains("shard-00000.safetensors: changed size while in use")
                                     || error[0].contains("store: a memory-mapped file shrank while in use")), "\(result.stderr)")
    }

    /// SIGTERM stops a run as Ctrl-C does: the step finishes, a checkpoint is written, exit 143.
    @Test func sigtermCheckpointsAndExits143() throws {
        let stopped = try run(["--config", "config.yaml"], signal: SIGTERM) { !self.logLines("metrics.jsonl").isEmpty }
        #expect(stopped.status == 143 && !stopped.crashed, "\(stopped.status): \(stopped.stderr)")
        let latest = try #require(CheckpointDirectory(path: workspace + "/run").latest())
        #expect(latest.checkpoint.step == logLines("metrics.jsonl").count && latest.checkpoint.step >= 1)
    }
}
