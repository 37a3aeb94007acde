import CHalfPrecision

/// Vectorised conversions between binary32 and the 16-bit formats a store holds (binary16, bfloat16),
/// exact and the same on every CPU. Encoding and bfloat16 are branch-free integer code that the
/// compiler vectorises; binary16 decoding, on the training hot path, uses F16C instructions in C.
public enum HalfPrecision {
    /// `out[i] = Float(binary16 bits source[i])`, exactly (subnormals, infinities and NaNs included),
    /// with the CPU's F16C instructions where present.
    public static func decodeF16(_ source: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        moqae_decode_f16(source.assumingMemoryBound(to: UInt16.self), out, count)
    }

    /// `out[i] = Float(bfloat16 bits source[i])`: the bits are the upper half of a binary32.
    public static func decodeBF16(_ source: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        let halves = source.assumingMemoryBound(to: UInt16.self)
        for i in 0..<count { out[i] = Float(bitPattern: UInt32(halves[i]) << 16) }
    }

    /// Binary16 bits of each value, rounded to nearest even (as `Float16(x)`; NaNs become a quiet NaN).
    public static func encodeF16(_ values: UnsafePointer<Float>, count: Int, into out: UnsafeMutableRawPointer) {
        let halves = out.assumingMemoryBound(to: UInt16.self)
        for i in 0..<count { halves[i] = UInt16(truncatingIfNeeded: f16Bits(fromFloat: values[i].bitPattern)) }
    }

    /// float_to_half with round to nearest even: overflow goes to infinity, subnormal results are
    /// rounded by one float addition, normal ones by adding half an ulp plus the odd bit.
    @inline(__always)
    private static func f16Bits(fromFloat f: UInt32) -> UInt32 {
        let sign = f & 0x8000_0000
        let magnitude = f ^ sign
        let infinity: UInt32 = 255 << 23, smallestOverflow: UInt32 = (127 + 16) << 23
        let denormalMagic: UInt32 = ((127 - 15) + (23 - 10) + 1) << 23
        let subnormal = (Float(bitPattern: magnitude) + Float(bitPattern: denormalMagic)).bitPattern &- denormalMagic
        let rebiasAndHalfUlp = UInt32(bitPattern: Int32(15 - 127) << 23) &+ 0xFFF
        let normal = (magnitude &+ rebiasAndHalfUlp &+ ((magnitude >> 13) & 1)) >> 13
        let finite = magnitude < (113 << 23) ? subnormal : normal
        let half = magnitude > infinity ? 0x7E00 : (magnitude >= smallestOverflow ? 0x7C00 : finite)
        return half | (sign >> 16)
    }
}
