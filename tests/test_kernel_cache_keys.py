"""Triton's on-disk cache is found again by every process: a kernel's cache key must not depend
on which kernel the process hashed first (_common.settle_cache_keys says why it could).

Runs without a GPU: a cache key is computed from the kernels' source, never compiled here."""
import json
import os
import subprocess
import sys

KEYS_IN_ORDER = """
import importlib, json, sys
from triton.runtime.jit import JITFunction, KernelInterface

def jit_function(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel

modules = [importlib.import_module("flashtile.triton_kernels." + name) for name in sys.argv[1:]]
kernels = {f"{module.__name__}.{name}": jit_function(value) for module in modules
           for name, value in vars(module).items()
           if isinstance(value, KernelInterface) and name.endswith("_kernel")}
print(json.dumps({name: kernel.cache_key for name, kernel in kernels.items()}))
"""


def kernel_keys(*module_order):
    """Cache keys of the kernels of `module_order`'s modules, imported and hashed in that order
    by a fresh process (the interpreter off: it has no cache keys)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", KEYS_IN_ORDER, *module_order], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout)


def test_kernel_keys_do_not_depend_on_which_kernel_came_first():
    v1_first = kernel_keys("v1", "v2", "v2_atomic")
    v2_first = kernel_keys("v2_atomic", "v2", "v1")
    assert len(v1_first) >= 6, sorted(v1_first)
    assert v1_first == v2_first
