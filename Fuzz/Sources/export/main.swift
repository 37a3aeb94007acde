import FuzzDriver
import Glibc
import MoQAETraining

// The router export reader on arbitrary bytes; fuzzing builds skip its CRC.
var argumentCount = CommandLine.argc
var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
let status = LLVMFuzzerRunDriver(&argumentCount, &arguments) { data, size in
    guard let data else { return 0 }
    _ = try? RouterExport.parse(Array(UnsafeBufferPointer(start: data, count: size)), path: "fuzz.bin")
    return 0
}
exit(status)
