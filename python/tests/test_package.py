"""The project's version: one for both tools."""
import os
import re
import subprocess

from conftest import ROOT, run_moqae
from moqae import __version__


def test_moqae_and_moqae_train_print_the_same_version(moqae_train):
    with open(os.path.join(ROOT, "Sources", "moqae-train", "Version.swift")) as f:
        swift = re.search(r'let projectVersion = "([^"]+)"', f.read()).group(1)
    assert swift == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    python = run_moqae("--version")
    trainer = subprocess.run([moqae_train, "--version"], capture_output=True, text=True)
    assert python.returncode == trainer.returncode == 0
    assert python.stdout == trainer.stdout == f"{__version__}\n"


def test_a_router_travels_with_its_model_directory(tmp_path):
    """`moqae-train export --into DIR` writes DIR/moqae-router.bin; `MoQAECache.from_pretrained` and `moqae generate`
    without --router find it; a directory without one is refused in one line."""
    import shutil
    import torch
    from conftest import PASSKEY_MODEL
    from moqae import MoqaeError
    from moqae.model import load_model, model_shape
    from moqae.router import random_export, write_export
    from moqae.serve.cache import MoQAECache
    import pytest
    model_dir = str(tmp_path / "model")
    shutil.copytree(PASSKEY_MODEL, model_dir)
    model = load_model(model_dir, "cpu", None, "float32")
    with pytest.raises(MoqaeError, match=r"moqae-router.bin: no router export here \(write one with `moqae-train export RUN --into"):
        MoQAECache.from_pretrained(model)
    export = random_export(*model_shape(model.config)[:3], scale=2.0)
    write_export(str(tmp_path / "model" / "moqae-router.bin"), export)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    caches = [MoQAECache.from_pretrained(model), MoQAECache.from_export(export, model)]
    with torch.no_grad():
        for cache in caches:
            model(ids, past_key_values=cache, use_cache=True)
    assert all(torch.equal(a.chunk_experts(), b.chunk_experts()) for a, b in zip(caches[0].layers, caches[1].layers))
    (tmp_path / "prompt.txt").write_text("The pass key is 12345. What is the pass key? The pass key is")
    generated = run_moqae("generate", "--model", model_dir, "--prompt-file", str(tmp_path / "prompt.txt"),
                          "--tokenizer", "bytes", "--max-new-tokens", "4", "--device", "cpu")
    assert generated.returncode == 0 and "KV cache:" in generated.stdout, generated.stderr
