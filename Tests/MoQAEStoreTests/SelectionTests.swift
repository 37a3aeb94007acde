import MoQAEStore
import Testing

@Suite struct SelectionTests {
    /// The test vectors of docs/FORMATS.md, Split selection.
    @Test(arguments: [
        (UInt64(0), UInt64(0), UInt64(0xE220_A839_7B1D_CDAF), 0.88331080821364272),
        (1, 0, 0x910A_2DEC_8902_5CC1, 0.56656157517228101),
        (12345, 7, 0x9742_4427_05B7_1595, 0.59085489227956278),
        (1_000_000, 42, 0x62C0_89A9_1ABB_FEF6, 0.38575039270902778),
    ])
    func specVectors(id: UInt64, seed: UInt64, z: UInt64, u: Double) {
        #expect(Selection.mix(id: id, seed: seed) == z)
        #expect(Selection.unitValue(id: id, seed: seed) == u)
    }

    @Test func splitsAreHalfOpen() {
        let u = Selection.unitValue(id: 1, seed: 0)
        #expect(Selection.contains(id: 1, seed: 0, lower: u, upper: 1))
        #expect(!Selection.contains(id: 1, seed: 0, lower: 0, upper: u))
    }

    @Test func crc32CheckValue() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }
}

@Suite struct JSONTests {
    @Test func parsesAndKeepsOrder() throws {
        let json = try JSON.parse(#"{"b": [1, 2.5e3, -0], "a": {"s": "x\u00e9\n"}, "t": true, "n": null}"#)
        #expect(json.objectValue?.map(\.0) == ["b", "a", "t", "n"])
        #expect(json["b"]?.arrayValue?[1].doubleValue == 2500)
        #expect(json["a"]?["s"]?.stringValue == "xé\n")
        #expect(try JSON.parse(json.serialized) == json)
    }

    @Test(arguments: [#"{"a": 1, "a": 2}"#, "{", #"{"a": 1} x"#, "[01]", #"{"a": "\ud800"}"#, "[1,]", String(repeating: "[", count: 100)])
    func rejects(_ text: String) {
        #expect(throws: JSONError.self) { try JSON.parse(text) }
    }

    @Test func rejectsInvalidUTF8() {
        #expect(throws: JSONError.self) { try JSON.parse([0x22, 0xFF, 0x22]) }
    }
}
