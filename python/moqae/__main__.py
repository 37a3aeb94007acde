"""python -m moqae (or `moqae`) dump | eval | calibrate-bits | pareto | generate | serve-passkey | serve-benchmark | plot | benchmark | sensitivity-benchmark | needle-signal | layer-plan-search | length-benchmark | device-check | soak | merge — see README.md."""
import argparse
import json
import os
import re
import sys

from . import MoqaeError, __version__
from .router_inputs import ROUTER_INPUTS


def byte_size(text):
    match = re.fullmatch(r"(\d+)([KMG]i?B?)?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got '{text}'")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def integer_at_least(low, kind):
    """An argparse type: an integer of at least `low`, named `kind` in its error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value
    return parse


positive_int = integer_at_least(1, "positive")
non_negative_int = integer_at_least(0, "non-negative")


def device_name(text):
    """auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{text}'")
    return text


def numbers(text):
    """A comma-separated list of numbers (empty: none)."""
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, `error: PROG: what (PROG --help for usage)`, exit status 64, as moqae-train's."""

    def error(self, message):
        self.exit(64, f"error: {self.prog}: {message} ({self.prog} --help for usage)\n")


def shared_options():
    """Parent parsers of the options several commands take, each said once: (tokenizer, value group, device,
    device map, model dtype)."""
    def option(*args, **kwargs):
        parent = OneLineParser(add_help=False)
        parent.add_argument(*args, **kwargs)
        return parent
    return (option("--tokenizer", choices=["auto", "bytes"], default="auto",
                   help="auto: the model directory's tokenizer; bytes: raw UTF-8 bytes as ids"),
            option("--value-group", type=positive_int,
                   help="channels per value quantization group (default: the store's where one is given, else the "
                        "head dimension; a router is served with the value group of the store it was trained on)"),
            option("--device", type=device_name, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"),
            option("--device-map", help="passed to from_pretrained, e.g. auto for models larger than one GPU"),
            option("--model-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA"))


def parser():
    tokenizer, value_group, device, device_map, model_dtype = shared_options()
    root = OneLineParser(prog="python -m moqae", description="Calibration stores for moqae-train; evaluating and serving its routers.")
    root.add_argument("--version", action="version", version=__version__)
    commands = root.add_subparsers(dest="command", required=True)

    dump = commands.add_parser("dump", help="dump a store from a local Hugging Face causal LM and a text corpus",
                               parents=[tokenizer, value_group, device, device_map, model_dtype])
    dump.add_argument("--model", required=True, help="model directory (config.json and weights); never downloaded")
    dump.add_argument("--corpus", required=True, nargs="+", help=".txt or .jsonl files (jsonl: a \"text\" field per line)")
    dump.add_argument("--out", required=True, help="store directory to create")
    dump.add_argument("--seq-len", type=positive_int, help="tokens per window (default: max positions, at most 4096)")
    dump.add_argument("--fraction", type=float, default=0.10,
                      help="dump the windows with u(id) < FRACTION (default 0.10: calibration and validation splits)")
    dump.add_argument("--seed", type=non_negative_int, default=0, help="selection seed (default 0)")
    dump.add_argument("--passkey", type=float, default=0.0,
                      help="share of the windows replaced by pass-key windows built from the corpus (default 0), so "
                           "that routers see needles as eval --task passkey asks for them")
    dump.add_argument("--passkey-seed", type=non_negative_int, default=1,
                      help="seed of the pass-key windows and of which windows get them (default 1; eval uses 0)")
    dump.add_argument("--answer-weight", type=float, default=1.0,
                      help="with --passkey: each answer token of a pass-key window counts as this many tokens in the "
                           "loss whose change delta_nll measures (default 1: the plain mean NLL)")
    dump.add_argument("--chunk-size", type=positive_int, default=32, help="tokens per unit (default 32)")
    dump.add_argument("--experts", default="fp16,int4,int2", help="expert set, e.g. fp16,int8,int4,k4v2,int2")
    dump.add_argument("--sensitivity", choices=["taylor", "fisher", "exact"], default="taylor",
                      help="how delta_nll is estimated (exact: the NLL change with each unit quantized alone, one "
                           "resumed forward per unit and expert; small models)")
    dump.add_argument("--background", metavar="PLAN",
                      help="measure delta_nll around this plan instead of fp16: an expert for every layer (int2) or one "
                           "per layer (int4,int2,int2,int2), chunk 0 at 16 bits; Taylor at that point (a version 2 store)")
    dump.add_argument("--exact-answers", action="store_true",
                      help="with --background and --passkey: the answer tokens' part of delta_nll measured exactly, every "
                           "head of a chunk raised together, in windows whose answer the background puts at risk")
    dump.add_argument("--router-input", choices=ROUTER_INPUTS, default="key",
                      help="what the routers read per token: the post-RoPE key as cached (default), the key before "
                           "RoPE, key and value side by side (twice the head dim), or the key and 7 statistics of its chunk "
                           "(key+chunk: quantization errors, norms, key range ratio; see features.py)")
    dump.add_argument("--inputs-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                      help="dtype of the stored router inputs (default float16)")
    dump.add_argument("--shard-size", type=byte_size, default=1 << 30, help="bytes per shard at most (default 1G)")
    dump.add_argument("--resume", action="store_true", help="continue an interrupted dump into --out")
    dump.add_argument("--num-shards", type=positive_int, default=1, help="parallel dump: number of processes")
    dump.add_argument("--shard-index", type=non_negative_int, default=0, help="parallel dump: this process's index")

    evaluate = commands.add_parser("eval", help="real perplexity under a router export, beside the baselines",
                                   parents=[tokenizer, value_group, device, device_map, model_dtype])
    evaluate.add_argument("--model", required=True, help="model directory")
    evaluate.add_argument("--text", required=True, help="evaluation text (.txt or .jsonl); every window is scored")
    evaluate.add_argument("--router", required=True, help="MQAE export written by moqae-train export")
    evaluate.add_argument("--seq-len", type=positive_int, help="tokens per window (default: max positions, at most 4096)")
    evaluate.add_argument("--store", help="calibration store: its value_group, and the layer-wise baseline's search")
    evaluate.add_argument("--calibration-fraction", type=float, default=0.05, help="the store's calibration split")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    evaluate.add_argument("--max-windows", type=positive_int,
                          help="score only the first N windows (quick checks); with --task passkey, how many (default 200)")
    evaluate.add_argument("--task", metavar="passkey|FILE.jsonl",
                          help="passkey: needle windows built from --text (a key hidden at evenly spread depths, asked "
                               "for at the end); FILE.jsonl: records of context, question and answer, each cut to "
                               "--seq-len; scored by exact match of the answer beside bits per byte")
    evaluate.add_argument("--task-seed", type=non_negative_int, default=0, help="seed of the pass-key windows (default 0)")
    evaluate.add_argument("--no-baselines", action="store_true", help="score the router alone")
    evaluate.add_argument("--layer-plan", action="append", metavar="EXPERT,EXPERT,...",
                          help="also score this content-blind plan: one expert per layer, by name, e.g. int4,int2,int2,int2 "
                               "(repeatable; chunk 0 and the tail as the router's)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    budget = commands.add_parser("calibrate-bits",
                                 help="write a router export whose bits price lands it on a payload-bits target on calibration text",
                                 parents=[tokenizer, value_group, device, model_dtype])
    budget.add_argument("--model", required=True, help="model directory")
    budget.add_argument("--text", required=True, help="calibration text (valid.txt, never the text you evaluate on)")
    budget.add_argument("--router", required=True, help="MQAE export written by moqae-train export")
    budget.add_argument("--out", required=True, help="the calibrated export to write (must not exist)")
    budget.add_argument("--target-bits", type=float, required=True, help="average payload bits to land on, as eval reports them")
    budget.add_argument("--seq-len", type=positive_int, help="tokens per window (default as eval's)")
    budget.add_argument("--task", metavar="passkey|FILE.jsonl", help="calibrate on the windows of this task built from --text, as eval does")
    budget.add_argument("--task-seed", type=non_negative_int, default=0, help="seed of the pass-key windows (default 0)")
    budget.add_argument("--max-windows", type=positive_int, help="windows to calibrate on (default all; with --task passkey 200)")
    budget.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")

    pareto = commands.add_parser("pareto", help="routers at several λ against every baseline: table and plot",
                                 parents=[tokenizer, device])
    pareto.add_argument("--moqae-train", required=True, help="path of the moqae-train binary")
    pareto.add_argument("--config", default="configs/default.yaml", help="moqae-train config")
    pareto.add_argument("--store", required=True, help="calibration store to train on")
    pareto.add_argument("--model", required=True)
    pareto.add_argument("--text", required=True, help="evaluation text")
    pareto.add_argument("--out", required=True, help="directory for the runs, pareto.json, pareto.md, pareto.png")
    pareto.add_argument("--lambdas", type=numbers, default="0.1,0.3,0.5,0.7,0.9", help="λ of the paper-loss runs (empty: none)")
    pareto.add_argument("--config-run", action="append", metavar="FILE[:KEY=VALUE,...]",
                        help="a further run: a moqae-train config file, labelled by its name, with optional overrides "
                             "after a colon, e.g. configs/passkey-3.0.yaml:router.pooling=max (repeatable)")
    pareto.add_argument("--no-diagnostics", action="store_true",
                        help="score only router, static and layer-wise per run (no random or prescient plan): ablations")
    pareto.add_argument("--max-windows", type=positive_int,
                        help="score only the first N windows of the text; with --task passkey, how many (default 200)")
    pareto.add_argument("--task", metavar="passkey|FILE.jsonl", help="score task windows instead of plain text (see eval --task)")
    pareto.add_argument("--task-seed", type=non_negative_int, default=0, help="seed of the pass-key windows (default 0)")
    pareto.add_argument("--calibration-fraction", type=float, default=0.05)
    pareto.add_argument("--batch-size", type=positive_int, default=8)
    pareto.add_argument("--layer-plans", metavar="LAYER-PLANS.JSON",
                        help="also score the frontier of a `layer-plan-search` on a calibration text (its best plan at each bits)")
    pareto.add_argument("--train-arg", action="append", help="extra moqae-train argument (repeatable), e.g. --train-arg=--max-steps=20")

    bench = commands.add_parser("benchmark", help="moqae-train against plain reads and a PyTorch step on a synthetic store")
    bench.add_argument("--moqae-train", required=True, help="path of the moqae-train binary (release build)")
    bench.add_argument("--shape", default="llama2-7b", help="synthetic store shape: tiny, llama2-7b, llama3-8b")
    bench.add_argument("--sequences", type=positive_int, default=16, help="sequences in the store (llama2-7b: 1 GiB each)")
    bench.add_argument("--work", required=True, help="directory for the store and the run (kept for reuse)")
    bench.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="moqae-train worker threads")
    bench.add_argument("--cold", action="store_true", help="also measure from disk with the page cache dropped (root)")
    bench.add_argument("--out", help="Markdown report to write")
    bench.add_argument("--disk-only", action="store_true",
                       help="only the from-disk figures (cold cat and epoch, peak RSS): for stores larger than RAM")
    bench.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")

    sensitivity = commands.add_parser("sensitivity-benchmark",
                                      help="seconds per window of Taylor and exact sensitivities, on the same windows",
                                      parents=[tokenizer])
    sensitivity.add_argument("--model", required=True)
    sensitivity.add_argument("--corpus", required=True, help="text file; windows are taken as the dump selects them")
    sensitivity.add_argument("--seq-len", type=positive_int, help="tokens per window (default: max positions)")
    sensitivity.add_argument("--chunk-size", type=positive_int, default=32)
    sensitivity.add_argument("--experts", default="fp16,int4,int2")
    sensitivity.add_argument("--windows", type=positive_int, default=8, help="windows to time")
    sensitivity.add_argument("--out", help="Markdown report whose \"Exact sensitivities\" section to write")

    signal = commands.add_parser("needle-signal",
                                 help="whether a pass-key store's delta_nll ranks the key's units first, and what that buys")
    signal.add_argument("--store", action="append", required=True, help="a pass-key store (repeat to compare stores)")
    signal.add_argument("--corpus", required=True, help="the text the stores were dumped from")
    signal.add_argument("--model", help="also score int2 with each layer's top chunk at int4 on those windows")
    signal.add_argument("--split", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                        help="the needle windows with LOW <= u(id) < HIGH (default: all the store holds)")

    search = commands.add_parser("layer-plan-search",
                                 help="every per-layer plan scored on pass-key windows of a calibration text: the frontier")
    search.add_argument("--model", required=True)
    search.add_argument("--text", required=True, help="haystack text (the calibration text, valid.txt; never the test text)")
    search.add_argument("--out", required=True, help="directory for layer-plans.json and layer-plans.md")
    search.add_argument("--experts", default="int4,int2,k4v2,k2v4", help="experts each layer may take")
    search.add_argument("--windows", type=positive_int, default=40, help="pass-key windows (default 40)")
    search.add_argument("--task-seed", type=non_negative_int, default=5, help="seed of the pass-key windows (default 5)")
    search.add_argument("--seq-len", type=positive_int, default=2048)

    length = commands.add_parser("length-benchmark", help="dump time and peak memory against the window length")
    length.add_argument("--model", required=True, help="byte-level model for --lengths")
    length.add_argument("--corpus", required=True, help="a .txt file")
    length.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=[512, 1024, 2048])
    length.add_argument("--tiny-lengths", type=lambda t: [int(x) for x in t.split(",")], default=[4096, 8192],
                        help="lengths for a tiny random Llama made on the spot")
    length.add_argument("--windows", type=positive_int, default=4, help="windows per timed dump (at least 2)")
    length.add_argument("--out", help="Markdown report whose \"Dumps at length\" section to write")

    device_check = commands.add_parser("device-check",
                                       help="dump and evaluation at Llama-2-7B shapes on a GPU: time and peak memory per window")
    device_check.add_argument("--corpus", required=True, help="a .txt file of at least WINDOWS × SEQ_LEN bytes")
    device_check.add_argument("--shape", choices=["llama2-7b", "tiny"], default="llama2-7b",
                              help="the random model's shape (tiny: a smoke test that runs anywhere)")
    device_check.add_argument("--windows", type=positive_int, default=4, help="windows to dump and evaluate (default 4)")
    device_check.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per window (default 4096)")
    device_check.add_argument("--device", type=device_name, default="cuda", help="cuda (default) or cpu")
    device_check.add_argument("--out", help="Markdown report whose \"On a GPU\" section to write")

    soak = commands.add_parser("soak", help="stop moqae-train (SIGKILL, SIGINT, SIGTERM) again and again, resume each time, compare with an uninterrupted run")
    soak.add_argument("--moqae-train", required=True, help="path of the moqae-train binary")
    soak.add_argument("--config", required=True, help="training config (the default run's, for example)")
    soak.add_argument("--run-dir", required=True, help="run directory; the reference run is kept beside it as RUN_DIR.reference")
    soak.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable), e.g. store=DIR")
    soak.add_argument("--kills", type=positive_int, default=20, help="how many times to kill the trainer")
    soak.add_argument("--write-fraction", type=float, default=0.5, help="share of kills aimed at a checkpoint write in progress")
    soak.add_argument("--rename-delay-ms", type=non_negative_int, default=100,
                      help="MOQAE_TEST_DELAY_BEFORE_RENAME_MS for the killed runs: how long a written checkpoint waits before its rename")
    soak.add_argument("--min-seconds", type=float, default=0.05, help="shortest life before a random kill")
    soak.add_argument("--max-seconds", type=float, default=1.0, help="longest life before a random kill")
    soak.add_argument("--seed", type=non_negative_int, default=0)

    generate = commands.add_parser("generate", help="generate from a prompt with the router's mixed-precision KV cache",
                                   parents=[tokenizer, value_group, device, model_dtype])
    generate.add_argument("--model", required=True, help="model directory (config.json and weights); never downloaded")
    generate.add_argument("--router", help="router export (default: the model directory's moqae-router.bin, as "
                                           "moqae-train export RUN --into MODEL_DIR writes it)")
    generate.add_argument("--prompt-file", required=True, help="UTF-8 text file holding the prompt")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate, greedily (default 64)")

    serve_passkey = commands.add_parser("serve-passkey", help="greedy pass-key answers through MoQAECache, by plan",
                                        parents=[value_group, device])
    serve_passkey.add_argument("--model", required=True, help="byte-level model directory")
    serve_passkey.add_argument("--router", required=True, help="router export")
    serve_passkey.add_argument("--text", required=True, help="haystack text file")
    serve_passkey.add_argument("--windows", type=positive_int, default=50, help="needle windows (default 50)")
    serve_passkey.add_argument("--seq-len", type=positive_int, default=2048, help="bytes per window (default 2048)")
    serve_passkey.add_argument("--seed", type=non_negative_int, default=0, help="needle seed (default 0, as eval --task passkey)")
    serve_passkey.add_argument("--layer-plan", action="append", default=[],
                               help="also a per-layer plan, experts by layer, e.g. int4,int2,int2,int2 (repeatable)")
    serve_passkey.add_argument("--dequantized-attention", action="store_true",
                               help="decode by attending to each layer's cache dequantized, not on the packed units")
    serve_passkey.add_argument("--answers", help="also write every plan's generated tokens per window to this JSON file")

    serve_bench = commands.add_parser("serve-benchmark",
                                      help="MoQAECache against DynamicCache and QuantizedCache: prefill, decode, bytes")
    serve_bench.add_argument("--model", required=True, help="model directory (the pass-key model)")
    serve_bench.add_argument("--router", help="its router export (default: random routers)")
    serve_bench.add_argument("--contexts", type=lambda text: [int(t) for t in text.split(",")], default=[2048, 8192],
                             help="prompt lengths, comma-separated (default 2048,8192)")
    serve_bench.add_argument("--tiny-contexts", type=lambda text: [int(t) for t in text.split(",") if t], default=[32768],
                             help="further prompt lengths for the tiny Llama only, comma-separated (default 32768; empty: none)")
    serve_bench.add_argument("--decode-tokens", type=positive_int, default=160, help="greedy decode steps (default 160)")
    serve_bench.add_argument("--rounds", type=positive_int, default=3, help="rounds of every cache, side by side (default 3)")
    serve_bench.add_argument("--out", help="report to write the Serving section of (e.g. docs/PERFORMANCE.md)")

    plot = commands.add_parser("plot", help="a run directory's loss, bits, λ and throughput against step, as a PNG")
    plot.add_argument("run_dir", help="a moqae-train run directory (metrics.jsonl, eval.jsonl)")
    plot.add_argument("--out", help="image to write (default RUN_DIR/run.png)")

    merge = commands.add_parser("merge", help="join the parts of a parallel dump into one store")
    merge.add_argument("--out", required=True)
    merge.add_argument("parts", nargs="+", help="part directories written with --num-shards/--shard-index")
    return root


def main(argv=None):
    """Parses the command line, runs the command; an error is one line on stderr and exit status 1."""
    args = parser().parse_args(argv)
    try:
        run(args)
    except MoqaeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    return 0


def run(args):
    """Calls the command's library function with the parsed arguments."""
    if args.command == "dump":
        from .calibrate.dump import dump
        count, seconds = dump(
            args.model, args.corpus, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, fraction=args.fraction,
            seed=args.seed, passkey=args.passkey, passkey_seed=args.passkey_seed, answer_weight=args.answer_weight,
            chunk_size=args.chunk_size, value_group=args.value_group, experts=args.experts, sensitivity=args.sensitivity,
            background=args.background, exact_answers=args.exact_answers, router_input=args.router_input, inputs_dtype=args.inputs_dtype, shard_size=args.shard_size, resume=args.resume,
            device=args.device, device_map=args.device_map, model_dtype=args.model_dtype, num_shards=args.num_shards,
            shard_index=args.shard_index)
        if os.environ.get("RANK", "0") == "0":   # under torchrun, rank 0 speaks for the store
            print(f"wrote {count} sequences to {args.out} ({seconds:.3f} s per sequence dumped, after loading the model)")
    elif args.command == "merge":
        from .calibrate.writer import merge
        print(f"merged {merge(args.out, args.parts)} sequences into {args.out}")
    elif args.command == "eval":
        from .evaluate.report import format_report
        from .evaluate.run import evaluate
        report = evaluate(
            args.model, args.text, args.router, tokenizer=args.tokenizer, seq_len=args.seq_len, store=args.store,
            calibration_fraction=args.calibration_fraction, value_group=args.value_group, batch_size=args.batch_size,
            max_windows=args.max_windows, task=args.task, task_seed=args.task_seed, baselines=not args.no_baselines,
            layer_plans=args.layer_plan or [], device=args.device, device_map=args.device_map,
            model_dtype=args.model_dtype, progress=not args.json)
        print(json.dumps(report.as_json()) if args.json else format_report(report))
    elif args.command == "calibrate-bits":
        from .evaluate.budget import calibrate_bits
        price, bits, windows = calibrate_bits(
            args.model, args.text, args.router, args.out, args.target_bits, tokenizer=args.tokenizer, seq_len=args.seq_len,
            max_windows=args.max_windows, task=args.task, task_seed=args.task_seed, value_group=args.value_group,
            batch_size=args.batch_size, device=args.device, model_dtype=args.model_dtype)
        print(f"{args.out}: bits price {price:+.6f} nats/bit, {bits:.4f} payload bits on {windows} windows of {args.text} "
              f"(target {args.target_bits})")
    elif args.command == "generate":
        from .serve.generate import generate
        generate(args.model, args.router, args.prompt_file, max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer,
                 device=args.device, model_dtype=args.model_dtype, value_group=args.value_group)
    elif args.command == "serve-passkey":
        from .serve.passkey import serve_passkey
        summaries = serve_passkey(args.model, args.router, args.text, windows=args.windows, seq_len=args.seq_len,
                                  seed=args.seed, layer_plans=args.layer_plan, value_group=args.value_group,
                                  device=args.device, packed_attention=not args.dequantized_attention)
        if args.answers:
            with open(args.answers, "w") as f:
                json.dump({s["name"]: s["answers"] for s in summaries}, f)
    elif args.command == "pareto":
        from .harness.pareto import pareto
        pareto(args.moqae_train, args.store, args.model, args.text, args.out, config=args.config, tokenizer=args.tokenizer,
               lambdas=args.lambdas, config_runs=args.config_run or [], diagnostics=not args.no_diagnostics,
               max_windows=args.max_windows, task=args.task, task_seed=args.task_seed,
               calibration_fraction=args.calibration_fraction, batch_size=args.batch_size, device=args.device,
               train_args=args.train_arg or [], layer_plans=args.layer_plans)
    elif args.command == "benchmark":
        from .harness.benchmark import benchmark
        benchmark(args.moqae_train, args.work, shape=args.shape, sequences=args.sequences, threads=args.threads,
                  cold=args.cold, out=args.out, disk_only=args.disk_only, append=args.append)
    elif args.command == "sensitivity-benchmark":
        from .harness.sensitivity_benchmark import sensitivity_benchmark
        sensitivity_benchmark(args.model, args.corpus, tokenizer=args.tokenizer, seq_len=args.seq_len,
                              chunk_size=args.chunk_size, experts=args.experts, windows=args.windows, out=args.out)
    elif args.command == "needle-signal":
        from .harness.needle_signal import needle_signal
        needle_signal(args.store, args.corpus, model=args.model, split=tuple(args.split))
    elif args.command == "layer-plan-search":
        from .harness.layer_plan_search import layer_plan_search
        layer_plan_search(args.model, args.text, args.out, experts=args.experts, windows=args.windows,
                          task_seed=args.task_seed, seq_len=args.seq_len)
    elif args.command == "length-benchmark":
        from .harness.length_benchmark import length_benchmark
        length_benchmark(args.model, args.corpus, lengths=args.lengths, tiny_lengths=args.tiny_lengths,
                         windows=args.windows, out=args.out)
    elif args.command == "device-check":
        from .harness.device_check import device_check
        device_check(args.corpus, shape=args.shape, windows=args.windows, seq_len=args.seq_len, device=args.device,
                     out=args.out)
    elif args.command == "serve-benchmark":
        from .harness.serve_benchmark import serve_benchmark
        serve_benchmark(args.model, args.router, contexts=args.contexts, tiny_contexts=args.tiny_contexts, decode_tokens=args.decode_tokens,
                        rounds=args.rounds, out=args.out)
    elif args.command == "soak":
        from .harness.soak import soak
        soak(args.moqae_train, args.config, args.run_dir, overrides=args.set, kills=args.kills,
             write_fraction=args.write_fraction, rename_delay_ms=args.rename_delay_ms, min_seconds=args.min_seconds,
             max_seconds=args.max_seconds, seed=args.seed)
    else:
        from .harness.plot import plot_run
        print(f"wrote {plot_run(args.run_dir, args.out)}")


def console():
    """The `moqae` command an installed package gives (python/pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
