"""The benchmark command (flashtile.bench) on the CPU: its options fail cleanly, its FLOP counts
are attention_flops' over the visible keys, PyTorch's peers do the same work as flashtile, a
failing contender becomes a recorded failure, the quick run writes its report, and the
training part trains each attention implementation from the same start. (Its GPU
figures come from the device runs; see the results document.)"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import flashtile
from flashtile.bench import cli, features, grid, impls, measure, report, training
from flashtile.reference import attention_flops, attention_reference, varlen_attention_reference, visible_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = features.FeatureSizes(n=32, head_dim=16, heads=2, gqa_heads=(8, 1), window=8, softcap_batch=2)


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "fp32"], "argument --dtypes: invalid choice 'fp32' (choose from fp16, bf16)"),
    (["--parts", "speed,foo"], "argument --parts: invalid choice 'foo'"),
    (["--impls", "v3"], "argument --impls: invalid choice 'v3'"),
    (["--seqs", "128,abc"], "argument --seqs: 'abc' is not a int"),
    (["--head-dims", "0"], "argument --head-dims: '0' is not a positive int"),
    (["--causal", "2"], "argument --causal: invalid choice '2'"),
    (["--from-json", "/nonexistent/bench.json"], "no such file"),
])
def test_a_bad_option_is_one_line_on_stderr_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("flashtile-bench: error:"), err


def test_quick_help_names_what_runs_on_each_device(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for mode in ("gpu_quick", "cpu_quick"):
        assert " ".join(cli.describe_grid(mode).split()) in text


def test_a_gpu_figure_is_the_lowest_of_its_rounds_and_keeps_them_all(monkeypatch):
    medians = iter([3.0, 2.0, 5.0])
    monkeypatch.setattr(measure, "time_ms", lambda *args, **kwargs: next(medians))
    assert measure.settled_ms(lambda: None, "cuda") == (2.0, [3.0, 2.0])
    assert measure.settled_ms(lambda: None, "cpu") == (5.0, [5.0])  # one median on the CPU


def test_flop_counts_are_attention_flops_over_the_visible_keys():
    # A window's count is the visible (query, key) pairs, counted by brute force here.
    n, heads, d = 48, 3, 16
    for window, causal in (((7, 0), True), ((5, 2), False), ((-1, -1), False)):
        flops = measure.workload_flops(2, heads, n, n, d, causal, window)
        pairs = visible_keys(n, n, (window[0], 0) if causal else window).sum().item()
        assert flops["fwd"] == 4 * 2 * heads * pairs * d == attention_flops(2, heads, n, n, d, causal, "fwd", window)
        assert flops["fwd_bwd"] == 3.5 * flops["fwd"]
    # A packed batch counts its real tokens: the sum over its sequences, not the padded batch.
    lengths = [3, 30, 5]
    packed = measure.packed_flops(lengths, heads, d, causal=True)
    assert packed["fwd"] == sum(attention_flops(1, heads, m, m, d, True) for m in lengths)
    assert packed["fwd"] < attention_flops(len(lengths), heads, 30, 30, d, True)


def test_a_measured_row_reports_tflops_of_its_own_flops_and_time():
    row = grid.speed_row("naive", 1, 2, 16, 8, True, torch.float32, "cpu", cpu_reps=1)
    assert "error" not in row and row["first_call_ms"] > 0
    for mode in ("fwd", "fwd_bwd"):
        flops = attention_flops(1, 2, 16, 16, 8, True, mode)
        assert row[f"{mode}_tflops"] * row[f"{mode}_ms"] * 1e9 == pytest.approx(flops)


@pytest.mark.parametrize("causal, window", [(True, (5, 0)), (False, (3, 4)), (False, (-1, 2)), (True, (-1, -1))])
@pytest.mark.parametrize("n_q, n_k", [(12, 12), (7, 12), (12, 7)])
def test_flex_mask_is_flashtiles_bottom_right_window(causal, window, n_q, n_k):
    for_shape = impls.window_mask_mod(causal, window)
    effective = (window[0], 0) if causal else window
    if effective == (-1, -1):
        assert for_shape is None
        return
    mask = for_shape(n_q, n_k)(0, 0, torch.arange(n_q)[:, None], torch.arange(n_k)[None, :])
    assert torch.equal(mask, visible_keys(n_q, n_k, effective))


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=True, window_size=(5, 0)),
                                     dict(causal=True, softcap=2.0), dict(causal=False, window_size=(3, 2))])
def test_the_peers_compute_the_same_attention_as_the_reference(options):
    """Each peer that takes the work does the same job as flashtile (GQA 4/2 included);
    the others refuse it as Unsupported rather than computing something else."""
    (q, k, v), _ = measure.random_inputs(1, 4, 24, 16, torch.float32, "cpu", heads_kv=2)
    expected, _ = attention_reference(q.detach(), k.detach(), v.detach(), **options)
    for name in ("flex", "naive") + impls.CPU_SDPA:
        fn = impls.attention_fn(name, **options)
        with torch.no_grad():
            if name in impls.SDPA_BACKENDS and ("window_size" in options or "softcap" in options):
                with pytest.raises(impls.Unsupported):
                    fn(q, k, v)
                continue
            torch.testing.assert_close(fn(q, k, v).double(), expected, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture
def stand_in_flashtile(monkeypatch):
    """flashtile.attention / varlen_attention with the API the kernels are getting (GQA,
    window_size, softcap, varlen), computed by the reference: what the benchmark's feature
    workloads call, recorded in `calls`."""
    calls = []

    def attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, impl="v2",
                  return_lse=False):
        calls.append(dict(impl=impl, heads=(q.shape[1], k.shape[1]), window_size=window_size, softcap=softcap))
        return attention_reference(q, k, v, causal, scale, False, window_size, softcap)[0]

    def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                         scale=None, window_size=(-1, -1), softcap=0.0, impl="v2", return_lse=False):
        assert cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
        calls.append(dict(impl=impl, varlen=cu_seqlens_q.tolist(), max_seqlen=max_seqlen_q))
        return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, False)[0]

    monkeypatch.setattr(flashtile, "attention", attention)
    monkeypatch.setattr(flashtile, "varlen_attention", varlen_attention, raising=False)
    return calls


def test_feature_workloads_call_the_api_and_measure_every_contender(stand_in_flashtile):
    rows = features.feature_rows(TINY, ("v2", "sdpa_flash", "flex", "naive"), torch.float16, "cpu", cpu_reps=1)
    by_workload = {}
    for r in rows:
        by_workload.setdefault(r["workload"], []).append(r)
    assert list(by_workload) == ["gqa", "window", "softcap", "varlen"]
    for workload, mine in by_workload.items():
        v2 = next(r for r in mine if r["impl"] == "v2")
        assert "error" not in v2 and v2["fwd_tflops"] > 0 and v2["fwd_bwd_tflops"] > 0 and v2["fwd_mib"] > 0, v2
        assert any(r["impl"] == "flex" for r in mine), workload  # forward only on the CPU
    assert [r["impl"] for r in by_workload["gqa"]] == ["v2", "sdpa_flash", "flex"]
    assert [r["impl"] for r in by_workload["varlen"]] == ["v2", "sdpa_flash", "flex"]
    dense = [c for c in stand_in_flashtile if "varlen" not in c]
    assert {c["heads"] for c in dense} >= {(8, 1)}
    assert {c["window_size"] for c in dense} >= {(TINY.window - 1, 0)}
    assert {c["softcap"] for c in dense} >= {features.SOFTCAP}
    lengths = TINY.varlen_lengths()
    assert max(lengths) == 10 * min(lengths) and sum(lengths) == TINY.n
    varlen = [c for c in stand_in_flashtile if "varlen" in c]
    assert varlen and varlen[0]["varlen"][-1] == TINY.n and varlen[0]["max_seqlen"] == max(lengths)


def test_window_sweep_times_each_width(stand_in_flashtile):
    rows = features.window_sweep_rows(TINY, ("v2",), torch.float16, "cpu", cpu_reps=1)
    assert [r["window"] for r in rows] == features.window_widths(TINY.n) == [8, 16, 32]
    assert all("fwd_bwd_ms" in r for r in rows)
    assert {c["window_size"] for c in stand_in_flashtile} == {(7, 0), (15, 0), (31, 0)}


def test_a_failing_contender_is_recorded_and_the_run_goes_on(monkeypatch):
    def out_of_memory(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    real = impls.attention_fn
    monkeypatch.setattr(grid, "attention_fn",
                        lambda name, *args, **kw: out_of_memory if name == "naive" else real(name, *args, **kw))
    rows = [grid.speed_row(name, 1, 1, 8, 16, False, torch.float16, "cpu", cpu_reps=1)
            for name in ("sdpa_flash", "naive")]
    assert rows[1]["error"] == "OOM" and "fwd_ms" in rows[0]
    assert grid.memory_row("naive", 1, 1, 8, 16, False, torch.float16, "cpu")["error"] == "OOM"
    table = report.speed_table(rows)
    assert "| OOM / OOM |" in table and table.count("\n") == 2
    # A contender with a forward but no backward keeps its forward figures.
    partial = dict(impl="flex", workload="gqa", shape="s", dtype="float16", fwd_ms=2.0, fwd_tflops=1.5,
                   fwd_bwd_error="Unsupported: no backward here")
    text = report.feature_tables([partial])
    assert "| flex | 1.5 / n.a. | 2 / n.a. | n.a. | n.a. |" in text
    assert report.errors_in([partial]) == ["- flex: Unsupported: no backward here"]


def test_host_memory_tracker_sees_quadratic_scores():
    x = torch.randn(64, 32)
    with measure.HostTensorMemory() as small:
        torch.softmax(x @ x.T, dim=-1)
    y = torch.randn(256, 32)
    with measure.HostTensorMemory() as large:
        torch.softmax(y @ y.T, dim=-1)
    assert small.peak >= 64 * 64 * 4
    assert large.peak >= 256 * 256 * 4 and large.peak > 8 * small.peak


@pytest.mark.interpreter  # the CPU path of the command; a GPU machine's pytest leaves it out
def test_quick_cpu_run_writes_its_report_under_results_tmp(tmp_path):
    """The whole command as a user runs it, from a directory of their own: every part, a
    markdown report on stdout, and bench.json, report.md and the plots under results_tmp/.
    One Triton implementation (v2) keeps it short: the parity suite runs them all."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install flashtile[bench]")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "flashtile.bench", "--quick", "--no-progress",
                          "--impls", "v2,cuda,sdpa_flash,flex,naive"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CPU figures" in run.stderr and "say nothing about GPU speed" in run.stdout
    for heading in ("TFLOP/s", "latency, ms", "First forward+backward", "Peak memory", "max |error| vs float64",
                    "**gqa**", "**window**", "**softcap**", "**varlen**", "Causal sliding window"):
        assert heading in run.stdout, heading
    (out,) = (tmp_path / "results_tmp").iterdir()
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["settings"]["mode"] == "cpu_quick"
    triton_impls = {"v2"}
    assert triton_impls <= set(data["settings"]["impls"])
    for part in ("rows", "memory", "stability", "features", "window_sweep"):
        assert data[part], part
    # Plain attention runs, forward and backward.
    for part in ("rows", "memory", "stability"):
        failed = [r for r in data[part] if r["impl"] in triton_impls and "error" in r]
        assert not failed, failed
    assert all(r["fwd_bwd_ms"] > 0 and r["first_call_ms"] > 0 for r in data["rows"] if r["impl"] in triton_impls)
    naive = {r["N"]: r["fwd_bwd_mib"] for r in data["memory"] if r["impl"] == "naive" and not r["causal"]}
    assert naive[max(naive)] > naive[min(naive)] > 0
    assert (out / "report.md").read_text().strip() in run.stdout
    plots = {p.name for p in out.glob("*.png")}
    assert {"fwd_latency.png", "fwd_bwd_tflops.png", "memory.png", "stability.png", "features.png",
            "window_sweep.png"} <= plots
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)


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
    assert report.source_commit(str(tmp_path)) == head
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert report.source_commit(str(tmp_path)) == head
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert report.source_commit(str(tmp_path)) == head + "+changes"
    monkeypatch.setenv("FLASHTILE_COMMIT", "abc123")
    assert report.source_commit(str(tmp_path)) == "abc123"
    monkeypatch.delenv("FLASHTILE_COMMIT")
    plain = tmp_path.parent / (tmp_path.name + "_plain")  # no repository at or above it
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert report.source_commit(str(plain)) == "unknown"


def test_the_training_part_without_transformers_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(training, "transformers_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--parts", "speed,training"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install flashtile[transformers]" in err, err
    assert "training" not in cli.parse_args([]).parts  # the default parts need no extra


@pytest.mark.interpreter
def test_training_part_trains_each_implementation_from_the_same_start(tmp_path, capsys):
    """The training part at its CPU size: flashtile, sdpa and eager each train the same tiny
    Llama on the same batches, with a finite loss and a time for every step."""
    pytest.importorskip("transformers", reason=training.EXTRA_HINT)
    cli.main(["--parts", "training", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows, steps = data["training"], data["settings"]["training"]["steps"]
    assert steps == cli.TRAINING_CPU.steps and [r["impl"] for r in rows] == training.implementations()
    for r in rows:
        assert "error" not in r, r
        assert len(r["losses"]) == len(r["step_ms"]) == steps, r
        assert all(math.isfinite(loss) for loss in r["losses"]) and all(ms > 0 for ms in r["step_ms"]), r
        assert r["median_step_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["loss_floor"] < r["losses"][0], r
    assert len({r["init_checksum"] for r in rows}) == 1 and len({r["data_checksum"] for r in rows}) == 1
    assert set(training.loss_gaps(rows)) == {training.implementations()[0], training.YARDSTICK}
    out = capsys.readouterr().out
    assert "Training a small Llama" in out and "same initial weights" in out and "| eager |" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
