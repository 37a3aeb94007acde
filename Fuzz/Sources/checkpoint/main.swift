import FuzzDriver
import Glibc
import MoQAETraining

// The checkpoint loader on arbitrary bytes; fuzzing builds skip its checksum.
var argumentCount = CommandLine.argc
var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
let status = LLVMFuzzerRunDriver(&argumentCount, &arguments) { data, size in
    guard let data else { return 0 }
    _ = try? Checkpoint.parse(file: UnsafeRawBufferPointer(start: data, count: size), path: "fuzz.safetensors")
    return 0
}
exit(status)
