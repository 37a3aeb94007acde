"""`plot`: a run directory's logs as one picture, RUN_DIR/run.png: training loss, average bits (per
batch, and the router's at each validation report), λ and throughput against step."""
import os

from .. import MoqaeError
from ..corpus import read_jsonl


def read_log(path, required):
    """The records of a JSON-lines log; each must be an object with a number for every `required` key."""
    return [record for _, record in read_jsonl(path, required, kind=(int, float))]


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Writes the picture of `run_dir` (default RUN_DIR/run.png); returns its path."""
    metrics = read_log(os.path.join(run_dir, "metrics.jsonl"), ("step", "loss", "avg_bits", "lambda", "vectors_per_second"))
    if not metrics:
        raise MoqaeError(f"{os.path.join(run_dir, 'metrics.jsonl')}: no steps logged yet")
    evaluation_path = os.path.join(run_dir, "eval.jsonl")
    reports = read_log(evaluation_path, ("step",)) if os.path.exists(evaluation_path) else []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [(axes[0, 0], "loss", "training loss"), (axes[0, 1], "avg_bits", "average payload bits (batch)"),
              (axes[1, 0], "lambda", "λ"), (axes[1, 1], "vectors_per_second", "router vectors per second")]
    for axis, key, label in panels:
        axis.plot(steps, [m[key] for m in metrics], linewidth=0.8)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    validated = [r for r in reports if isinstance(r.get("router"), dict) and "payload_bits" in r["router"]]
    if validated:
        axes[0, 1].plot([r["step"] for r in validated], [r["router"]["payload_bits"] for r in validated], "o",
                        label="router on the validation split")
        axes[0, 1].legend()
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.suptitle(f"{os.path.basename(os.path.normpath(run_dir))}: {len(metrics)} steps, {len(reports)} validation reports")
    figure.tight_layout()
    out = out or os.path.join(run_dir, "run.png")
    temporary = f"{out}.tmp-{os.getpid()}.png"
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, out)
    return out
