"""moqae-train throughput, disk streaming and memory against plain reads and a PyTorch step, on one
synthetic store; writes a Markdown report (docs/PERFORMANCE.md)."""
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from . import CalibError
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


def run_child(command, env=None):
    """Runs a command; returns (wall seconds, peak RSS in MB)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise CalibError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
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


def train(binary, store, run, threads, env=None):
    """One epoch over the whole store, one router per layer (every layer is read), no validation."""
    shutil.rmtree(run, ignore_errors=True)
    config = run + ".yaml"
    with open(config, "w") as f:
        f.write("# every key is set on the command line\n")
    command = [binary, "--config", config, "--set", f"store={store}", "--set", f"run_dir={run}",
               "--set", "data.calibration_fraction=0.1", "--set", "data.validation_fraction=0",
               "--set", "router.group_size=1", "--set", "train.epochs=1", "--set", "train.eval_every=0",
               "--set", f"train.threads={threads}", "--set", "checkpoint.every_steps=1000000"]
    seconds, rss = run_child(command, env)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    vectors = sum(step["vectors_per_second"] * step["step_seconds"] for step in steps)
    step_seconds = sum(step["step_seconds"] for step in steps)
    return {"wall": seconds, "rss_mb": rss, "steps": len(steps), "step_seconds": step_seconds / len(steps),
            "vectors": vectors, "vectors_per_second": vectors / step_seconds}


def median_run(run, times=3):
    """Runs a training `times` times; returns the run with the median throughput and the (min, max) throughput."""
    runs = sorted((run() for _ in range(times)), key=lambda r: r["vectors_per_second"])
    return runs[times // 2], (runs[0]["vectors_per_second"], runs[-1]["vectors_per_second"])


def run_benchmark(args):
    binary, work = os.path.abspath(args.moqae_train), os.path.abspath(args.work)
    store = os.path.join(work, f"store-{args.shape}-{args.sequences}")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        shutil.rmtree(store, ignore_errors=True)
        print(f"writing a synthetic {args.shape} store of {args.sequences} sequences to {store}", flush=True)
        run_child([binary, "synth", "--shape", args.shape, "--sequences", str(args.sequences), "--out", store])
    files = store_files(store)
    store_bytes = sum(os.path.getsize(f) for f in files)
    with open(os.path.join(store, "manifest.json")) as f:
        manifest = json.load(f)
    model = manifest["model"]
    run = os.path.join(work, "run")

    rows = [] if args.disk_only else page_cache_rows(binary, store, run, files, store_bytes, model["head_dim"] * 2, args.threads)
    if args.cold or args.disk_only:
        if drop_caches():
            cold_cat = cat_seconds(files)
            drop_caches()
            cold_train = train(binary, store, run, args.threads)
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
        f"Written by `python -m moqae_calib benchmark {' '.join(sys.argv[2:])}` (see README, Performance).", "",
        f"- machine: {machine}",
        f"- store: synthetic `{args.shape}` ({model['num_layers']} layers × {model['num_kv_heads']} KV heads × {model['head_dim']} dims × "
        f"{manifest['corpus']['seq_len']} tokens, F16), {len(manifest['sequences'])} sequences, {gb:.2f} GB"
        + (" (larger than RAM)" if store_bytes > ram else ""),
        "- training: one epoch, one router per layer (`router.group_size: 1`, so every byte of the inputs is read), "
        "batch 8, no validation; a token vector is one routed key of one head of one layer",
        "", "| measurement | figure |", "|---|---|", *rows,
    ]
    text = "\n".join(section) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write("\n" + text if args.append else "# Performance\n\n" + text)
        print(f"wrote {args.out}")


def page_cache_rows(binary, store, run, files, store_bytes, vector_bytes, threads):
    """cat, moqae-train (two ways) and the PyTorch step with the store in the page cache: table rows."""
    print("reading the store with cat (warm)", flush=True)
    cat_seconds(files)
    warm_cat = cat_seconds(files)
    cache_rate = store_bytes / vector_bytes / warm_cat
    # This machine's speed drifts from run to run (other tenants), so every warm figure is the median
    # of three, with the range beside it.
    print("training one epoch (warm), three times", flush=True)
    warm, warm_range = median_run(lambda: train(binary, store, run, threads))
    one_thread, one_thread_range = median_run(lambda: train(binary, store, run, 1, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"}))
    print("PyTorch step, three times", flush=True)
    torch_trainer = TorchTrainer(store, group_size=1, calibration_fraction=0.1)
    batch = torch_trainer.sequences[:8]
    torch_trainer.step(batch[:1])
    torch_times = []
    for _ in range(3):
        started = time.perf_counter()
        _, torch_vectors = torch_trainer.step(batch)
        torch_times.append(time.perf_counter() - started)
    del torch_trainer
    torch_seconds = sorted(torch_times)[1]
    torch_rate = torch_vectors / torch_seconds
    return [
        f"| `cat` of the shards, page cache | {warm_cat:.2f} s, {store_bytes / warm_cat / 1e9:.2f} GB/s = {cache_rate / 1e6:.1f} M vectors/s |",
        f"| moqae-train, {threads} workers, page cache (median of 3) | {warm['vectors_per_second'] / 1e6:.2f} M vectors/s "
        f"(range {warm_range[0] / 1e6:.2f}–{warm_range[1] / 1e6:.2f}), {warm['step_seconds']:.3f} s/step, epoch {warm['wall']:.1f} s wall |",
        f"| moqae-train, 1 worker, OpenBLAS 2 threads (median of 3) | {one_thread['vectors_per_second'] / 1e6:.2f} M vectors/s "
        f"(range {one_thread_range[0] / 1e6:.2f}–{one_thread_range[1] / 1e6:.2f}) |",
        f"| PyTorch {__import__('torch').__version__} step (`calibration/moqae_calib/torch_step.py`), same batch size (median of 3) | "
        f"{torch_rate / 1e6:.3f} M vectors/s, {torch_seconds:.2f} s/step (range {min(torch_times):.2f}–{max(torch_times):.2f} s) |",
        f"| moqae-train / PyTorch | **{warm['vectors_per_second'] / torch_rate:.1f}×** (target ≥ 10×) |",
        f"| moqae-train / page-cache read rate | **{100 * warm['vectors_per_second'] / cache_rate:.0f}%** (target ≥ 40%) |",
        f"| peak RSS, moqae-train epoch | {warm['rss_mb']:.0f} MB for a {store_bytes / 1e9:.1f} GB store |",
    ]
