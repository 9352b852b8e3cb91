"""Compile the GPU parity grid's Triton kernels in parallel, ahead of the tests that run them.

A GPU run from an empty Triton cache is dominated by compiling: each kernel compiles once
per signature (test_parity.py's module doc), one after another in the pytest process, and
Triton's compiler holds the GIL, so threads do not help. conftest.py starts this script in
the background at the start of a GPU session (not under pytest-xdist, whose workers already
compile side by side): a pool of processes runs every grid case forward and backward
through each Triton implementation, which leaves the compiled kernels in Triton's on-disk
cache. When the tests reach a case, its kernels load from there. Nothing is checked here;
a kernel the tests reach before it is cached is simply compiled by the test process too.

    python tests/warm_triton_cache.py [processes]
"""
import concurrent.futures
import multiprocessing
import os
import sys
import time


def _run_case(task):
    device_case, impl = task
    import torch
    import test_parity
    from flashtile.testing import flashtile_impl, run_attention

    case = test_parity.case_of("cuda", device_case)
    start = time.perf_counter()
    try:
        q, k, v, d_out, features = test_parity.make_inputs(case, "cuda", seed=0)
        run_attention(flashtile_impl(impl), q, k, v, case.causal, case.scale, d_out, **features)
        torch.cuda.synchronize()
    except Exception as error:  # the test of this case will say what is wrong
        return f"failed ({type(error).__name__})"
    return f"{time.perf_counter() - start:.1f} s"


def main(processes):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("FLASHTILE_AUTOTUNE", "0")  # the tests' setting: one config per kernel
    import test_parity
    from flashtile.registry import TRITON_IMPLEMENTATIONS

    tasks = [(case.name, impl) for case in test_parity.GRID for impl in TRITON_IMPLEMENTATIONS]
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context,
                                                initializer=sys.path.insert, initargs=(0, sys.path[0])) as pool:
        for (name, impl), outcome in zip(tasks, pool.map(_run_case, tasks)):
            print(f"warm: {name} {impl} {outcome}", flush=True)
    print(f"warm: {len(tasks)} cases in {time.perf_counter() - start:.0f} s with {processes} processes", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else max(1, min(12, (os.cpu_count() or 2) - 2)))
