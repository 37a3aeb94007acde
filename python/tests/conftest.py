import os
import shutil
import subprocess
import sys

# Triton (when installed: `make test-triton`) reads this when it is first imported, which torch and quanto
# may do before any test module: its kernels then run in the CPU interpreter (test_triton_attention.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.path.dirname(HERE)
ROOT = os.path.dirname(PYTHON)
REFERENCE_MODEL = os.path.join(ROOT, "models", "wt2-byte-llama")
PASSKEY_MODEL = os.path.join(ROOT, "models", "passkey-byte-llama")
VALID_TXT = os.path.join(ROOT, "models", "wikitext-2", "valid.txt")
sys.path.insert(0, PYTHON)


def run_moqae(*args):
    """Runs `python -m moqae ARGS` and returns the completed process."""
    env = dict(os.environ, PYTHONPATH=PYTHON)
    return subprocess.run([sys.executable, "-m", "moqae", *args], capture_output=True, text=True, env=env)


def train_on(moqae_train, store, run_dir, *settings, max_steps):
    """Runs `moqae-train` on `store` into `run_dir` for `max_steps` steps, with the config defaults and each
    KEY=VALUE of `settings` as `--set`; returns the completed process."""
    config = os.path.join(os.path.dirname(run_dir), "empty.yaml")
    open(config, "w").close()
    overrides = [arg for setting in (f"store={store}", f"run_dir={run_dir}", *settings) for arg in ("--set", setting)]
    return subprocess.run([moqae_train, "--config", config, *overrides, "--max-steps", str(max_steps)],
                          capture_output=True, text=True)


@pytest.fixture(scope="session")
def moqae_train():
    """The built moqae-train (release or debug), building it when neither exists."""
    for config in ("release", "debug"):
        path = os.path.join(ROOT, ".build", config, "moqae-train")
        if os.path.isfile(path):
            return path
    subprocess.run(["swift", "build", "--product", "moqae-train"], cwd=ROOT, check=True)
    return os.path.join(ROOT, ".build", "debug", "moqae-train")


def _save_tiny(directory, config):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig
    return _save_tiny(str(tmp_path_factory.mktemp("tiny-llama")), LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))


@pytest.fixture(scope="session")
def tiny_mqa_llama(tmp_path_factory):
    """Multi-query attention: one KV head for four query heads."""
    from transformers import LlamaConfig
    return _save_tiny(str(tmp_path_factory.mktemp("tiny-mqa-llama")), LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config
    return _save_tiny(str(tmp_path_factory.mktemp("tiny-qwen2")), Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    with open(VALID_TXT, "rb") as f:
        path.write_bytes(f.read(200_000))
    return str(path)


def copy_model(source, destination):
    shutil.copytree(source, destination)
    return destination
