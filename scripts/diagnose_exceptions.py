"""Diagnostics for the bindings' crash on the H100 (README, Known problems: the likely cause is
libstdc++'s runtime linked into the extension, where an ostringstream cannot format numbers).

Prints the toolchain facts that decide C++ exception handling in a torch extension, then
builds a minimal torch extension (torch.utils.cpp_extension.load_inline, CPU only) whose
functions raise in four ways, and calls each twice in one child process: fresh, after CUDA
initialisation, and after a Triton kernel ran, under a SIGSEGV / SIGABRT handler
(LD_PRELOAD) that prints the native backtrace. Last, the exception symbols of flashtile's
extension. With --pytest, last the crash itself: pytest (one process, no xdist) on
tests/test_cuda_reference.py alone, then after tests/test_parity.py, under that handler, with
addr2line on the frames. Usage: python scripts/diagnose_exceptions.py [--pytest]
(results/h100/parity/ has its H100 logs)
"""
import glob
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import torch


def sh(cmd):
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (proc.stdout + proc.stderr).strip()


def pybind11_version(include_dir):
    path = os.path.join(include_dir, "pybind11", "detail", "common.h")
    if not os.path.exists(path):
        return "none"
    text = open(path).read()
    parts = [re.search(rf"#define PYBIND11_VERSION_{p} (\S+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def child(code, env=None):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))
    return proc.returncode, (proc.stdout + proc.stderr).strip()[-3000:]


print("== toolchain")
print(sh("grep PRETTY_NAME /etc/os-release"))
print(sh("c++ --version | head -1"), "|", sh("ld --version | head -1"))
print("python", sys.version.split()[0], sys.executable)
print({name: os.environ[name] for name in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "LDSHARED", "LD_PRELOAD")
       if name in os.environ})
print("libstdc++ a static archive:", sh("c++ -print-file-name=libstdc++.a"), "| shared:", sh("c++ -print-file-name=libstdc++.so"))
print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI,
      "pybind11 abi", getattr(torch._C, "_PYBIND11_BUILD_ABI", "?"),
      getattr(torch._C, "_PYBIND11_COMPILER_TYPE", "?"), getattr(torch._C, "_PYBIND11_STDLIB", "?"))
torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
print("pybind11 bundled with torch:", pybind11_version(torch_include))
try:
    import pybind11
    print("pybind11 package:", pybind11.__version__, pybind11.get_include())
except ImportError:
    print("pybind11 package: none")
print(sh("python3 -c 'import sysconfig; print(sysconfig.get_config_var(\"CC\"), sysconfig.get_config_var(\"LDSHARED\"))'"))
ext = glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flashtile", "_cuda_reference*.so"))
for so in ext:
    print("==", so)
    print(sh(f"ldd {so} | grep -E 'stdc|gcc_s|libc10|libtorch_python|libc.so'"))
    print(sh(f"readelf -d {so} | grep -E 'NEEDED|RUNPATH'"))
print("== libstdc++ / libgcc_s in the running process")
code = ("import re, torch, flashtile._cuda_reference\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search(r'stdc[+][+]|gcc_s|_cuda_ref', l)}))")
print(*child(code))

print("== a minimal torch extension raising in four ways (each in a child process)")
source = textwrap.dedent(r"""
    #include <torch/extension.h>
    #include <stdexcept>
    void std_error() { throw std::runtime_error("std runtime_error"); }
    void pybind_error() { throw pybind11::type_error("pybind11 type_error"); }
    void python_error() { PyErr_SetString(PyExc_TypeError, "PyErr_SetString"); throw pybind11::error_already_set(); }
    void torch_check() { TORCH_CHECK_TYPE(false, "TORCH_CHECK_TYPE"); }
    int ok() { return 42; }
""")
build = tempfile.mkdtemp()
from torch.utils.cpp_extension import load_inline  # noqa: E402
load_inline("ft_diag", cpp_sources=[source], functions=["std_error", "pybind_error", "python_error", "torch_check", "ok"],
            build_directory=build, verbose=False, extra_cflags=["-O2"])
# Each function twice in one child process (the crash came with the second exception), in
# three settings: a fresh process, after CUDA initialisation, after a Triton kernel ran.
settings = {"fresh": "", "after CUDA init": "torch.zeros(1, device='cuda')\n",
            "after a Triton kernel": ("import flashtile\nx = torch.randn(1, 2, 64, 64, device='cuda', dtype=torch.float16)\n"
                                      "flashtile.attention(x, x, x, impl='v2')\n")}
handler = os.path.join(build, "segv_bt.c")
open(handler, "w").write(textwrap.dedent(r"""
    #include <execinfo.h>
    #include <signal.h>
    #include <unistd.h>
    static void on_signal(int sig) { void* frames[64]; int n = backtrace(frames, 64);
      backtrace_symbols_fd(frames, n, 2); _exit(128 + sig); }
    __attribute__((constructor)) static void install(void) { signal(SIGSEGV, on_signal); signal(SIGABRT, on_signal); }
"""))
print(sh(f"cc -shared -fPIC -O0 -o {build}/segv_bt.so {handler}"))
for where, prologue in settings.items():
    if where != "fresh" and not torch.cuda.is_available():
        continue
    for fn in ("ok", "std_error", "pybind_error", "python_error", "torch_check"):
        code = (f"import sys; sys.path.insert(0, {build!r}); import torch\n{prologue}import ft_diag\n"
                f"for call in (1, 2):\n"
                f"    try:\n        print(call, 'returned', ft_diag.{fn}())\n"
                f"    except Exception as e:\n        print(call, 'raised', type(e).__name__, str(e)[:40])\n")
        rc, out = child(code, env={"LD_PRELOAD": f"{build}/segv_bt.so"})
        lines = [line for line in out.splitlines() if line[:2] in ("1 ", "2 ")]
        print(f"{where}: {fn}: rc={rc} {lines}")
        if rc != 0:
            print(out[-2500:])
            for so, offset in re.findall(r"(/\S+\.so[.\d]*)\(\+(0x[0-9a-f]+)\)", out)[:12]:
                print("   ", so.split("/")[-1], offset, sh(f"addr2line -f -C -e {so} {offset} | head -1"))
for so in ext:
    print("== exception symbols of", os.path.basename(so))
    print(sh(f"nm -D {so} | grep -E ' (__cxa_(throw|begin_catch|end_catch|get_globals|allocate_exception)|_Unwind_RaiseException)$'"))

if "--pytest" in sys.argv:
    def native_frames(out):
        for so, offset in re.findall(r"(/\S+\.so[.\d]*)\(\+(0x[0-9a-f]+)\)", out)[:16]:
            print("   ", so.split("/")[-1], offset, sh(f"addr2line -f -C -e {so} {offset} | head -1"))

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for files in (["tests/test_cuda_reference.py"], ["tests/test_parity.py", "tests/test_cuda_reference.py"]):
        print("== pytest", *files, "(one process, SIGSEGV handler)")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:faulthandler", "-p", "no:xdist",
                               "-p", "no:benchmark", *files], cwd=repo, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, LD_PRELOAD=f"{build}/segv_bt.so"))
        out = proc.stdout + proc.stderr
        print("rc", proc.returncode, out.strip().splitlines()[-1] if out.strip() else "")
        if proc.returncode not in (0, 1):
            print(out[-4000:])
            native_frames(out)
