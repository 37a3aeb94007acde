import CHalfPrecision
import MoQAEStore
import Testing

@Suite("Half-precision conversions")
struct HalfPrecisionTests {
    /// Every binary16 bit pattern decodes as Swift's scalar Float16 → Float conversion does, on the
    /// CPU's path (F16C where present) and on the portable one.
    @Test(arguments: [true, false])
    func decodesEveryF16BitPattern(portable: Bool) {
        let halves = (0...UInt16.max).map { $0 }
        var decoded = [Float](repeating: 0, count: halves.count)
        if portable {
            moqae_decode_f16_portable(halves, &decoded, halves.count)
        } else {
            halves.withUnsafeBytes { HalfPrecision.decodeF16($0.baseAddress!, count: halves.count, into: &decoded) }
        }
        for (bits, value) in zip(halves, decoded) {
            let expected = Float(Float16(bitPattern: bits))
            if expected.isNaN {
                #expect(value.isNaN && value.sign == expected.sign, "bits \(bits)")
            } else {
                #expect(value.bitPattern == expected.bitPattern, "bits \(bits): \(value) vs \(expected)")
            }
        }
    }

    @Test func decodesBF16AsTheUpperHalfOfAFloat() {
        let values: [Float] = (0..<1000).map { Float($0) * 0.37 - 100 } + [.infinity, -.infinity, 0, -0.0]
        let halves = values.map { UInt16($0.bitPattern >> 16) }
        var decoded = [Float](repeating: 0, count: halves.count)
        halves.withUnsafeBytes { HalfPrecision.decodeBF16($0.baseAddress!, count: halves.count, into: &decoded) }
        #expect(decoded.map(\.bitPattern) == halves.map { UInt32($0) << 16 })
    }

    /// Encoding rounds to nearest even exactly as `Float16(x)`: random floats over the whole range,
    /// every exact binary16 value, the midpoints between neighbours (ties), overflow and subnormals.
    @Test func encodesAsFloat16RoundingDoes() {
        var values: [Float] = [0, -0.0, .infinity, -.infinity, 65504, 65519.99, 65520, -65520, 1e-8, 3e-8, 5.96e-8, 1e30]
        var random = SystemRandomNumberGenerator()
        for _ in 0..<200_000 { values.append(Float(bitPattern: random.next() & 0xC7FF_FFFF | 0x3000_0000)) }
        for bits in UInt16(0)..<0x7C00 {
            let value = Float(Float16(bitPattern: bits))
            values += [value, -value, (value + Float(Float16(bitPattern: bits + 1))) / 2]
        }
        var encoded = [UInt16](repeating: 0, count: values.count)
        encoded.withUnsafeMutableBytes { HalfPrecision.encodeF16(values, count: values.count, into: $0.baseAddress!) }
        for (value, bits) in zip(values, encoded) {
            #expect(bits == Float16(value).bitPattern, "\(value): \(bits) vs \(Float16(value).bitPattern)")
        }
        var nan: [UInt16] = [0, 0]
        nan.withUnsafeMutableBytes { HalfPrecision.encodeF16([Float.nan, -Float.nan], count: 2, into: $0.baseAddress!) }
        #expect(nan.map { Float16(bitPattern: $0).isNaN } == [true, true])
    }
}
