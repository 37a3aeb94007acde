"""C++ kernels of the serving cache, built with torch's extension loader at first use (ninja from the
interpreter's environment, the system's g++) into `TORCH_EXTENSIONS_DIR`, the checkout's `.build-kernels/`
when the package runs from one, or else torch's default (~/.cache/torch_extensions)."""
import os
import sys

from ... import MoqaeError

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.normpath(os.path.join(HERE, "..", "..", "..", ".."))   # python/moqae/serve/kernels → the repository
_loaded = {}


def build_directory(name):
    """Where extension `name` builds: under TORCH_EXTENSIONS_DIR or the checkout's .build-kernels; None (torch's
    default) for an installed package."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root and os.path.isfile(os.path.join(CHECKOUT, "Package.swift")):
        root = os.path.join(CHECKOUT, ".build-kernels")
    if not root:
        return None
    build = os.path.join(os.path.abspath(root), name)
    os.makedirs(build, exist_ok=True)
    return build


def packed_attention(portable=False):
    """The packed-attention extension (packed_attention.cpp), built on first use; `portable`: a build with
    only the baseline instruction set (for tests)."""
    name = "packed_attention_portable" if portable else "packed_attention"
    if name not in _loaded:
        from torch.utils import cpp_extension
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")   # the venv's ninja
        try:
            _loaded[name] = cpp_extension.load(
                f"moqae_{name}", [os.path.join(HERE, "packed_attention.cpp")], build_directory=build_directory(name),
                extra_cflags=["-O3", "-fopenmp-simd"] + (["-DMOQAE_PORTABLE"] if portable else []), verbose=False)
        except (RuntimeError, OSError, ImportError) as error:
            raise MoqaeError(f"{os.path.join(HERE, 'packed_attention.cpp')}: cannot build the packed-attention kernel "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    return _loaded[name]
