"""flashtile: FlashAttention v1, v2 and v2_atomic in Triton, forward and backward."""
import os
import sys

from setuptools import find_packages, setup


def reference_extension():
    """(ext_modules, cmdclass) for flashtile._cuda_reference, the CUDA reference.

    With nvcc and a CUDA build of torch: a CUDAExtension (the kernels of cuda_reference/
    for TORCH_CUDA_ARCH_LIST, default "7.5;8.0;9.0", plus the host build). Otherwise a
    CppExtension of the host build alone (the same algorithm on the CPU). Without torch at
    build time, or if compiling fails, flashtile installs without it (impl="cuda" then says
    so) unless FLASHTILE_BUILD_EXTENSION=1, which makes a failed build an error;
    FLASHTILE_BUILD_EXTENSION=0 skips it.
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
        print("flashtile: torch is not importable at build time; not building the CUDA reference", file=sys.stderr)
        return [], {}
    sources = ["bindings/attention_bindings.cpp", "cuda_reference/attention_host.cpp"]
    # torch picks the C++ standard its headers need. No OpenMP in the host build: a second
    # OpenMP runtime beside torch's own left spinning threads that slowed torch's CPU ops
    # tenfold, and the host build only ever runs small test shapes.
    cxx = ["-O2"]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0")
        extension = cpp_extension.CUDAExtension(
            "flashtile._cuda_reference",
            sources + ["cuda_reference/attention_forward.cu", "cuda_reference/attention_backward.cu"],
            define_macros=[("FLASHTILE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O2", "-lineinfo"]})
    else:
        extension = cpp_extension.CppExtension("flashtile._cuda_reference", sources, extra_compile_args=cxx)

    class BuildReference(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error: install flashtile without it
                if mode == "1":
                    raise
                print(f"flashtile: WARNING: building the CUDA reference failed ({error}); flashtile installs "
                      "without it (impl='cuda' raises). FLASHTILE_BUILD_EXTENSION=1 makes this an error.",
                      file=sys.stderr)
                self.extensions = []  # nothing for an editable install to copy

    return [extension], {"build_ext": BuildReference}


ext_modules, cmdclass = reference_extension()

setup(
    name="flashtile",
    version="0.1.0",
    description="FlashAttention-1 and -2 in Triton, forward and backward, side by side",
    packages=find_packages(include=["flashtile", "flashtile.*"]),
    python_requires=">=3.10",
    # torch is not pinned: the GPU machine brings its own CUDA build (2.11) and the CPU
    # machine installs the 2.13 CPU wheel. Triton: 3.6.x (what pip picks, what CI and the GPU
    # compile with) or 3.2.x, the last that uses Turing's tensor cores (README, "On a T4");
    # 3.3 fails to compile for sm_75 and 3.4/3.5 are untested.
    install_requires=["torch>=2.4", "triton>=3.2,!=3.3.*,!=3.4.*,!=3.5.*,<3.7", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "pytest-xdist", "matplotlib", "tqdm"],
                    "bench": ["matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["flashtile-bench = flashtile.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
