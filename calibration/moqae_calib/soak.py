"""Kill soak: trains a config to the end while SIGKILLing moqae-train at random moments, resuming with
`--resume latest` after each kill, and checks that the final checkpoint, the export and the logs are
identical to those of an uninterrupted run."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import time

from . import CalibError

# Log fields that measure time rather than training; everything else in a log line must match.
TIMING_FIELDS = {"step_seconds", "vectors_per_second"}


def train_command(binary, config, run_dir, overrides, resume):
    command = [binary, "train", "--config", config, "--set", f"run_dir={run_dir}"]
    for override in overrides:
        command += ["--set", override]
    return command + (["--resume", "latest"] if resume else [])


def export(binary, run_dir):
    subprocess.run([binary, "export", run_dir, "--out", os.path.join(run_dir, "router.bin")], check=True, capture_output=True)


def final_checkpoint(run_dir):
    paths = sorted(glob.glob(os.path.join(run_dir, "ckpt-*.safetensors")))
    if not paths:
        raise CalibError(f"{run_dir}: no checkpoint")
    return paths[-1]


def log_records(path):
    """A log's lines without their timing fields."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in f]


def compare_runs(reference, soaked):
    """Differences between two finished run directories (empty when identical)."""
    problems = []
    for name in (os.path.basename(final_checkpoint(reference)), "router.bin"):
        with open(os.path.join(reference, name), "rb") as a, open(os.path.join(soaked, name), "rb") as b:
            if a.read() != b.read():
                problems.append(f"{name} differs")
    for name in ("metrics.jsonl", "eval.jsonl"):
        if log_records(os.path.join(reference, name)) != log_records(os.path.join(soaked, name)):
            problems.append(f"{name} differs (timing fields aside)")
    return problems


def run_soak(args):
    binary, run_dir = os.path.abspath(args.moqae_train), os.path.abspath(args.run_dir)
    reference = run_dir + ".reference"
    rng = random.Random(args.seed)
    env = {**os.environ, "MOQAE_TEST_DELAY_BEFORE_RENAME_MS": str(args.rename_delay_ms)}

    # The reference runs in the soak's own run_dir (the config stored in checkpoints names it), then moves aside.
    for path in (run_dir, reference):
        shutil.rmtree(path, ignore_errors=True)
    print(f"uninterrupted reference run in {run_dir}", flush=True)
    subprocess.run(train_command(binary, args.config, run_dir, args.set, resume=False), check=True, capture_output=True)
    export(binary, run_dir)
    os.rename(run_dir, reference)

    # Rounds of kill-and-resume until the run finishes; another round from scratch while fewer than
    # `kills` kills have happened. Every finished round must equal the reference.
    kills, kills_in_write, lives, rounds = 0, 0, 0, 0
    while rounds == 0 or kills < args.kills:
        rounds += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        while True:
            lives += 1
            resume = bool(glob.glob(os.path.join(run_dir, "ckpt-*.safetensors")))
            if not resume:
                shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint: start again
            process = subprocess.Popen(train_command(binary, args.config, run_dir, args.set, resume), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            in_write = rng.random() < args.write_fraction
            deadline = time.monotonic() + rng.uniform(args.min_seconds, args.max_seconds)
            killed = False
            while kills < args.kills and process.poll() is None:
                writing = bool(glob.glob(os.path.join(run_dir, "*.tmp-*")))
                if (in_write and writing) or (not in_write and time.monotonic() >= deadline):
                    process.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.002)
            _, stderr = process.communicate()
            if killed:
                kills += 1
                kills_in_write += in_write
                print(f"kill {kills}/{args.kills} ({'during a checkpoint write' if in_write else 'at a random moment'})", flush=True)
            elif process.returncode != 0:
                raise CalibError(f"moqae-train failed after {kills} kills: {stderr.decode()[-2000:]}")
            else:
                break
        export(binary, run_dir)
        problems = compare_runs(reference, run_dir)
        problems += [f"{os.path.basename(p)} left behind" for p in glob.glob(os.path.join(run_dir, "*.tmp-*"))]
        if problems:
            raise CalibError(f"round {rounds}, after {kills} kills: the resumed run differs from the uninterrupted one: " + "; ".join(problems))
        print(f"round {rounds} finished: final checkpoint, export and logs identical to the uninterrupted run", flush=True)
    print(f"{kills} kills ({kills_in_write} during checkpoint writes) over {lives} runs in {rounds} round(s): every round identical to the uninterrupted run")
