"""scripts/asv_regression_check.py: exit 1 on a >10% slowdown between two commits' asv results,
0 otherwise, 2 when a commit has no results. Result files are written in asv's own format
(version 2: one list of values per benchmark over the product of its params, NaN for skipped)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "asv_regression_check.py")
BASE, NEW = "a" * 40, "b" * 40
PARAMS = [["'v1'", "'v2'"], ["2048", "8192"]]
COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
           "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]


def write_result(results_dir, commit, values):
    """values: {benchmark name: four numbers over PARAMS' product (None = skipped)}."""
    results = {name: [[math.nan if v is None else v for v in vals], PARAMS, "0" * 64, 0, 1.0]
               for name, vals in values.items()}
    data = dict(commit_hash=commit, env_name="existing-py_python3", date=0, params={"machine": "h100"},
                python="3.12", requirements={}, env_vars={}, result_columns=COLUMNS, results=results, version=2)
    folder = results_dir / "h100"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{commit[:8]}-existing-py_python3.json").write_text(json.dumps(data))


def check(results_dir, *extra):
    run = subprocess.run([sys.executable, SCRIPT, BASE, NEW, "--results", str(results_dir), "--machine", "h100",
                          *extra], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout + run.stderr


BASE_VALUES = {
    "attention.Timing.time_forward_backward": [1.0e-3, 2.0e-3, None, 4.0e-3],
    "attention.Metrics.track_fwd_bwd_tflops": [300.0, 320.0, 350.0, None],
    "attention.Metrics.track_peak_memory": [10.0, 20.0, 10.0, 20.0],
}


@pytest.mark.parametrize("change, expected", [
    ({}, 0),  # identical
    ({"attention.Timing.time_forward_backward": [1.09e-3, 2.0e-3, None, 4.0e-3]}, 0),  # 9% slower: within
    ({"attention.Timing.time_forward_backward": [1.0e-3, 2.0e-3, None, 4.5e-3]}, 1),  # 12.5% slower
    ({"attention.Timing.time_forward_backward": [0.5e-3, 1.0e-3, None, 2.0e-3]}, 0),  # faster
    ({"attention.Metrics.track_fwd_bwd_tflops": [300.0, 320.0, 310.0, None]}, 1),  # 350 -> 310 TFLOP/s
    ({"attention.Metrics.track_fwd_bwd_tflops": [330.0, 400.0, 350.0, None]}, 0),  # more TFLOP/s: faster
    ({"attention.Metrics.track_peak_memory": [30.0, 60.0, 30.0, 60.0]}, 0),  # memory: reported, not a failure
    ({"attention.Timing.time_forward_backward": [1.0e-3, 2.0e-3, 9.0e-3, None]}, 0),  # skipped on one side
])
def test_exit_status(tmp_path, change, expected):
    write_result(tmp_path, BASE, BASE_VALUES)
    write_result(tmp_path, NEW, dict(BASE_VALUES, **change))
    status, output = check(tmp_path)
    assert status == expected, output
    assert ("SLOWER" in output) == (expected == 1)


def test_factor_option(tmp_path):
    write_result(tmp_path, BASE, BASE_VALUES)
    write_result(tmp_path, NEW, dict(BASE_VALUES, **{"attention.Timing.time_forward_backward":
                                                     [1.15e-3, 2.0e-3, None, 4.0e-3]}))
    assert check(tmp_path)[0] == 1
    assert check(tmp_path, "--factor", "1.2")[0] == 0


def test_missing_commit_is_a_usage_error(tmp_path):
    write_result(tmp_path, BASE, BASE_VALUES)
    status, output = check(tmp_path)
    assert status == 2 and "no asv result" in output


def test_the_shell_wrapper_passes_the_status_on(tmp_path):
    write_result(tmp_path, BASE, BASE_VALUES)
    write_result(tmp_path, NEW, dict(BASE_VALUES, **{"attention.Timing.time_forward_backward":
                                                     [2.0e-3, 2.0e-3, None, 4.0e-3]}))
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "asv_regression_check.sh"), BASE, NEW,
                          "--results", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "SLOWER" in run.stdout
