"""Kill soak: trains a config to the end while stopping moqae-train again and again, resuming with
`--resume latest` after each stop, and checks that the final checkpoint, the export and both logs
(metrics.jsonl and eval.jsonl, the final report included) are identical to those of an uninterrupted run.

Each stop is a SIGKILL, a SIGINT or a SIGTERM (the last two let the trainer finish its step and
checkpoint), at one of four moments: a random one, during a checkpoint write, right after the start
(before the first periodic checkpoint) or once the last step is logged (during the final report)."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import time

from .. import MoqaeError

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
        raise MoqaeError(f"{run_dir}: no checkpoint")
    return paths[-1]


MOMENTS = ("at a random moment", "during a checkpoint write", "at the start", "during the final report")


def logged_steps(run_dir):
    """Lines in a run's metrics.jsonl (one per finished step)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


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


def soak(moqae_train: str, config: str, run_dir: str, *, overrides: list[str] = (), kills: int = 20,
         write_fraction: float = 0.5, rename_delay_ms: int = 100, min_seconds: float = 0.05, max_seconds: float = 1.0,
         seed: int = 0) -> int:
    """Stops and resumes `config`'s run `kills` times (at least one round); raises unless every round ends
    identical to an uninterrupted run. Returns the rounds."""
    binary, run_dir = os.path.abspath(moqae_train), os.path.abspath(run_dir)
    reference = run_dir + ".reference"
    rng = random.Random(seed)
    env = {**os.environ, "MOQAE_TEST_DELAY_BEFORE_RENAME_MS": str(rename_delay_ms)}

    # The reference runs in the soak's own run_dir (the config stored in checkpoints names it), then moves aside.
    for path in (run_dir, reference):
        shutil.rmtree(path, ignore_errors=True)
    print(f"uninterrupted reference run in {run_dir}", flush=True)
    subprocess.run(train_command(binary, config, run_dir, overrides, resume=False), check=True, capture_output=True)
    export(binary, run_dir)
    os.rename(run_dir, reference)

    with open(os.path.join(reference, "metrics.jsonl")) as f:
        total_steps = sum(1 for _ in f)

    # Rounds of stop-and-resume until the run finishes; another round from scratch while fewer than
    # `kills` stops have happened. Every life after a round's first resumes with --resume latest, even
    # one stopped before anything was written. Every finished round must equal the reference.
    stops, lives, rounds = 0, 0, 0
    tally = {}
    graceful = {signal.SIGINT: 130, signal.SIGTERM: 143}
    while rounds == 0 or stops < kills:
        rounds += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        first_life = True
        while True:
            lives += 1
            process = subprocess.Popen(train_command(binary, config, run_dir, overrides, resume=not first_life), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            first_life = False
            moment = rng.choices(MOMENTS, weights=(1 - write_fraction, write_fraction, 0.15, 0.15))[0]
            stop = rng.choice((signal.SIGKILL, signal.SIGKILL, signal.SIGINT, signal.SIGTERM))
            deadline = time.monotonic() + (0.0 if moment == "at the start" else rng.uniform(min_seconds, max_seconds))
            stopped = False
            while stops < kills and process.poll() is None:
                if (moment == "during a checkpoint write" and glob.glob(os.path.join(run_dir, "*.tmp-*"))) \
                        or (moment in ("at a random moment", "at the start") and time.monotonic() >= deadline) \
                        or (moment == "during the final report" and logged_steps(run_dir) >= total_steps):
                    process.send_signal(stop)
                    stopped = True
                    break
                time.sleep(0.002)
            _, stderr = process.communicate()
            if stopped and process.returncode in (-stop, graceful.get(stop), 0):   # -stop: before its handler was set
                stops += 1
                label = f"{signal.Signals(stop).name} {moment}"
                tally[label] = tally.get(label, 0) + 1
                print(f"stop {stops}/{kills}: {label} (exit {process.returncode})", flush=True)
                if process.returncode == 0:
                    break          # the signal came as the run finished
            elif process.returncode != 0:
                raise MoqaeError(f"moqae-train failed (exit {process.returncode}) after {stops} stops: {stderr.decode()[-2000:]}")
            else:
                break
        export(binary, run_dir)
        problems = compare_runs(reference, run_dir)
        problems += [f"{os.path.basename(p)} left behind" for p in glob.glob(os.path.join(run_dir, "*.tmp-*"))]
        if problems:
            raise MoqaeError(f"round {rounds}, after {stops} kills: the resumed run differs from the uninterrupted one: " + "; ".join(problems))
        print(f"round {rounds} finished: final checkpoint, export and logs identical to the uninterrupted run", flush=True)
    print(f"{stops} stops over {lives} runs in {rounds} round(s): every round identical to the uninterrupted run")
    for label, count in sorted(tally.items()):
        print(f"  {count} × {label}")
    return rounds
