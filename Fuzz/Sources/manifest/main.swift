import FuzzDriver
import Glibc
import MoQAEStore

// The store manifest parser on arbitrary bytes.
var argumentCount = CommandLine.argc
var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
let status = LLVMFuzzerRunDriver(&argumentCount, &arguments) { data, size in
    guard let data else { return 0 }
    _ = try? Manifest.parse(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
exit(status)
