"""Train the second reference model: a byte-level Llama (vocab = 256 byte values, token id = byte) that
does pass-key retrieval in 2,048-byte windows, on CPU, fine-tuned from the first (--init).

Training data (generated on the fly, deterministic in --seed) all come from the haystack/training text
(wikitext-2 valid.txt) and are of three kinds, mixed in every batch:

  * needle windows: exactly the moqae.tasks format (haystack, " The pass key is NNNNN. Remember
    it. " at a random depth, more haystack, " What is the pass key? The pass key is NNNNN.") with a random
    key, at the current sequence length;
  * copy windows: haystack text with one random string (8-32 printable characters) written twice; the
    second copy is the copy target (the classic fast way to grow induction heads);
  * plain windows: haystack text only.

Loss = mean next-byte cross-entropy over all tokens + --target-weight * mean cross-entropy over the
target tokens (the 5 answer digits of needle windows, the second copy in copy windows), so the sparse
retrieval signal is not drowned by the ~2,000 ordinary targets of a window.

The sequence length follows a curriculum (--phases seq:batch:steps,...): cheap short windows first,
where copying is learned, then longer ones up to 2,048 so that positions up to 2,048 are trained.
LR: linear warmup then cosine to 10% over all steps. AdamW, weight decay 0.1, betas 0.9/0.95, clip 1.0.

At the end the model is written with save_pretrained (float32) and the acceptance figures are measured
with the project's own tools (moqae attention, KV hook) and written into TRAINING.json:
pass-key accuracy on test.txt (passkey_windows(test, bytes, 2048, 200, seed=0)) in plain float32 and
with uniform int2 K/V (chunk 0 of 32 tokens kept at 16 bits), and bits/byte on test.txt in 512- and
2,048-byte windows.

Run from the repository root (the full recipe of the shipped model is in its TRAINING.json; it was run as
models/train_passkey_lm.py before the recipe moved into the package):
    python/.venv/bin/python -m moqae.recipes.train_passkey_lm --out models/passkey-byte-llama
"""
import argparse
import json
import math
import os
import random
import sys
import time

# passive OpenMP waiting: with the default (spinning) policy, 2 threads on 2 shared cores run several times
# slower whenever another process is busy; must be set before torch loads libgomp
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODELS = "models"   # the repository's models/, from its root

from moqae.corpus import ByteTokenizer, read_texts, windows  # noqa: E402
from moqae.tasks import answer_correct, passkey_windows  # noqa: E402

# the same needle / question format as moqae.tasks
NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
END = "."

COPY_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def parse_phases(text, default_mix):
    """seq:batch:steps[:needle:dense:copy] per phase (fractions of windows; the rest are plain text)."""
    phases = []
    for part in text.split(","):
        fields = part.split(":")
        seq, batch, steps = (int(x) for x in fields[:3])
        mix = tuple(float(x) for x in fields[3:6]) if len(fields) > 3 else default_mix
        if len(mix) != 3 or sum(mix) > 1:
            raise SystemExit(f"--phases {part}: expected seq:batch:steps[:needle:dense:copy], fractions summing to <= 1")
        phases.append((seq, batch, steps, mix))
    return phases


class Sampler:
    """Training windows from the haystack bytes, deterministic in the seed."""

    def __init__(self, hay, seed):
        self.hay = hay
        self.rng = random.Random(seed)

    def set_mix(self, mix):
        self.needle_frac, self.dense_frac, self.copy_frac = mix

    def filler(self, n):
        offset = self.rng.randrange(len(self.hay) - n + 1)
        return self.hay[offset: offset + n]

    def needle(self, T):
        key = f"{self.rng.randrange(10 ** 5):05d}".encode()
        needle = NEEDLE.format(key=key.decode()).encode()
        question, end = QUESTION.encode(), END.encode()
        room = T - len(needle) - len(question) - len(key) - len(end)
        filler = self.filler(room)
        at = self.rng.randrange(room + 1)
        row = filler[:at] + needle + filler[at:] + question + key + end
        first = T - len(end) - len(key)
        return list(row), list(range(first, first + len(key)))

    def copy(self, T):
        n = self.rng.randint(8, 32)
        s = bytes(self.rng.choice(COPY_CHARS) for _ in range(n))
        s = b" " + s + b" "
        room = T - 2 * len(s)
        filler = self.filler(room)
        a, b = sorted(self.rng.randrange(room + 1) for _ in range(2))
        row = filler[:a] + s + filler[a:b] + s + filler[b:]
        second = a + len(s) + (b - a)
        # targets: the copied characters after the first of the second copy (the first is not predictable)
        return list(row), list(range(second + 2, second + len(s)))

    def dense(self, T):
        """A random string of 8-24 characters written over and over (a space between copies): every
        character after the first copy is a copy target."""
        n = self.rng.randint(8, 24)
        s = b" " + bytes(self.rng.choice(COPY_CHARS) for _ in range(n))
        lead = self.rng.randint(0, T // 4)
        row = self.filler(lead) + s * (T // len(s) + 1)
        return list(row[:T]), list(range(lead + len(s) + 1, T))

    def plain(self, T):
        return list(self.filler(T)), []

    def batch(self, T, B):
        rows, mask = [], torch.zeros(B, T)
        for i in range(B):
            u = self.rng.random()
            kind = 1.0
            if u < self.needle_frac:
                row, targets = self.needle(T)
                kind = 2.0
            elif u < self.needle_frac + self.copy_frac:
                row, targets = self.copy(T)
            elif u < self.needle_frac + self.copy_frac + self.dense_frac:
                row, targets = self.dense(T)
            else:
                row, targets = self.plain(T)
            assert len(row) == T, (len(row), T)
            rows.append(row)
            mask[i, targets] = kind  # 1: copy target, 2: pass-key answer digit
        return torch.tensor(rows, dtype=torch.long), mask


def loss_fn(logits, ids, mask, target_weight, needle_weight=0.0):
    """Mean CE over all next-byte targets + target_weight * mean CE over the marked targets (copy targets
    and answer digits together). With needle_weight > 0 the answer digits get their own term instead:
    + target_weight * mean CE over copy targets + needle_weight * mean CE over answer digits."""
    logp = logits[:, :-1].float()
    nll = F.cross_entropy(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(ids.shape[0], -1)
    m = mask[:, 1:]
    lm = nll.mean()
    if needle_weight <= 0:
        m = (m > 0).float()
        tgt = (nll * m).sum() / m.sum().clamp(min=1)
        return lm + target_weight * tgt, lm.detach(), tgt.detach()
    mc, mn = (m == 1).float(), (m == 2).float()
    copy = (nll * mc).sum() / mc.sum().clamp(min=1)
    needle = (nll * mn).sum() / mn.sum().clamp(min=1)
    return lm + target_weight * copy + needle_weight * needle, lm.detach(), needle.detach()


@torch.no_grad()
def quick_needle_acc(model, hay_text, T, count, seed):
    """Pass-key accuracy on `count` windows of T bytes from `hay_text` (held-out seeds, training format)."""
    model.eval()
    pk = passkey_windows(hay_text, ByteTokenizer(), T, count, seed)
    correct = 0
    for i in range(0, count, 8):
        logits = model(pk.ids[i:i + 8]).logits
        correct += int(answer_correct(logits, pk.ids[i:i + 8], pk.answer_positions[i:i + 8]).sum())
    model.train()
    return correct / count


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, local_files_only=True, attn_implementation="sdpa",
                                                 dtype=torch.float32)
        model.config.max_position_embeddings = args.max_positions
        return model
    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_bias=False, mlp_bias=False,
        initializer_range=0.02)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model_dir, test_path, log):
    """The acceptance figures, with the project's own loading (moqae attention) and KV hook."""
    from transformers import AutoConfig

    from moqae.capture import KVHook
    from moqae.evaluate.plans import Layout, apply_plan
    from moqae.model import load_model, model_shape
    from moqae.experts import parse_expert

    model = load_model(model_dir, "cpu", None, "float32")
    layers, kv_heads, head_dim, _ = model_shape(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    test_text = read_texts([test_path])[0]
    tok = ByteTokenizer()
    results = {}

    def bits(seq):
        w = windows([test_text], tok, seq)
        total, n = 0.0, 0
        for i in range(0, w.shape[0], 8):
            ids = w[i:i + 8]
            logits = model(ids).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="sum").item()
            n += ids[:, 1:].numel()
        return total / n / math.log(2), int(w.shape[0])

    results["eval_bits_per_byte_test_512"], results["eval_windows_512"] = bits(512)
    log(f"eval bits/byte test 512: {results['eval_bits_per_byte_test_512']:.4f}")
    results["eval_bits_per_byte_test_2048"], results["eval_windows_2048"] = bits(2048)
    log(f"eval bits/byte test 2048: {results['eval_bits_per_byte_test_2048']:.4f}")

    pk = passkey_windows(test_text, tok, 2048, 200, seed=0)
    layout = Layout(2048, 32, 1, layers, kv_heads, head_dim, head_dim)
    int2 = [parse_expert("int2")]
    hook = KVHook(transform=lambda layer, k, v: apply_plan(k, v, None, int2, layout, layer))
    fp, q = torch.zeros(200, dtype=torch.bool), torch.zeros(200, dtype=torch.bool)
    for i in range(0, 200, 8):
        ids, ans = pk.ids[i:i + 8], pk.answer_positions[i:i + 8]
        fp[i:i + 8] = answer_correct(model(ids).logits, ids, ans)
        with hook.active():
            q[i:i + 8] = answer_correct(model(ids).logits, ids, ans)
    results["passkey_test_2048_200_seed0_fp_correct"] = int(fp.sum())
    results["passkey_test_2048_200_seed0_int2_correct"] = int(q.sum())
    results["passkey_fp_accuracy"] = int(fp.sum()) / 200
    results["passkey_int2_accuracy"] = int(q.sum()) / 200
    # accuracy by needle depth (fifths of the window), plain float32
    results["passkey_fp_correct_by_depth_fifth"] = [int(fp[j * 40:(j + 1) * 40].sum()) for j in range(5)]
    log(f"eval pass-key fp {int(fp.sum())}/200, int2 {int(q.sum())}/200, by depth {results['passkey_fp_correct_by_depth_fifth']}")
    results["acceptance"] = {
        "fp_accuracy_ge_0.90": results["passkey_fp_accuracy"] >= 0.90,
        "int2_at_most_half_fp": results["passkey_int2_accuracy"] <= results["passkey_fp_accuracy"] / 2,
        "bits_per_byte_512_le_2.196": results["eval_bits_per_byte_test_512"] <= 2.196,
    }
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ref = os.path.join(MODELS, "wikitext-2")
    p.add_argument("--train", default=os.path.join(ref, "valid.txt"))
    p.add_argument("--test", default=os.path.join(ref, "test.txt"))
    p.add_argument("--out", default=os.path.join(MODELS, "passkey-byte-llama"))
    p.add_argument("--work", default=None, help="checkpoint folder (default: OUT/../.. checkpoints not used)")
    p.add_argument("--phases", default="256:32:600,512:16:500,2048:4:500",
                   help="curriculum, comma-separated seq:batch:steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--needle-frac", type=float, default=0.4)
    p.add_argument("--copy-frac", type=float, default=0.3)
    p.add_argument("--dense-frac", type=float, default=0.0)
    p.add_argument("--target-weight", type=float, default=1.0)
    p.add_argument("--needle-weight", type=float, default=0.0,
                   help="> 0: a separate loss term for the pass-key answer digits (logged as 'target')")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=672)
    p.add_argument("--rope-theta", type=float, default=1e4)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from this model directory instead of a fresh model")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-every", type=int, default=100, help="quick held-out needle accuracy every N steps")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--no-eval", action="store_true", help="skip the acceptance evaluation at the end")
    p.add_argument("--eval-only", action="store_true", help="only evaluate OUT and update its TRAINING.json")
    args = p.parse_args()

    torch.set_num_threads(2)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    command = "PYTHONPATH=python python/.venv/bin/python models/train_passkey_lm.py " + \
        " ".join(sys.argv[1:])

    if args.eval_only:
        results = evaluate(args.out, args.test, log)
        path = os.path.join(args.out, "TRAINING.json")
        record = json.load(open(path)) if os.path.exists(path) else {}
        record.update(results)
        json.dump(record, open(path, "w"), indent=1)
        log(json.dumps(results))
        return

    torch.manual_seed(args.seed)
    phases = parse_phases(args.phases, (args.needle_frac, args.dense_frac, args.copy_frac))
    total = sum(p[2] for p in phases)
    hay_text = read_texts([args.train])[0]
    hay = hay_text.encode("utf-8")
    sampler = Sampler(hay, args.seed)
    model = make_model(args)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    log(f"params {params}, phases {phases}, total steps {total}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))

    probes = []
    step = 0
    lm_avg = tgt_avg = None
    for seq, batch, steps, mix in phases:
        sampler.set_mix(mix)
        log(f"phase seq {seq} batch {batch} steps {steps} mix needle/dense/copy {mix}")
        for _ in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids, mask = sampler.batch(seq, batch)
            logits = model(ids).logits
            loss, lm, tgt = loss_fn(logits, ids, mask, args.target_weight, args.needle_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            lm_avg = lm.item() if lm_avg is None else 0.9 * lm_avg + 0.1 * lm.item()
            tgt_avg = tgt.item() if tgt_avg is None else 0.9 * tgt_avg + 0.1 * tgt.item()
            if step % args.log_every == 0:
                log(f"step {step}/{total} seq {seq} lr {lr_at(step - 1):.2e} lm {lm_avg:.3f} "
                    f"({lm_avg / math.log(2):.3f} bits/byte) target {tgt_avg:.3f}")
            if args.probe_every and step % args.probe_every == 0:
                acc = quick_needle_acc(model, hay_text, seq, 32, seed=10_000 + step)
                probes.append({"step": step, "seq": seq, "needle_acc_valid_32": acc})
                log(f"probe step {step}: needle accuracy at {seq} bytes (valid, 32 windows) {acc:.3f}")
            if args.work and args.ckpt_every and step % args.ckpt_every == 0:
                os.makedirs(args.work, exist_ok=True)
                model.save_pretrained(os.path.join(args.work, "last"))
                log(f"checkpoint step {step} -> {args.work}/last")
    wall = time.time() - t0
    log(f"training done in {wall / 60:.1f} min")

    os.makedirs(args.out, exist_ok=True)
    model.config.max_position_embeddings = args.max_positions
    model.save_pretrained(args.out)
    record = {
        "train_file": os.path.basename(args.train),
        "eval_file": os.path.basename(args.test),
        "recipe": command,
        "steps": total,
        "curriculum": [{"seq": s, "batch": b, "steps": n, "needle_windows": m[0], "dense_copy_windows": m[1],
                        "copy_windows": m[2], "plain_windows": round(1 - sum(m), 6)} for s, b, n, m in phases],
        "tokens_trained": sum(s * b * n for s, b, n, _ in phases),
        "seed": args.seed,
        "init": args.init or "fresh (random init, initializer_range 0.02)",
        "params": params,
        "tokenizer": "raw UTF-8 bytes (vocab 256), token id = byte",
        "architecture": {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                         "heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
                         "head_dim": model.config.head_dim, "ffn": model.config.intermediate_size,
                         "rope_theta": model.config.rope_parameters["rope_theta"],
                         "max_position_embeddings": model.config.max_position_embeddings},
        "target_weight": args.target_weight,
        "needle_weight": args.needle_weight,
        "optimizer": f"AdamW lr {args.lr} warmup {args.warmup} cosine to {args.min_lr_frac} of peak, wd {args.wd}, "
                     "betas 0.9/0.95, grad clip 1.0",
        "final_train_lm_bits_per_byte_ema": lm_avg / math.log(2),
        "final_train_target_nll_ema": tgt_avg,
        "probes": probes,
        "train_wall_seconds": round(wall, 1),
        "torch": torch.__version__, "threads": 2, "device": "cpu",
    }
    json.dump(record, open(os.path.join(args.out, "TRAINING.json"), "w"), indent=1)
    log(f"wrote {args.out}")
    if not args.no_eval:
        results = evaluate(args.out, args.test, log)
        record.update(results)
        record["eval_wall_seconds"] = round(time.time() - t0 - wall, 1)
        json.dump(record, open(os.path.join(args.out, "TRAINING.json"), "w"), indent=1)
        log(json.dumps(results))


if __name__ == "__main__":
    main()
