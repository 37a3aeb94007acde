import MoQAEStore
import Testing

@Suite struct SafeTensorsTests {
    func sampleFile() -> [UInt8] {
        var builder = SafeTensorsBuilder()
        builder.metadata = [("k", "v")]
        builder.add("a", shape: [2, 3], floats: [1, 2, 3, 4, 5, 6])
        builder.add("b", dtype: .f16, shape: [1], bytes: [0, 0x3C])
        return builder.serialized()
    }

    func parse(_ bytes: [UInt8]) throws(SafeTensorsError) -> SafeTensorsHeader {
        try bytes.withUnsafeBytes { buffer in Result { () throws(SafeTensorsError) in try SafeTensorsHeader(file: buffer) } }.get()
    }

    /// A file whose header is `json` (padded) followed by `dataBytes` bytes of data.
    func file(header json: String, dataBytes: Int) -> [UInt8] {
        let header = Array(json.utf8)
        return withUnsafeBytes(of: UInt64(header.count).littleEndian, Array.init) + header + [UInt8](repeating: 0, count: dataBytes)
    }

    @Test func roundTrip() throws {
        let header = try parse(sampleFile())
        #expect(header.tensors.map(\.name) == ["a", "b"])
        #expect(header.tensor(named: "a")?.shape == [2, 3])
        #expect(header.tensor(named: "b")?.dataRange == 24..<26)
        #expect(header.metadata == ["k": "v"])
        #expect(header.dataOffset % 8 == 0)
    }

    @Test func rejectsTruncatedAndExtendedFiles() {
        let bytes = sampleFile()
        #expect(throws: SafeTensorsError.lengthMismatch(expected: bytes.count, actual: bytes.count - 1)) { try parse(Array(bytes.dropLast())) }
        #expect(throws: SafeTensorsError.lengthMismatch(expected: bytes.count, actual: bytes.count + 1)) { try parse(bytes + [0]) }
        #expect(throws: SafeTensorsError.tooSmall(fileSize: 4)) { try parse(Array(bytes.prefix(4))) }
        #expect(throws: SafeTensorsError.self) { try parse(Array(bytes.prefix(20))) }
    }

    @Test func rejectsHeaderLengths() {
        var huge = sampleFile()
        huge.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64(200_000_000).littleEndian, Array.init))
        #expect(throws: SafeTensorsError.headerTooLarge(200_000_000)) { try parse(huge) }
        var long = sampleFile()
        long.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64(long.count).littleEndian, Array.init))
        #expect(throws: SafeTensorsError.headerOutOfBounds(headerSize: UInt64(long.count), fileSize: long.count)) { try parse(long) }
    }

    @Test func rejectsFlippedHeaderByte() {
        var bytes = sampleFile()
        bytes[8] ^= 0xFF   // '{' becomes invalid UTF-8
        #expect(throws: SafeTensorsError.self) { try parse(bytes) }
    }

    @Test func rejectsUnknownDTypeAndBadEntries() {
        #expect(throws: SafeTensorsError.unknownDType(tensor: "a", dtype: "F12")) {
            try parse(file(header: #"{"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}}"#, dataBytes: 4))
        }
        #expect(throws: SafeTensorsError.self) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, dataBytes: 4))
        }
        #expect(throws: SafeTensorsError.self) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[4611686018427387904, 4],"data_offsets":[0,4]}}"#, dataBytes: 4))
        }
        #expect(throws: SafeTensorsError.self) {
            try parse(file(header: #"{"__metadata__":{"k":1}}"#, dataBytes: 0))
        }
        #expect(throws: SafeTensorsError.self) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, dataBytes: 8))
        }
    }

    @Test func rejectsOffsetProblems() {
        #expect(throws: SafeTensorsError.sizeMismatch(tensor: "a", expected: 8, actual: 4)) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, dataBytes: 4))
        }
        #expect(throws: SafeTensorsError.notContiguous(tensor: "b", expectedStart: 4, actualStart: 8)) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#, dataBytes: 12))
        }
        #expect(throws: SafeTensorsError.notContiguous(tensor: "a", expectedStart: 4, actualStart: 2)) {
            try parse(file(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, dataBytes: 6))
        }
        let header = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
        #expect(throws: SafeTensorsError.lengthMismatch(expected: 8 + header.utf8.count + 4, actual: 8 + header.utf8.count + 8)) {
            try parse(file(header: header, dataBytes: 8))
        }
    }
}
