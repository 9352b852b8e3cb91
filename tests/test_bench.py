"""The benchmark command on the CPU: it runs, writes its JSON and plots, and says plainly that
its timings are CPU figures. (Its GPU numbers come from the H100; see the README.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from flashtile import bench
from flashtile.reference import attention_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_run_writes_tables_json_and_plots(tmp_path):
    out = tmp_path / "report"
    # No GPU, whatever the machine: the CPU path is what is tested here.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "flashtile.bench", "--quick", "--no-progress", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CPU figures" in run.stderr and "say nothing about GPU speed" in run.stdout
    for heading in ("TFLOP/s", "latency, ms", "Peak memory", "max |error| vs float64"):
        assert heading in run.stdout
    report = json.loads((out / "bench.json").read_text())
    env_info = report["environment"]
    assert env_info["device"] == "cpu" and env_info["note"] and env_info["torch"] and env_info["triton"]
    impls = set(report["settings"]["impls"])
    assert {"v1", "v2", "v2_atomic", "naive"} <= impls
    for part in ("rows", "memory", "stability"):
        assert report[part], part
        failed = [r for r in report[part] if "error" in r]
        assert not failed, failed
    for row in report["rows"]:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_tflops"] > 0
    naive = {r["N"]: r["fwd_bwd_mib"] for r in report["memory"] if r["impl"] == "naive" and not r["causal"]}
    assert naive[max(naive)] > naive[min(naive)] > 0
    stability = [r for r in report["stability"] if r["impl"] == "v2"]
    assert stability and all(r[q] < 1e-2 for r in stability for q in ("out", "dq", "dk", "dv"))
    assert any(r["impl"] == bench.TORCH_SAME_PRECISION for r in report["stability"])
    plots = sorted(p.name for p in out.glob("*.png"))
    assert len(plots) >= 4, plots
    assert {"fwd_latency.png", "fwd_bwd_latency.png", "memory.png", "stability.png"} <= set(plots)
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_memory_point_is_marked_and_the_run_goes_on(monkeypatch):
    def out_of_memory(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    real = bench.attention_callable
    monkeypatch.setattr(bench, "attention_callable",
                        lambda name, causal: out_of_memory if name == "naive" else real(name, causal))
    rows = [bench.measure_speed(name, 1, 1, 8, 16, False, torch.float16, "cpu", cpu_reps=1)
            for name in ("sdpa_flash", "naive")]
    assert rows[1]["error"] == "OOM" and "fwd_ms" in rows[0]
    memory = bench.measure_memory("naive", 1, 1, 8, 16, False, torch.float16, "cpu")
    assert memory["error"] == "OOM"
    table = bench.markdown_table(rows)
    assert "| OOM |" in table and table.count("\n") == 2


def test_naive_attention_matches_the_reference():
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for n in (5, 7, 7))
    for causal in (False, True):
        expected, _ = attention_reference(q, k, v, causal=causal)
        torch.testing.assert_close(bench.naive_attention(q, k, v, causal), expected)


def test_host_memory_tracker_sees_quadratic_scores():
    x = torch.randn(64, 32)
    with bench.HostTensorMemory() as small:
        torch.softmax(x @ x.T, dim=-1)
    y = torch.randn(256, 32)
    with bench.HostTensorMemory() as large:
        torch.softmax(y @ y.T, dim=-1)
    assert small.peak >= 64 * 64 * 4
    assert large.peak >= 256 * 256 * 4 and large.peak > 8 * small.peak


@pytest.mark.parametrize("value, text", [(364.4, "364"), (12.345, "12.3"), (0.01234, "0.0123")])
def test_number_format(value, text):
    assert bench.number(value) == text


def test_source_commit_marks_a_tree_that_differs_from_head(tmp_path, monkeypatch):
    """The recorded commit is HEAD, "+changes" when tracked files differ from it (as where a
    working tree sits beside an older .git), and FLASHTILE_COMMIT when set."""
    monkeypatch.delenv("FLASHTILE_COMMIT", raising=False)
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],  # noqa: E731
                                       cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    git("add", "kernel.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert bench.source_commit(str(tmp_path)) == head
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert bench.source_commit(str(tmp_path)) == head
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert bench.source_commit(str(tmp_path)) == head + "+changes"
    monkeypatch.setenv("FLASHTILE_COMMIT", "abc123")
    assert bench.source_commit(str(tmp_path)) == "abc123"
    monkeypatch.delenv("FLASHTILE_COMMIT")
    plain = tmp_path.parent / (tmp_path.name + "_plain")  # no repository at or above it
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert bench.source_commit(str(plain)) == "unknown"
