"""How the CUDA reference's extension is built: its sources and flags, in one place.

Two builds read this file:
- ahead of time, by setup.py (`pip install -e . --no-build-isolation`, where the build sees
  torch): the extension `flashtile._cuda_reference`. setup.py loads this file by its path,
  so nothing here may import flashtile, and torch only inside functions.
- on first use, by flashtile.cuda_reference (`jit_build`), when the ahead-of-time build is
  absent (pip's default build isolation hides torch from setup.py): torch's
  `cpp_extension.load` compiles the same sources with ninja into a cache directory and
  later processes reuse it.

Either way there are two variants. With a CUDA build of torch and nvcc: the CUDA kernels of
cuda_reference/*.cu plus the host build, FLASHTILE_WITH_CUDA=1. Otherwise the host build
alone (the same algorithm in C++ on CPU tensors).
"""
import os
import sys

# The repository root: the sources live beside the flashtile package in a checkout (and so
# in an editable install), not inside it.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_SOURCES = ["bindings/attention_bindings.cpp", "cuda_reference/attention_host.cpp"]
CUDA_SOURCES = ["cuda_reference/attention_forward.cu", "cuda_reference/attention_backward.cu"]
# Every file the build reads (the headers too): a newer one means the cache is stale.
SOURCE_DIRS = ["bindings", "cuda_reference"]
# torch picks the C++ standard its headers need. No OpenMP in the host build: a second
# OpenMP runtime beside torch's own left spinning threads that slowed torch's CPU ops
# tenfold, and the host build only ever runs small test shapes.
CXX_FLAGS = ["-O2"]
NVCC_FLAGS = ["-O2", "-lineinfo"]
CUDA_MACROS = [("FLASHTILE_WITH_CUDA", "1")]
# The architectures of the ahead-of-time CUDA build when TORCH_CUDA_ARCH_LIST is unset
# (T4, A100, H100). The build on first use compiles for the visible GPUs only.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0"


def can_build_cuda(torch, cpp_extension) -> bool:
    """A CUDA build of torch and a CUDA toolkit (nvcc) to compile the kernels with."""
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(with_cuda: bool, root: str = "") -> list:
    """The source files of one variant, relative to `root` (setup.py: the current directory)."""
    return [os.path.join(root, path) for path in HOST_SOURCES + (CUDA_SOURCES if with_cuda else [])]


# ---------------------------------------------------------------------------------------
# The build on first use
# ---------------------------------------------------------------------------------------

def jit_build_directory(with_cuda: bool) -> str:
    """Where the build on first use is cached: under TORCH_EXTENSIONS_DIR if set, else
    ~/.cache/flashtile (XDG_CACHE_HOME respected), one folder per Python, torch version and
    variant (an extension links against one libtorch)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "flashtile")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, f"{python}_torch{torch.__version__}", jit_name(with_cuda))


def jit_name(with_cuda: bool) -> str:
    return "flashtile_cuda_reference" if with_cuda else "flashtile_cuda_reference_host"


def _is_up_to_date(build_directory: str, name: str) -> bool:
    """Whether the cached library is newer than every source and header (ninja decides for
    real; this only decides whether to announce a compile)."""
    import importlib.machinery

    library = next((os.path.join(build_directory, name + suffix)
                    for suffix in importlib.machinery.EXTENSION_SUFFIXES
                    if os.path.exists(os.path.join(build_directory, name + suffix))), None)
    if library is None:
        return False
    built = os.path.getmtime(library)
    for folder in SOURCE_DIRS:
        for directory, _, files in os.walk(os.path.join(SOURCE_ROOT, folder)):
            if any(os.path.getmtime(os.path.join(directory, f)) > built for f in files):
                return False
    return True


def jit_build():
    """Compile (or reuse from the cache) and import the extension; returns the module.

    FileNotFoundError when the sources are not beside this flashtile (a non-editable
    install); RuntimeError carrying the compiler's output when the build fails."""
    import torch
    from torch.utils import cpp_extension

    missing = [path for path in sources(True, SOURCE_ROOT) if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"the CUDA reference's sources are not beside this flashtile ({missing[0]} is missing): "
            "install flashtile from a checkout with `pip install -e .`")
    # The kernels are compiled for the visible GPUs (torch's default when TORCH_CUDA_ARCH_LIST
    # is unset), so the CUDA variant needs a GPU or an explicit architecture list.
    with_cuda = can_build_cuda(torch, cpp_extension) and (
        torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))
    name = jit_name(with_cuda)
    build_directory = jit_build_directory(with_cuda)
    os.makedirs(build_directory, exist_ok=True)
    if not _is_up_to_date(build_directory, name):
        variant = "CUDA kernels + host build" if with_cuda else "host build, CPU tensors only"
        print(f"flashtile: compiling the CUDA reference ({variant}) into {build_directory}; "
              "once, later runs reuse it", file=sys.stderr, flush=True)
    macros = [f"-D{key}={value}" for key, value in (CUDA_MACROS if with_cuda else [])]
    # ninja from the `ninja` package sits beside this Python, which need not be on PATH
    # (a virtual environment used without activating it).
    path = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except (ImportError, AttributeError):
        pass
    try:
        return cpp_extension.load(
            name=name, sources=sources(with_cuda, SOURCE_ROOT), build_directory=build_directory,
            extra_cflags=CXX_FLAGS + macros, extra_cuda_cflags=NVCC_FLAGS + macros,
            with_cuda=with_cuda, verbose=False)
    finally:
        os.environ["PATH"] = path
