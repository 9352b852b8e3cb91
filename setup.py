"""flashtile: FlashAttention v1, v2 and v2_atomic in Triton, forward and backward."""
from setuptools import find_packages, setup

setup(
    name="flashtile",
    version="0.1.0",
    description="FlashAttention-1 and -2 in Triton, forward and backward, side by side",
    packages=find_packages(include=["flashtile", "flashtile.*"]),
    python_requires=">=3.10",
    # torch is not pinned: the GPU machine brings its own CUDA build (2.11) and the CPU
    # machine installs the 2.13 CPU wheel. Triton is pinned so CI and the GPU compile alike.
    install_requires=["torch>=2.4", "triton>=3.6,<3.7", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "pytest-xdist", "matplotlib", "tqdm"],
                    "bench": ["matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["flashtile-bench = flashtile.bench:main"]},
)
