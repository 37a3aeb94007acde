import FuzzDriver
import Glibc
import MoQAETraining

// The YAML config loader on arbitrary bytes (those that are not UTF-8 are rejected before parsing,
// as `TrainingConfig.load(file:)` does).
var argumentCount = CommandLine.argc
var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
let status = LLVMFuzzerRunDriver(&argumentCount, &arguments) { data, size in
    guard let data else { return 0 }
    if let text = String(validating: UnsafeBufferPointer(start: data, count: size), as: UTF8.self) {
        _ = try? TrainingConfig.load(yaml: text, source: "fuzz.yaml")
    }
    return 0
}
exit(status)
