/// The split hash of docs/FORMATS.md, Split selection: a SplitMix64 finaliser of `(id, seed)` mapped to [0, 1).
///
/// A sequence belongs to the split `[a, b)` of seed `s` when `a <= u(id, s) < b`. The calibration
/// split is `[0, calibration_fraction)`, the validation split the next `validation_fraction`.
public enum Selection {
    static let phi: UInt64 = 0x9E37_79B9_7F4A_7C15

    /// The mixed 64-bit value `z` of docs/FORMATS.md for sequence `id` under `seed`.
    public static func mix(id: UInt64, seed: UInt64) -> UInt64 {
        var z = (id ^ (seed &* phi)) &+ phi
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// `u(id, seed) = z / 2^64` in [0, 1].
    public static func unitValue(id: UInt64, seed: UInt64) -> Double {
        Double(mix(id: id, seed: seed)) / 18_446_744_073_709_551_616.0
    }

    public static func contains(id: UInt64, seed: UInt64, lower: Double, upper: Double) -> Bool {
        let u = unitValue(id: id, seed: seed)
        return lower <= u && u < upper
    }
}
