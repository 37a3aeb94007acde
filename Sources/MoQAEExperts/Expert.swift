/// A KV-cache bit-width configuration `(key_bits, value_bits)`; 16 means unquantized binary16.
public struct Expert: Equatable, Hashable, Sendable, CustomStringConvertible {
    public let name: String
    public let keyBits: Int
    public let valueBits: Int

    public init(name: String, keyBits: Int, valueBits: Int) {
        self.name = name
        self.keyBits = keyBits
        self.valueBits = valueBits
    }

    /// Bits 16 (unquantized) or 1...8 are valid.
    public static func isValidBits(_ bits: Int) -> Bool { bits == 16 || (1...8).contains(bits) }

    /// `B_e = (key_bits + value_bits) / 2`, the expert's bit-width in the loss.
    public var bitWidth: Double { Double(keyBits + valueBits) / 2 }

    /// Ties between experts go to more total bits.
    public var totalBits: Int { keyBits + valueBits }

    public var isUnquantized: Bool { keyBits == 16 && valueBits == 16 }

    /// Storage bits of one unit (N tokens × D channels of K and V), quantization constants included:
    /// a binary16 scale and minimum per key channel when keys are quantized, and per value group of
    /// each token when values are quantized.
    public func unitStorageBits(chunkSize: Int, headDim: Int, valueGroup: Int) -> Int {
        var bits = chunkSize * headDim * (keyBits + valueBits)
        if keyBits < 16 { bits += 32 * headDim }
        if valueBits < 16 { bits += 32 * chunkSize * headDim / valueGroup }
        return bits
    }

    public var description: String { "\(name) (k\(keyBits)v\(valueBits))" }
}
