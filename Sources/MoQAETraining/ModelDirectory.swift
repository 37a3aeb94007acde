import MoQAEStore

/// A Hugging Face model directory that routers travel with: `export --into DIR` writes `DIR/moqae-router.bin`,
/// which `MoQAECache.from_pretrained(DIR)` finds. Its `config.json` (the text model's part, `text_config`, where
/// there is one) gives the shape the routers must fit.
public struct ModelDirectory: Equatable, Sendable {
    /// The export's file name inside a model directory.
    public static let routerFileName = "moqae-router.bin"

    public let path: String
    public let layers: Int
    public let kvHeads: Int
    public let headDim: Int

    public var routerPath: String { Self.joined(path, Self.routerFileName) }

    private static func joined(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// Reads `path/config.json`.
    public init(path: String) throws(ModelDirectoryError) {
        self.path = path
        let configPath = Self.joined(path, "config.json")
        guard isDirectory(path) else { throw ModelDirectoryError(path: path, reason: "not a directory (expected a model directory)") }
        guard isRegularFile(configPath) else {
            throw ModelDirectoryError(path: configPath, reason: "missing (expected a Hugging Face model directory)")
        }
        let config: JSON
        do {
            config = try JSON.parse(readFileBytes(configPath, limit: FileSizeLimit.config))
        } catch {
            throw ModelDirectoryError(path: configPath, reason: "\(error)")
        }
        let text = config["text_config"] ?? config
        func field(_ name: String) -> Int? { text[name]?.intValue.flatMap { $0 > 0 ? $0 : nil } }
        guard let layers = field("num_hidden_layers"), let heads = field("num_attention_heads") else {
            throw ModelDirectoryError(path: configPath, reason: "expected positive num_hidden_layers and num_attention_heads")
        }
        guard let headDim = field("head_dim") ?? field("hidden_size").map({ $0 / heads }), headDim > 0 else {
            throw ModelDirectoryError(path: configPath, reason: "expected a positive head_dim or hidden_size")
        }
        self.layers = layers
        self.kvHeads = field("num_key_value_heads") ?? heads
        self.headDim = headDim
    }

    /// Throws unless routers of `setup` are for this model's layers, KV heads and head dimension.
    public func check(_ setup: RouterSetup) throws(ModelDirectoryError) {
        let routers = (setup.layout.layers, setup.layout.heads, setup.headDim)
        guard routers == (layers, kvHeads, headDim) else {
            throw ModelDirectoryError(path: path, reason: "the routers are for \(routers.0) layers × \(routers.1) KV heads × head dim "
                                      + "\(routers.2), the model has \(layers) × \(kvHeads) × \(headDim)")
        }
    }
}

public struct ModelDirectoryError: Error, CustomStringConvertible, Equatable {
    public let path: String
    public let reason: String
    public var description: String { "\(path): \(reason)" }
}
