import Dispatch
import MoQAERouter
import MoQAEStore

/// Loss terms and routing figures of one batch.
public struct BatchFigures: Equatable, Sendable {
    /// Mean over the batch's sequences of `λ L_model + (1−λ) L_mem` (of the loss it was computed with).
    public var loss: Double
    public var modelTerm: Double
    public var memoryTerm: Double
    /// Mean `L_nll(s)` over the batch.
    public var meanEstimatedNLL: Double
    /// Routed units decided for each expert, over the batch.
    public var decisionCounts: [Int]
    /// Payload bits per KV element over the batch's sequences (frozen and tail tokens at 16).
    public var payloadBits: Double

    /// All zero, for `experts` experts.
    public init(experts: Int) {
        (loss, modelTerm, memoryTerm, meanEstimatedNLL, payloadBits) = (0, 0, 0, 0, 0)
        decisionCounts = Array(repeating: 0, count: experts)
    }
}

/// Streams store sequences through `StreamingPass`es on worker threads. Worker w takes sequences
/// w, w + workers, … of a batch; each sequence's gradient is computed whole by one worker and the
/// batch is summed in sequence order, so results do not depend on the number of workers.
///
/// Each worker reads its sequences' leader layers block by block straight from the store's mapping,
/// asks the kernel to read the next `readaheadBytes` of its work ahead (the next batch included),
/// and drops each layer's pages from the process once used, so memory stays flat.
public final class SequenceStreamer: @unchecked Sendable {
    public let data: RoutedStore
    public let workers: Int
    /// How far ahead of its position each worker has the kernel read.
    public let readaheadBytes: Int
    private let passes: [StreamingPass]

    /// - Parameter workers: worker threads.
    /// - Parameter blockChunks: chunks per block of rows (each block is one forward kernel call).
    public init(data: RoutedStore, workers: Int, blockChunks: Int = 16, readaheadBytes: Int = 64 << 20) {
        self.data = data
        self.workers = max(1, workers)
        self.readaheadBytes = readaheadBytes
        passes = (0..<self.workers).map { _ in StreamingPass(layout: data.layout, experts: data.experts, hiddenWidth: data.setup.hiddenWidth,
                                                                      blockChunks: blockChunks) }
    }

    /// The loss gradient of a batch (mean over its sequences), laid out like `parameters.values`, with
    /// its figures and every sequence's `[router][unit]` decisions. `upcoming` are read ahead.
    public func batchGradient(_ batch: [CalibrationStore.Sequence], upcoming: [CalibrationStore.Sequence] = [],
                              parameters: RouterParameters, loss: LossSettings) throws(StoreError) -> (gradient: [Float], figures: BatchFigures, decisions: [[[Int]]]) {
        let count = parameters.values.count, M = data.experts.count
        let sequenceGradients = PinnedBuffer<Float>(count: batch.count * count)  // (batch, parameters)
        var results = [(loss: Double, modelTerm: Double, memoryTerm: Double, estimatedNLL: Double)](repeating: (0, 0, 0, 0), count: batch.count)
        var decisions = [[[Int]]](repeating: [], count: batch.count)
        let scale = 1 / Double(batch.count)
        try results.withUnsafeMutableBufferPointer { (results) throws(StoreError) in
        try decisions.withUnsafeMutableBufferPointer { (decisions) throws(StoreError) in
            // Each index is written by one worker only.
            let (gradients, results, decisions) = (UncheckedSendable(sequenceGradients.pointer), UncheckedSendable(results),
                                                   UncheckedSendable(decisions))
            try forEachSequence(batch, upcoming: upcoming) { (index, sequence, pass, readahead) throws(StoreError) in
                pass.begin(parameters: parameters, loss: loss, sensitivity: data.sensitivity(of: sequence))
                try stream(sequence, through: pass, backward: true, readahead: readahead)
                try data.store.checkShardIntact(sequence)
                results.value[index] = pass.finish(nll: data.store.nll(of: sequence), scale: scale,
                                                   gradient: gradients.value + index * count)
                decisions.value[index] = pass.decisions
            }
        }}
        var gradient = [Float](repeating: 0, count: count)
        for index in batch.indices {
            for i in 0..<count { gradient[i] += sequenceGradients[index * count + i] }
        }
        var figures = BatchFigures(experts: M)
        var tally = BitsTally(experts: M)
        for (result, sequenceDecisions) in zip(results, decisions) {
            figures.loss += scale * result.loss
            figures.modelTerm += scale * result.modelTerm
            figures.memoryTerm += scale * result.memoryTerm
            figures.meanEstimatedNLL += scale * result.estimatedNLL
            tally.add(decisions: sequenceDecisions, layout: data.layout)
            for routerDecisions in sequenceDecisions { for expert in routerDecisions { figures.decisionCounts[expert] += 1 } }
        }
        figures.payloadBits = tally.memory(setup: data.setup, sequences: batch.count).payloadBits
        return (gradient, figures, decisions)
    }

    /// The routers' `[router][unit]` decisions for each sequence (forward only), under an export's bits price.
    public func decisions(_ sequences: [CalibrationStore.Sequence], parameters: RouterParameters,
                          bitsPrice: Float = 0) throws(StoreError) -> [[[Int]]] {
        var decisions = [[[Int]]](repeating: [], count: sequences.count)
        try decisions.withUnsafeMutableBufferPointer { (decisions) throws(StoreError) in
            let decisions = UncheckedSendable(decisions)  // each index is written by one worker only
            try forEachSequence(sequences, upcoming: []) { (index, sequence, pass, readahead) throws(StoreError) in
                pass.begin(parameters: parameters, loss: LossSettings(lambda: 0), sensitivity: nil, bitsPrice: bitsPrice)
                try stream(sequence, through: pass, backward: false, readahead: readahead)
                decisions.value[index] = pass.decisions
            }
        }
        return decisions
    }

    /// Runs `body(index, sequence, pass, readahead)` for every sequence, worker w taking indices
    /// w, w + workers, … and reading its share of `sequences` then of `upcoming` ahead. A worker stops
    /// at its first error; the error of the lowest sequence index is thrown once all have stopped.
    private func forEachSequence(_ sequences: [CalibrationStore.Sequence], upcoming: [CalibrationStore.Sequence],
                                 _ body: @Sendable (Int, CalibrationStore.Sequence, StreamingPass, Readahead) throws(StoreError) -> Void) throws(StoreError) {
        let workers = min(self.workers, max(1, sequences.count))
        let leaders = (0..<data.layout.routers).map(data.layout.leaderLayer(of:))
        var failures = [StoreError?](repeating: nil, count: sequences.count)
        failures.withUnsafeMutableBufferPointer { failures in
            let failures = UncheckedSendable(failures)  // each index is written by one worker only
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                let mine = Array(stride(from: worker, to: sequences.count, by: workers))
                let next = stride(from: worker, to: upcoming.count, by: workers).map { upcoming[$0] }
                let readahead = Readahead(store: data.store, items: (mine.map { sequences[$0] } + next).flatMap { sequence in leaders.map { (sequence, $0) } },
                                          bytes: readaheadBytes)
                for index in mine {
                    do throws(StoreError) {
                        try data.store.checkShardIntact(sequences[index])   // before its nll and delta_nll are read
                        try body(index, sequences[index], passes[worker], readahead)
                    } catch {
                        failures.value[index] = error
                        return
                    }
                }
            }
        }
        if let failure = failures.lazy.compactMap({ $0 }).first { throw failure }
    }

    /// Feeds one sequence's leader layers to `pass` block by block, with the next block's stored
    /// inputs to prefetch into the CPU cache, releasing each layer's pages after use.
    private func stream(_ sequence: CalibrationStore.Sequence, through pass: StreamingPass, backward: Bool,
                        readahead: Readahead) throws(StoreError) {
        let layout = data.layout
        let blocks = pass.blocks
        for (index, block) in blocks.enumerated() {
            let leader = layout.leaderLayer(of: block.router)
            try data.store.checkShardIntact(sequence)
            if index == 0 || blocks[index - 1].router != block.router { readahead.advance() }
            data.store.readInputs(sequence, layer: leader, head: block.head, tokens: block.tokens, into: pass.block.pointer)
            let next = index + 1 < blocks.count ? blocks[index + 1] : nil
            // Mapped now, so that the kernels' cache prefetches of the next block are not dropped.
            let prefetch = next.map { data.store.populateInputs(sequence, layer: layout.leaderLayer(of: $0.router), head: $0.head, tokens: $0.tokens) }
            pass.process(router: block.router, head: block.head, firstChunk: block.firstChunk, chunks: block.chunks,
                         backward: backward, prefetch: prefetch)
            if pass.sawNonFiniteInputs {
                throw .tensor(path: data.store.shardPath(of: sequence), tensor: "seq.\(sequence.id).inputs",
                              reason: "a non-finite value in layer \(leader), head \(block.head), tokens \(block.tokens.lowerBound)..<\(block.tokens.upperBound) (moqae-train inspect names it)")
            }
            if next?.router != block.router { data.store.releaseInputs(sequence, layer: leader) }
        }
    }
}

/// Keeps the kernel reading a worker's next leader layers: the (sequence, layer) items of its work,
/// in order, up to `bytes` beyond the start of the item being processed.
private final class Readahead {
    let store: CalibrationStore
    let items: [(sequence: CalibrationStore.Sequence, layer: Int)]
    let bytes: Int
    /// The item about to be processed, and the first item not yet requested.
    private var current = 0, requested = 0

    init(store: CalibrationStore, items: [(sequence: CalibrationStore.Sequence, layer: Int)], bytes: Int) {
        self.store = store
        self.items = items
        self.bytes = bytes
    }

    /// Called before processing the next item.
    func advance() {
        requested = max(requested, current)
        var ahead = (current..<requested).reduce(0) { $0 + store.inputLayerBytes(items[$1].sequence) }
        while requested < items.count, requested == current || ahead < bytes {
            store.prefetchInputs(items[requested].sequence, layer: items[requested].layer)
            ahead += store.inputLayerBytes(items[requested].sequence)
            requested += 1
        }
        current += 1
    }
}

/// Hands a pointer to concurrent work that writes disjoint parts of it.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
