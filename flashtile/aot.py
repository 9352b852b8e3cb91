"""`python -m flashtile.aot`: compile the shipped kernels for a GPU target without a GPU
(see flashtile/triton_kernels/aot.py, and `python -m flashtile.aot --help`)."""
import sys

from .triton_kernels.aot import main

if __name__ == "__main__":
    sys.exit(main())
