"""flashtile: FlashAttention v1, v2 and v2_atomic in Triton, forward and backward."""
import importlib.util
import os
import sys

from setuptools import find_packages, setup


def _load_build_recipe():
    """flashtile/_extension_build.py (sources and flags, shared with the build on first use),
    loaded by its path: importing the flashtile package would import torch and triton."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "flashtile_extension_build", os.path.join(here, "flashtile", "_extension_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_extension():
    """(ext_modules, cmdclass) for flashtile._cuda_reference, the CUDA reference, built now
    when the build sees torch (`pip install -e . --no-build-isolation`).

    With nvcc and a CUDA build of torch: a CUDAExtension (the kernels of cuda_reference/
    for TORCH_CUDA_ARCH_LIST, default "7.5;8.0;9.0", plus the host build). Otherwise a
    CppExtension of the host build alone (the same algorithm on the CPU). Without torch at
    build time (pip's default build isolation), or if compiling fails, flashtile installs
    without it and compiles it on first use of impl="cuda" (flashtile.cuda_reference).
    FLASHTILE_BUILD_EXTENSION=1 makes a failed or impossible build here an error;
    FLASHTILE_BUILD_EXTENSION=0 skips it (and, set at run time, the build on first use).
    """
    mode = os.environ.get("FLASHTILE_BUILD_EXTENSION", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if mode == "1":
            raise
        print("flashtile: torch is not visible to this build (pip's build isolation); the CUDA reference "
              "compiles on first use of impl='cuda' (`pip install -e . --no-build-isolation` builds it now)",
              file=sys.stderr)
        return [], {}
    recipe = _load_build_recipe()
    if recipe.can_build_cuda(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", recipe.DEFAULT_CUDA_ARCH_LIST)
        extension = cpp_extension.CUDAExtension(
            "flashtile._cuda_reference", recipe.sources(with_cuda=True), define_macros=recipe.CUDA_MACROS,
            extra_compile_args={"cxx": recipe.CXX_FLAGS, "nvcc": recipe.NVCC_FLAGS})
    else:
        extension = cpp_extension.CppExtension(
            "flashtile._cuda_reference", recipe.sources(with_cuda=False), extra_compile_args=recipe.CXX_FLAGS)

    class BuildReference(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error: install flashtile without it
                if mode == "1":
                    raise
                print(f"flashtile: WARNING: building the CUDA reference failed ({error}); flashtile installs "
                      "without it and impl='cuda' tries again on first use. FLASHTILE_BUILD_EXTENSION=1 makes "
                      "this an error.", file=sys.stderr)
                self.extensions = []  # nothing for an editable install to copy

    return [extension], {"build_ext": BuildReference}


ext_modules, cmdclass = reference_extension()

setup(
    name="flashtile",
    version="0.1.0",
    description="FlashAttention-1 and -2 in Triton, forward and backward, side by side",
    packages=find_packages(include=["flashtile", "flashtile.*"]),
    python_requires=">=3.10",
    # torch is not pinned: a GPU machine brings its own CUDA build. Triton: 3.6.x (what pip
    # picks, what CI and the GPU compile with) or 3.2.x, the last that uses Turing's tensor
    # cores (README, "On a T4"); 3.3 fails to compile for sm_75 and 3.4/3.5 are untested.
    # ninja builds the CUDA reference on first use.
    install_requires=["torch>=2.4", "triton>=3.2,!=3.3.*,!=3.4.*,!=3.5.*,<3.7", "numpy", "ninja"],
    # test includes transformers: tests/test_transformers.py runs tiny models on the interpreter (~1 min on 2 cores).
    extras_require={"test": ["pytest", "hypothesis", "pytest-xdist", "transformers>=5,<6"],
                    "bench": ["matplotlib", "tqdm", "asv"],
                    "transformers": ["transformers>=5,<6"]},
    entry_points={"console_scripts": ["flashtile-bench = flashtile.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
