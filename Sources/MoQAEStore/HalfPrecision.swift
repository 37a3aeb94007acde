/// Vectorised conversions between binary32 and the 16-bit formats a store holds (binary16, bfloat16):
/// branch-free integer code on bit patterns that the compiler vectorises, exact, and the same on every CPU.
public enum HalfPrecision {
    /// `out[i] = Float(binary16 bits source[i])`, exactly (subnormals, infinities and NaNs included).
    public static func decodeF16(_ source: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        let halves = source.assumingMemoryBound(to: UInt16.self)
        for i in 0..<count { out[i] = Float(bitPattern: floatBits(fromF16: UInt32(halves[i]))) }
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

    /// half_to_float: move exponent and mantissa into place and rebias; fix up infinities/NaNs
    /// (exponent 31) and subnormals (exponent 0, renormalised by one float subtraction).
    @inline(__always)
    private static func floatBits(fromF16 h: UInt32) -> UInt32 {
        let shiftedExponent: UInt32 = 0x7C00 << 13
        let moved = (h & 0x7FFF) << 13
        let exponent = moved & shiftedExponent
        let rebiased = moved &+ ((127 - 15) << 23)
        let special = rebiased &+ ((128 - 16) << 23)
        let renormalised = (Float(bitPattern: rebiased &+ (1 << 23)) - Float(bitPattern: 113 << 23)).bitPattern
        let magnitude = exponent == shiftedExponent ? special : (exponent == 0 ? renormalised : rebiased)
        return magnitude | ((h & 0x8000) << 16)
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
