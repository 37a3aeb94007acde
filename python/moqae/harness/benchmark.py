"""moqae-train throughput, disk streaming and memory against plain reads and a PyTorch step, on one
synthetic store; writes a Markdown report (docs/PERFORMANCE.md)."""
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from .. import MoqaeError
from ..store import MANIFEST, read_manifest
from .report import write_section
from .torch_step import TorchTrainer

VECTOR_BYTES = {"f16": 2, "bf16": 2, "f32": 4}


# Runs argv[1:] from a fresh, small interpreter and prints its peak RSS (KB). A child's getrusage peak
# starts from the peak of the process it was forked from, so measuring directly from this process
# (torch loaded, gigabytes after the PyTorch step) would report this process's peak instead.
PEAK_RSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(command):
    """Runs a command; returns (wall seconds, peak RSS in MB)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise MoqaeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return seconds, int(result.stdout.split()[-1]) / 1024


def drop_caches():
    """Empties the page cache (needs root); False where the machine does not allow it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def store_files(store):
    return sorted(os.path.join(store, name) for name in os.listdir(store) if name.endswith(".safetensors"))


def cat_seconds(files):
    started = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# Router variants whose throughput is stated beside the paper router's: config overrides.
VARIANTS = {"mean pooling": ["router.pooling=mean"], "max pooling": ["router.pooling=max"],
            "hidden width 16": ["router.hidden_width=16"]}


def train(binary, store, run, threads, overrides=()):
    """One epoch over the whole store, one router per layer (every layer is read), no validation;
    `overrides` are further `--set` values (a router variant)."""
    shutil.rmtree(run, ignore_errors=True)
    config = run + ".yaml"
    with open(config, "w") as f:
        f.write("# every key is set on the command line\n")
    command = [binary, "--config", config, "--set", f"store={store}", "--set", f"run_dir={run}",
               "--set", "data.calibration_fraction=0.1", "--set", "data.validation_fraction=0",
               "--set", "router.group_size=1", "--set", "train.epochs=1", "--set", "train.eval_every=0",
               "--set", f"train.threads={threads}", "--set", "checkpoint.every_steps=1000000"]
    for override in overrides:
        command += ["--set", override]
    seconds, rss = run_child(command)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    vectors = sum(step["vectors_per_second"] * step["step_seconds"] for step in steps)
    step_seconds = sum(step["step_seconds"] for step in steps)
    return {"wall": seconds, "rss_mb": rss, "steps": len(steps), "step_seconds": step_seconds / len(steps),
            "vectors": vectors, "vectors_per_second": vectors / step_seconds}


def benchmark(moqae_train: str, work: str, *, shape: str = "llama2-7b", sequences: int = 16,
              threads: int | None = os.cpu_count(), cold: bool = False, out: str | None = None, disk_only: bool = False,
              append: bool = False) -> str:
    """Measures moqae-train on a synthetic store in `work` (made when absent); prints the report, writes
    its section of `out` when given, and returns it."""
    binary, work = os.path.abspath(moqae_train), os.path.abspath(work)
    store = os.path.join(work, f"store-{shape}-{sequences}")
    if not os.path.exists(os.path.join(store, MANIFEST)):
        shutil.rmtree(store, ignore_errors=True)
        print(f"writing a synthetic {shape} store of {sequences} sequences to {store}", flush=True)
        run_child([binary, "synth", "--shape", shape, "--sequences", str(sequences), "--out", store])
    manifest = read_manifest(store)
    files = store_files(store)
    store_bytes = sum(os.path.getsize(f) for f in files)
    model = manifest.model
    run = os.path.join(work, "run")

    rows = [] if disk_only else page_cache_rows(binary, store, run, files, store_bytes, model.head_dim * 2, threads)
    if cold or disk_only:
        if drop_caches():
            cold_cat = cat_seconds(files)
            drop_caches()
            cold_train = train(binary, store, run, threads)
            rows += [
                f"| `cat` of the shards, cold cache | {cold_cat:.1f} s, {store_bytes / cold_cat / 1e9:.2f} GB/s |",
                f"| moqae-train epoch, cold cache | {cold_train['wall']:.1f} s wall = **{cold_train['wall'] / cold_cat:.2f}×** the cold `cat` "
                f"(target ≤ 1.3×); peak RSS {cold_train['rss_mb']:.0f} MB for a {store_bytes / 1e9:.1f} GB store |",
            ]
        else:
            print("cannot drop the page cache here (needs root): no cold figures", flush=True)

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {ram / 2**30:.0f} GiB RAM"
    try:
        with open("/proc/cpuinfo") as f:
            machine = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name")) + "; " + machine
    except (OSError, StopIteration):
        pass
    gb = store_bytes / 1e9
    section = [
        f"Written by `python -m moqae benchmark {' '.join(sys.argv[2:])}` (see docs/PERFORMANCE.md, Overview).", "",
        f"- machine: {machine}",
        f"- store: synthetic `{shape}` ({model.num_layers} layers × {model.num_kv_heads} KV heads × {model.head_dim} dims × "
        f"{manifest.seq_len} tokens, F16), {len(manifest.sequences)} sequences, {gb:.2f} GB"
        + (" (larger than RAM)" if store_bytes > ram else ""),
        "- training: one epoch, one router per layer (`router.group_size: 1`, so every byte of the inputs is read), "
        "batch 8, no validation; a token vector is one routed key of one head of one layer",
        "", "| measurement | figure |", "|---|---|", *rows,
    ]
    text = "\n".join(section) + "\n"
    print(text)
    if out:
        write_section(out, "Performance", "Training: throughput, streaming from disk and memory", text, append=append)
        print(f"wrote {out}")
    return text


def page_cache_rows(binary, store, run, files, store_bytes, vector_bytes, threads):
    """cat, moqae-train (two ways) and the PyTorch step with the store in the page cache: table rows.

    This machine's speed drifts from minute to minute (other tenants), so the ratios are measured in
    three rounds of cat, moqae-train and the PyTorch step back to back, and each figure is the median
    of its three, with the range beside it.
    """
    cat_seconds(files)
    torch_trainer = TorchTrainer(store, group_size=1, calibration_fraction=0.1)
    batch = torch_trainer.sequences[:8]
    torch_trainer.step(batch[:1])
    rounds = []
    for number in range(1, 4):
        print(f"round {number}/3: cat, one moqae-train epoch, one PyTorch step", flush=True)
        cat_rate = store_bytes / vector_bytes / cat_seconds(files)
        trained = train(binary, store, run, threads)
        started = time.perf_counter()
        _, torch_vectors = torch_trainer.step(batch)
        torch_rate = torch_vectors / (time.perf_counter() - started)
        rounds.append({"cat": cat_rate, "train": trained["vectors_per_second"], "torch": torch_rate, "run": trained,
                       "vs_torch": trained["vectors_per_second"] / torch_rate, "vs_cat": trained["vectors_per_second"] / cat_rate})
    del torch_trainer
    print("one worker, three epochs", flush=True)
    one_worker = [train(binary, store, run, 1)["vectors_per_second"] for _ in range(3)]
    variants = {}
    for name, overrides in VARIANTS.items():
        print(f"{name}: three rounds of cat, one epoch, one epoch of the paper router", flush=True)
        variants[name] = []
        for _ in range(3):
            cat_rate = store_bytes / vector_bytes / cat_seconds(files)
            rate = train(binary, store, run, threads, overrides)["vectors_per_second"]
            paper = train(binary, store, run, threads)["vectors_per_second"]
            variants[name].append({"rate": rate, "vs_cat": rate / cat_rate, "vs_paper": rate / paper})

    def figure(values, scale=1e-6, digits=2):
        values = sorted(values)
        return f"{values[1] * scale:.{digits}f} (range {values[0] * scale:.{digits}f}–{values[2] * scale:.{digits}f})"

    warm = sorted(rounds, key=lambda r: r["train"])[1]["run"]
    return [
        f"| `cat` of the shards, page cache | {figure([r['cat'] for r in rounds], digits=1)} M vectors/s |",
        f"| moqae-train, {threads} workers, page cache | {figure([r['train'] for r in rounds])} M vectors/s; "
        f"median epoch {warm['step_seconds']:.3f} s/step, {warm['wall']:.1f} s wall |",
        f"| moqae-train, 1 worker | {figure(one_worker)} M vectors/s |",
        f"| PyTorch {__import__('torch').__version__} step (`python/moqae/harness/torch_step.py`), same batch | "
        f"{figure([r['torch'] for r in rounds], digits=3)} M vectors/s |",
        f"| moqae-train / PyTorch, per round | **{figure([r['vs_torch'] for r in rounds], scale=1, digits=1)}×** (target ≥ 10×) |",
        f"| moqae-train / page-cache read rate, per round | **{figure([100 * r['vs_cat'] for r in rounds], scale=1, digits=0)}%** (target ≥ 80%) |",
        f"| peak RSS, moqae-train epoch | {warm['rss_mb']:.0f} MB for a {store_bytes / 1e9:.1f} GB store |",
    ] + [
        f"| moqae-train, {name} (`{' '.join(VARIANTS[name])}`), {threads} workers | {figure([r['rate'] for r in rows])} M vectors/s = "
        f"{figure([100 * r['vs_cat'] for r in rows], scale=1, digits=0)}% of the page-cache read rate, "
        f"{figure([r['vs_paper'] for r in rows], scale=1, digits=2)}× the paper router's in the same round |"
        for name, rows in variants.items()
    ]
