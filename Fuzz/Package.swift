// swift-tools-version:6.0
// libFuzzer targets for every parser of untrusted files. Build and run them with the Makefile
// (`make fuzz-safetensors`, …, `make fuzz`): they need `-sanitize=fuzzer,address -DFUZZING`.
import PackageDescription

let parsers = ["safetensors", "manifest", "config", "checkpoint", "export"]

let package = Package(
    name: "moqae-fuzz",
    dependencies: [.package(name: "moqae", path: "..")],
    targets: [.target(name: "FuzzDriver")] + parsers.map { parser in
        .executableTarget(
            name: "fuzz-\(parser)",
            dependencies: ["FuzzDriver", .product(name: "MoQAEStore", package: "moqae"), .product(name: "MoQAETraining", package: "moqae")],
            path: "Sources/\(parser)"
        )
    }
)
