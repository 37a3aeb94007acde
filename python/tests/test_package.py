"""The package: one version for both tools, routers that travel with their model directory, and a wheel."""
import os
import re
import shutil
import subprocess
import sys

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


def run_the_readmes_serving_example(tmp_path, env=None):
    """The README's Python examples (one prompt, then a padded batch) as written, in a directory holding `my-model` (the
    pass-key model with a random router exported into it, for the trained one) and `prompt.txt`."""
    from conftest import PASSKEY_MODEL
    from moqae.router import random_export, write_export
    readme = open(os.path.join(ROOT, "README.md")).read()
    serving = re.search(r"## Serving(.*?)\n## ", readme, flags=re.DOTALL).group(1)
    example = "".join(re.findall(r"```python\n(.*?)```", serving, flags=re.DOTALL))
    assert example.startswith("import torch\n") and "from moqae import MoQAECache\n" in example and "sys.path" not in example
    shutil.copytree(PASSKEY_MODEL, tmp_path / "my-model")
    write_export(str(tmp_path / "my-model" / "moqae-router.bin"), random_export(4, 2, 64, scale=0.5))
    (tmp_path / "prompt.txt").write_text("The pass key is 52817. Remember it. " * 3 + "What is the pass key? The pass key is")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"KV cache: [\d,]+ bytes, [\d,]+ at 16 bits", result.stdout)
    assert re.search(r"\[b'.*', b'.*'\] [\d,]+ bytes", result.stdout)       # the batch's two continuations


def test_the_readmes_serving_example_runs(tmp_path):
    run_the_readmes_serving_example(tmp_path)


def test_a_wheel_builds_and_its_moqae_command_runs(tmp_path):
    """`pip wheel ./python` builds a wheel holding the kernel's source; installed (without dependencies: this venv
    has them), its `moqae` console script prints the version and every subcommand, and the README's serving example
    runs on it."""
    import zipfile
    python = tmp_path / "source"        # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(os.path.join(ROOT, "python", "moqae"), python / "moqae", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "python", "pyproject.toml"), python)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(python), "--no-deps", "-q", "-w", str(tmp_path / "wheels")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").iterdir()
    assert wheel.name == f"moqae-{__version__}-py3-none-any.whl"
    assert "moqae/serve/kernels/packed_attention.cpp" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "installed"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    version = subprocess.run([str(target / "bin" / "moqae"), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout == f"{__version__}\n", version.stderr
    usage = subprocess.run([str(target / "bin" / "moqae"), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert usage.returncode == 0 and all(command in usage.stdout for command in ("dump", "eval", "generate", "serve-benchmark"))
    where = subprocess.run([sys.executable, "-c", "import moqae; print(moqae.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(target)), where.stdout     # the wheel's moqae, not the checkout's
    run_the_readmes_serving_example(tmp_path / "example", env=dict(env, TORCH_EXTENSIONS_DIR=str(tmp_path / "kernels")))
