"""asv environment "overlay": each commit of flashtile in a small venv laid over the Python
that runs asv, so that plain `asv run` builds, installs and records commits like asv's own
virtualenv environments do, without downloading torch or triton.

asv's built-in environments either build everything from PyPI (virtualenv, conda: a CUDA
torch is gigabytes, and a GPU machine may have no network) or reuse the running Python as it
is ("existing": then asv cannot install a commit, and saves nothing unless told which commit
the installed flashtile is). The overlay is the middle way:

- `_setup` makes a venv without pip and writes one .pth file into it that adds every
  directory of the running Python's sys.path (its site-packages, PYTHONPATH entries) with
  `site.addsitedir`. The venv's own site-packages comes first, so the commit installed there
  shadows any flashtile the running Python has (an editable install of the checkout
  included), while torch, triton, pip, setuptools and asv_runner come from the running Python.
- asv.conf.json's build and install commands build a wheel of the commit with no build
  isolation and no dependencies (so the CUDA reference compiles against that torch) and
  install it into the venv. pip refuses to uninstall anything outside the venv, so the
  running Python's packages are never touched.

asv loads this module through asv.conf.json's "plugins" entry; defining the subclass registers
the environment type.
"""
import os
import subprocess
import sys
import sysconfig

from asv import environment, util


def _parent_path_entries():
    """The running Python's import path minus the current directory and the asv script's own
    folder: what the overlay sees beneath its own site-packages."""
    left_out = {os.getcwd(), os.path.dirname(os.path.abspath(sys.argv[0]))}
    entries = []
    for entry in map(os.path.abspath, filter(None, sys.path)):
        if os.path.isdir(entry) and entry not in left_out and entry not in entries:
            entries.append(entry)
    return entries


class Overlay(environment.Environment):
    tool_name = "overlay"

    def __init__(self, conf, python, requirements, tagged_env_vars):
        if not self.matches(python):
            raise environment.EnvironmentUnavailable(
                f"the overlay environment uses the Python running asv ({sys.version.split()[0]}), "
                f"not python {python}")
        self._executable = sys.executable
        self._python = python  # the base class's __init__ names the venv's folder from these two
        self._requirements = requirements
        self._parent_entries = _parent_path_entries()
        super().__init__(conf, python, requirements, tagged_env_vars)

    @classmethod
    def matches(cls, python):
        return python in ("same", f"{sys.version_info[0]}.{sys.version_info[1]}")

    def check_presence(self):
        # The base class also wants a pip executable in the venv; the overlay borrows pip.
        try:
            info = self.load_info_file(self._path)
        except (util.UserError, OSError):
            return False
        expected = {"tool_name": self.tool_name, "python": self._python,
                    "requirements": self._requirements, "build_env_vars": self.build_env_vars}
        if info != expected or not os.path.isfile(self._overlay_pth()):
            return False
        with open(self._overlay_pth()) as pth:
            if pth.read() != self._overlay_pth_text():
                return False  # the running Python's path changed: lay the venv over it again
        try:
            self.run_executable("python", ["-c", "pass"])
        except (subprocess.CalledProcessError, OSError, util.ProcessError):
            return False
        return True

    def _site_packages(self):
        # Where a venv at self._path keeps its packages (the venv runs this same interpreter).
        scheme = "venv" if "venv" in sysconfig.get_scheme_names() else sysconfig.get_default_scheme()
        return sysconfig.get_path("purelib", scheme, vars={"base": self._path, "platbase": self._path})

    def _overlay_pth(self):
        return os.path.join(self._site_packages(), "asv_overlay.pth")

    def _overlay_pth_text(self):
        # A .pth line that starts with "import" is executed; addsitedir also reads the .pth
        # files of each directory (editable installs, namespace packages).
        return "".join(f"import site; site.addsitedir({entry!r})\n" for entry in self._parent_entries)

    def _setup(self):
        util.check_call([self._executable, "-m", "venv", "--without-pip", self._path])
        with open(self._overlay_pth(), "w") as pth:
            pth.write(self._overlay_pth_text())

    def run(self, args, **kwargs):
        return self.run_executable("python", args, **kwargs)

