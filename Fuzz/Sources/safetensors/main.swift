import FuzzDriver
import Glibc
import MoQAEStore

// The safetensors header parser on arbitrary bytes, taken as a whole file.
var argumentCount = CommandLine.argc
var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
let status = LLVMFuzzerRunDriver(&argumentCount, &arguments) { data, size in
    guard let data else { return 0 }
    _ = try? SafeTensorsHeader(file: UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
exit(status)
