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

        /// OpenBLAS's CBLAS interface: the reference tape's matrix products go through `cblas_sgemm`.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        /// binary16 → binary32 with the CPU's conversion instructions (F16C) where present.
        .target(name: "CHalfPrecision"),

        /// The streaming pass's router forward and chunk backward, compiled per x86-64 level (AVX-512, AVX2, baseline).
        .target(name: "CRouterKernels"),

        // MARK: - Product data flow: store → router/loss/optimizer → training, checkpoint, export

        /// The KV bit-width configurations routers choose among, and their storage bits.
        .target(name: "MoQAEExperts"),

        /// Calibration store I/O: a distrustful safetensors reader/writer, the manifest, split selection.
        .target(name: "MoQAEStore", dependencies: ["CHalfPrecision", "MoQAEExperts"]),

        /// The router, its decisions, the losses, the streaming forward/backward pass over
        /// `CRouterKernels`.
        .target(name: "MoQAERouter", dependencies: ["CRouterKernels", "MoQAEExperts"]),

        /// Config, training loop and AdamW, evaluation, checkpoints and the router export.
        .target(
            name: "MoQAETraining",
            dependencies: ["MoQAEExperts", "MoQAEStore", "MoQAERouter", .product(name: "Yams", package: "Yams")]
        ),

        // MARK: - Reference the product is checked against (tests only)

        /// The hand-written reverse-mode autograd: a tape of forward/backward primitive pairs with
        /// OpenBLAS products, and the router and the losses built on it. Slow and plain; the streaming
        /// pass must agree with it (the training tests load whole sequences onto it: ReferenceGradient.swift).
        .target(name: "MoQAEReference", dependencies: ["COpenBLAS", "MoQAEExperts", "MoQAERouter"]),

        // MARK: - Command line

        .executableTarget(
            name: "moqae-train",
            dependencies: ["MoQAERouter", "MoQAEStore", "MoQAETraining", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // MARK: - Tests

        /// Small stores built in code, temporary directories, running the built binary.
        .target(name: "MoQAETestSupport", dependencies: ["MoQAEExperts", "MoQAEStore"], path: "Tests/MoQAETestSupport"),
        .testTarget(name: "MoQAEStoreTests", dependencies: ["MoQAEStore", "CHalfPrecision", "MoQAETestSupport"]),
        .testTarget(name: "MoQAERouterTests", dependencies: ["MoQAEExperts", "MoQAERouter", "CRouterKernels", "MoQAETestSupport"]),
        .testTarget(name: "MoQAEReferenceTests", dependencies: ["MoQAEExperts", "MoQAERouter", "MoQAEReference", "MoQAETestSupport"]),
        .testTarget(
            name: "MoQAETrainingTests",
            dependencies: ["MoQAEExperts", "MoQAEStore", "MoQAERouter", "MoQAETraining", "MoQAEReference", "MoQAETestSupport", "moqae-train"],
            exclude: ["Golden/make_golden.py"],
            resources: [.copy("Golden/store"), .copy("Golden/golden.safetensors"), .copy("Golden/router-init.bin"), .copy("Golden/router-h5-max.bin")]
        ),
    ]
)
