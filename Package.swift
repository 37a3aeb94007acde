// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "moqae",
    products: [
        .executable(name: "moqae-train", targets: ["moqae-train"]),
        .library(name: "MoQAETraining", targets: ["MoQAETraining"]),
        .library(name: "MoQAEStore", targets: ["MoQAEStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // MARK: - System libraries

        /// OpenBLAS's CBLAS interface: the autograd tape's matrix products go through `cblas_sgemm`.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        /// binary16 → binary32 with the CPU's conversion instructions (F16C) where present.
        .target(name: "CHalfPrecision"),

        /// The streaming pass's router forward and chunk backward, compiled per x86-64 level (AVX-512, AVX2, baseline).
        .target(name: "CRouterKernels"),

        // MARK: - Data flow: store → router/loss/optimizer → training, checkpoint, export

        /// Calibration store I/O: a distrustful safetensors reader/writer, the manifest, split selection.
        .target(name: "MoQAEStore", dependencies: ["CHalfPrecision"]),

        /// Reverse-mode autograd over router parameters, the router, the SPEC §4 loss and AdamW.
        .target(name: "MoQAERouter", dependencies: ["COpenBLAS", "CRouterKernels", "MoQAEStore"]),

        /// Config, training loop, evaluation, checkpoints and the router export.
        .target(
            name: "MoQAETraining",
            dependencies: ["MoQAEStore", "MoQAERouter", .product(name: "Yams", package: "Yams")]
        ),

        // MARK: - Command line

        .executableTarget(
            name: "moqae-train",
            dependencies: ["MoQAETraining", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // MARK: - Tests

        /// Small stores built in code, temporary directories, running the built binary.
        .target(name: "MoQAETestSupport", dependencies: ["MoQAEStore"], path: "Tests/MoQAETestSupport"),
        .testTarget(name: "MoQAEStoreTests", dependencies: ["MoQAEStore", "CHalfPrecision", "MoQAETestSupport"]),
        .testTarget(name: "MoQAERouterTests", dependencies: ["MoQAERouter", "CRouterKernels"]),
        .testTarget(
            name: "MoQAETrainingTests",
            dependencies: ["MoQAETraining", "MoQAETestSupport", "moqae-train"],
            exclude: ["Golden/make_golden.py"],
            resources: [.copy("Golden/store"), .copy("Golden/golden.safetensors"), .copy("Golden/router-init.bin"), .copy("Golden/router-h5-max.bin")]
        ),
    ]
)
