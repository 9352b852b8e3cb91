"""The card's third command, literally: `asv run` from the root of a fresh clone builds main's
tip into asv's overlay environment (asv_bench/overlay_environment.py), runs the suite (the
tiny CPU grid here) and saves the result under that commit for this machine, without
touching a tracked file. Marked `build` (a wheel build of the commit, the CUDA reference's
host build included, then the suite: about 3 minutes on 2 cores): scripts/test.sh and CI run
it, plain pytest leaves it out."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.build


def _run(args, cwd, env, timeout=1200):
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(args)} exited {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run.stdout + run.stderr


def test_asv_run_records_main_in_a_fresh_clone(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    try:
        import asv  # noqa: F401
    except ImportError:
        pytest.skip("needs asv: pip install -e '.[bench]'")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes `asv run` measure the full GPU grid (minutes); this test "
                    "checks the command on the tiny CPU grid")
    clone = tmp_path / "clone"
    env = dict(os.environ, HOME=str(tmp_path))  # asv machine writes ~/.asv-machine.json
    env.pop("TRITON_INTERPRET", None)  # the suite switches the interpreter on by itself
    _run(["git", "clone", "-q", REPO, str(clone)], tmp_path, env)
    _run(["git", "checkout", "-q", "-B", "main"], clone, env)  # asv.conf.json's branch, at HEAD
    head = _run(["git", "rev-parse", "HEAD"], clone, env).strip()
    asv = [sys.executable, "-m", "asv"]
    _run(asv + ["machine", "--yes"], clone, env)
    output = _run(asv + ["run", "--quick", "--show-stderr"], clone, env)
    assert "no CUDA device, running the tiny CPU grid" in output

    results = [path for path in glob.glob(str(clone / "asv_bench" / "results" / "*" / f"{head[:8]}-*.json"))
               if os.sep + "h100" + os.sep not in path]
    assert len(results) == 1, results
    with open(results[0]) as f:
        recorded = json.load(f)
    assert recorded["commit_hash"] == head
    for name in ("attention.Metrics.track_fwd_bwd_tflops", "attention.Metrics.track_max_error",
                 "attention.Timing.time_forward"):
        values = recorded["results"][name][0]
        assert any(v is not None and v == v and v > 0 for v in values), (name, values)
    assert _run(["git", "status", "--porcelain"], clone, env) == ""
