"""Every .cu file of cuda_reference/ compiles alone (torch-free) with nvcc for sm_75, sm_80
and sm_90: `nvcc -c -arch=sm_XX`, warnings as errors.

The CPU CI machine has nvcc (13.0) but no GPU and a CPU build of torch, so the extension it
installs is the host build; this is where the CUDA kernels are compiled there. Skipped,
with the reason, where no nvcc is found (neither on PATH nor in $CUDA_HOME/bin or
/usr/local/cuda/bin).

The host build (cuda_reference/attention_host.cpp, the same header's maths on the CPU) is
compiled here too, alone and torch-free, with the system C++ compiler and warnings as
errors: the extension build compiles it beside torch's headers, which hide nothing of it,
but only with torch's own flags.

Marked `build`: plain `pytest` leaves them out (tens of seconds of compiling);
scripts/test.sh and CI run them.
"""
import glob
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.build  # plain pytest leaves these out; scripts/test.sh runs them

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(os.path.relpath(path, REPO_ROOT)
                 for path in glob.glob(os.path.join(REPO_ROOT, "cuda_reference", "*.cu")))
ARCHS = ("sm_75", "sm_80", "sm_90")


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


NVCC = find_nvcc()


def test_the_kernels_are_found():
    assert {"cuda_reference/attention_forward.cu", "cuda_reference/attention_backward.cu"} <= set(SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles(source, arch, tmp_path):
    obj = tmp_path / (os.path.basename(source) + f".{arch}.o")
    cmd = [NVCC, "-c", f"-arch={arch}", "-O2", "-std=c++17", "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra", source, "-o", str(obj)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert obj.stat().st_size > 0
    # The object holds code for the requested architecture (cuobjdump lists its ELF).
    cuobjdump = os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if os.access(cuobjdump, os.X_OK):
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True)
        assert arch in listing.stdout, listing.stdout + listing.stderr


CXX = next((c for c in (os.environ.get("CXX"), shutil.which("c++"), shutil.which("g++")) if c), None)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found ($CXX, c++, g++)")
def test_host_build_compiles_alone(tmp_path):
    obj = tmp_path / "attention_host.o"
    cmd = [CXX, "-c", "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "cuda_reference/attention_host.cpp",
           "-o", str(obj)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert obj.stat().st_size > 0
