"""The launch configuration machinery of flashtile/triton_kernels/_common.py and _launch.py (no
attention here).

With FLASHTILE_AUTOTUNE=0 (the tests' setting, conftest.py) the autotuner keeps the first
shipped config of a GPU's list and must launch it once per call, with no timing runs: Triton
times even a lone config for every new key, which a GPU test session would pay hundreds of
times. A counting kernel decorated as the attention kernels are, with a GPU's config lists,
runs on the interpreter here.

After a key's first launch, RememberingAutotuner (_launch.py) skips Triton's Autotuner.run
and launches the config Triton chose: checked with a stub kernel, on any machine.
"""
import itertools

import pytest
import torch
import triton
import triton.language as tl

from conftest import INTERPRETING
from flashtile.triton_kernels import _common

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs a kernel on CPU tensors: needs TRITON_INTERPRET=1")


@pytest.fixture
def counting_kernel(monkeypatch):
    """A kernel autotuned over sm_90's forward configs that adds 1 to COUNT[0] per launch."""
    monkeypatch.setattr(_common, "device_capability", lambda device=None: 90)

    @_common.autotuned("forward")
    @triton.jit
    def count(COUNT, q_bucket, k_bucket, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.atomic_add(COUNT, 1)

    assert len(count.configs) > 1  # the union of sm_90's lists: Triton's timing path
    return count


def launch(kernel, counter, q_bucket):
    kernel[(1,)](counter, q_bucket=q_bucket, k_bucket=16, BLOCK_D=64, EVEN_D=True, VARLEN=False, WINDOW_LEFT=False,
                 WINDOW_RIGHT=False, SOFTCAP=False)


@needs_interpreter
def test_without_autotuning_the_first_config_runs_once_untimed(counting_kernel, monkeypatch):
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")
    counter = torch.zeros(1, dtype=torch.int32)
    launch(counting_kernel, counter, q_bucket=16)  # a new key: pruned to one config, not timed
    assert counter.item() == 1
    launch(counting_kernel, counter, q_bucket=16)
    launch(counting_kernel, counter, q_bucket=32)  # another new key
    assert counter.item() == 3
    first = _common.config_tuples("forward", 90, 64)[0]
    best = counting_kernel.best_config
    assert (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages) == first


# ---------------------------------------------------------------------------------------
# RememberingAutotuner: the config that runs is the one Triton's Autotuner chose (a stub kernel)
# ---------------------------------------------------------------------------------------

AUTOTUNE_KEY = ("q_bucket", "k_bucket", "BLOCK_D", "EVEN_D", "VARLEN", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP")


def _stub_autotuned_kernel(monkeypatch, fastest):
    """A kernel stub under `autotuned("backward")` with the sm_90 configs (so the Autotuner has
    several to choose from), timed so that config `fastest` (BLOCK_M, BLOCK_N) wins; returns
    the kernel and the list of launches it records (the keywords each launch was given)."""
    monkeypatch.setattr(_common, "device_capability", lambda device=None: 90)
    launches = []

    def kernel_source(Q, DQ, n_q, q_bucket, k_bucket, BLOCK_D, EVEN_D, VARLEN, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP,
                      BLOCK_M, BLOCK_N):
        pass

    class StubKernel:  # what the Autotuner needs of a JITFunction
        fn = staticmethod(kernel_source)
        arg_names = list(kernel_source.__code__.co_varnames[:13])

        def run(self, *args, grid, warmup, **kwargs):
            launches.append(kwargs)

    kernel = _common.autotuned("backward")(StubKernel())

    def timer(kernel_call, quantiles):
        kernel_call()
        chosen = (launches[-1]["BLOCK_M"], launches[-1]["BLOCK_N"])
        return [1.0 if chosen == fastest else 2.0] * 3

    kernel.do_bench = timer
    return kernel, launches


def _launch(kernel, dtype=torch.float16, q_bucket=64, **extra):
    flags = dict(zip(AUTOTUNE_KEY, (q_bucket, 64, 64, True, False, False, True, False)))
    q = torch.zeros(2, dtype=dtype)
    kernel[(1,)](q, q, 50, **flags, **extra)


def test_autotuner_remembers_the_autotuners_choice(monkeypatch):
    """RememberingAutotuner (_launch.py) skips Triton's Autotuner.run after a key's first launch,
    and launches with exactly the config, and the launch keywords, that Triton's chose."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")
    shipped = _common.config_tuples("backward", 90, 64)
    tuned = shipped[-1][:2]  # not the first shipped config: the choice is the timer's
    assert tuned != shipped[0][:2]
    kernel, launches = _stub_autotuned_kernel(monkeypatch, fastest=tuned)
    tuner_runs = []
    original_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: tuner_runs.append(1) or original_run(self, *a, **k))

    _launch(kernel)
    assert len(tuner_runs) == 1 and len(launches) == len(shipped) + 1  # every shipped config timed, then the launch
    config = kernel.best_config
    assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) == tuned
    expected = config.all_kwargs()
    assert {name: launches[-1][name] for name in expected} == expected

    _launch(kernel)  # same key: no Autotuner.run, same launch keywords
    assert len(tuner_runs) == 1 and len(launches) == 6
    assert launches[-1] == launches[-2]
    assert kernel.best_config is config

    _launch(kernel, dtype=torch.bfloat16)  # a dtype is part of Triton's key: its own choice
    _launch(kernel, q_bucket=128)  # so is every autotune key argument
    assert len(tuner_runs) == 3
    assert len(kernel.remembered) == 3

    with pytest.raises(TypeError, match="positionally"):
        kernel[(1,)](torch.zeros(2, dtype=torch.float16), 50, DQ=torch.zeros(2), q_bucket=256,
                     **dict(zip(AUTOTUNE_KEY[1:], (64, 64, True, False, False, True, False))))


@pytest.mark.parametrize("atomic_dq", [False, True])
def test_an_atomic_dq_launch_times_the_atomic_configs(monkeypatch, atomic_dq):
    """A "backward" kernel launched with ATOMIC_DQ=True (v2_atomic's dK/dV) times the
    "atomic_backward" configs, which leave shared memory for its float32 dQ tile; without it,
    the "backward" ones. D 256 on sm_90, where the two lists differ."""
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")
    kernel, launches = _stub_autotuned_kernel(monkeypatch, fastest=(32, 32))
    flags = dict(zip(AUTOTUNE_KEY, (64, 64, 256, True, False, False, True, False)))
    q = torch.zeros(2, dtype=torch.float16)
    kernel[(1,)](q, q, 50, **flags, ATOMIC_DQ=atomic_dq)
    timed = [(launch["BLOCK_M"], launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) for launch in launches[:-1]]
    expected = _common.config_tuples("atomic_backward" if atomic_dq else "backward", 90, 256)
    assert sorted(timed) == sorted(expected)
    assert _common.config_tuples("atomic_backward", 90, 256) != _common.config_tuples("backward", 90, 256)


@pytest.mark.parametrize("capability", [0, 75, 80, 86, 90])
def test_backward_query_blocks_divide_the_padded_row_statistics(capability):
    """The backward kernels read L and D without a mask, from rows padded to a multiple of
    STAT_BLOCK (Problem.padded_stats_shape): every query block they can be launched with, in
    the dQ kernel (the owned block) and the dK/dV kernel (the looped one), must divide it."""
    stat_block = _common.STAT_BLOCK.value
    for block_d, kind in itertools.product((16, 32, 64, 128, 256), ("backward", "atomic_backward")):
        for owned, looped, _, _ in _common.config_tuples(kind, capability, block_d):
            assert stat_block % owned == 0 and stat_block % looped == 0, (capability, block_d, kind, owned, looped)


def _problem(n_q, n_k, window_left, window_right):
    q = torch.empty(1, 2, n_q, 64)
    k = torch.empty(1, 2, n_k, 64)
    return _common.Problem.of(q, k, None, None, None, None, 0.125, window_left, window_right, 0.0)


@pytest.mark.parametrize("n_q, n_k, window, k_bucket", [
    (16384, 16384, (-1, -1), 16384),  # no window: the keys' length
    (16384, 16384, (-1, 0), 16384),  # causal: a query may see every key
    (16384, 16384, (255, 0), 256),  # a causal window of 256 keys
    (16384, 16384, (4095, 0), 4096),
    (16384, 16384, (300, 200), 512),  # 501 keys
    (16384, 16384, (255, -1), 16384),  # a left side alone: the last query sees 256, the first all
    (1000, 3000, (4095, 0), 4096),  # wider than the keys: binding_window drops the left side
    (200, 100, (63, 63), 128),
])
def test_the_autotune_key_buckets_the_keys_a_query_sees(n_q, n_k, window, k_bucket):
    """Windows of different widths at one length are tuned apart (Problem.keys_seen)."""
    args = _problem(n_q, n_k, *window).kernel_args
    assert args["k_bucket"] == k_bucket
    assert args["q_bucket"] == _common.seq_bucket(n_q)


# ---------------------------------------------------------------------------------------
# DirectLaunches (_launch.py): a repeated launch skips JITFunction.run, on a GPU
# ---------------------------------------------------------------------------------------

def _v2_kernels():
    from flashtile.triton_kernels import v2

    return [v2._v2_forward_kernel, v2._v2_row_stats_kernel, v2._v2_dkdv_kernel, v2._v2_dq_kernel]


def _fwd_bwd(q, k, v, grad):
    import flashtile

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flashtile.attention(q, k, v, causal=True, window_size=(40, 0), softcap=20.0)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def _unaligned_copy(t):
    """t's values in storage that starts 2 bytes past a 16-byte boundary (same strides)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.gpu
def test_direct_launches_replay_what_triton_would_launch(monkeypatch):
    """A launch whose arguments repeat a recorded one's is replayed without JITFunction.run, and
    gives the bits JITFunction.run gives: across batch sizes that share every stride (the grid
    differs, the arguments do not), an unaligned tensor (another specialisation), a second
    stream and GQA. The records hold no tensor."""
    from flashtile import testing
    from triton.runtime.jit import JITFunction

    kernels = _v2_kernels()
    jit_runs = []
    original_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: jit_runs.append(self) or original_run(self, *a, **k))

    def both_ways(q, k, v, grad):
        for kernel in kernels:
            monkeypatch.setattr(kernel.direct, "enabled", False)
        expected = _fwd_bwd(q, k, v, grad)
        for kernel in kernels:
            monkeypatch.setattr(kernel.direct, "enabled", True)
        for _ in range(3):  # the first launch of a key chooses the config, the second records it
            jit_runs.clear()
            got = _fwd_bwd(q, k, v, grad)
            for want, have in zip(expected, got):
                assert torch.equal(want, have)
        return jit_runs

    cases = []
    for batch in (2, 3):  # (B, H, N, D) strides do not hold B
        q, k, v = testing.make_qkv(batch, 4, 113, 113, 64, torch.float16, device="cuda")
        cases.append((q, k, v, testing.make_grad_out(batch, 4, 113, 64, torch.float16, device="cuda")))
    q, k, v, grad = cases[0]
    cases.append((_unaligned_copy(q), k, v, grad))
    q, k, v = testing.make_qkv(2, 8, 70, 90, 64, torch.bfloat16, device="cuda", kv_heads=2)
    cases.append((q, k, v, testing.make_grad_out(2, 8, 70, 64, torch.bfloat16, device="cuda")))
    for case in cases:
        assert both_ways(*case) == []  # the third call: every launch replayed
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert both_ways(*cases[0]) == []
    torch.cuda.synchronize()
    for kernel in kernels:
        assert kernel.direct.recorded
        for _, scalars, rest in kernel.direct.recorded.values():
            assert not any(isinstance(value, torch.Tensor) for value in list(scalars.values()) + rest)


def test_direct_launches_key_replay_and_record(monkeypatch):
    """DirectLaunches (_launch.py) without a GPU: a stand-in JIT function and compiled kernel.
    The first launch goes through the function's run and is recorded; a repeat is replayed
    with this launch's tensors and a grid sized again; another alignment or scalar value is
    not a repeat; the record keeps no tensor; warmup and a launch hook go through run."""
    import types

    from flashtile.triton_kernels import _launch

    if _launch._compat.TRITON_VERSION != (3, 6):
        pytest.skip("DirectLaunches replays only under Triton 3.6")
    replays = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *launch):
            replays.append(launch)

    compiled = Compiled()

    class Jit:
        debug = None
        arg_names = ["A", "B", "n", "BLOCK"]

        def __init__(self):
            self.device_caches = {0: (None, None, None, None, self.bind)}
            self.runs = []

        def bind(self, *args, **kwargs):
            return dict(zip(self.arg_names, args), BLOCK=kwargs["BLOCK"]), None, None

        def run(self, *args, grid, warmup, **kwargs):
            self.runs.append(args)
            return compiled

    monkeypatch.setattr(_launch, "driver", types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: "stream")))
    jit = Jit()
    kernel = _launch.DirectKernel.__new__(_launch.DirectKernel)
    kernel.fn, kernel.arg_names, kernel.direct = jit, jit.arg_names, _launch.DirectLaunches(jit)
    kernel.direct.enabled = True  # a stand-in is not a JITFunction

    def launch(a, n=7, batch=5, warmup=False):
        return kernel.run(a, b, n, grid=lambda meta: (batch * meta["BLOCK"],), warmup=warmup, BLOCK=2)

    a, b = torch.zeros(8), torch.zeros(8)
    assert launch(a) is compiled and len(jit.runs) == 1 and replays == []
    other = torch.ones(8)
    assert launch(other, batch=3) is compiled and len(jit.runs) == 1
    assert replays[-1][:6] == (6, 1, 1, "stream", "function", "metadata")  # the grid of this launch
    assert replays[-1][9] is other and replays[-1][10] is b and replays[-1][11:] == (7, 2)
    launch(torch.zeros(9)[1:])  # 4-byte offset: another specialisation
    launch(a, n=8)
    launch(a, warmup=True)
    assert len(jit.runs) == 4 and len(replays) == 1
    for _, scalars, rest in kernel.direct.recorded.values():
        assert not any(isinstance(value, torch.Tensor) for value in list(scalars.values()) + rest)
    hook = lambda metadata: None  # noqa: E731
    _launch.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(a)
    finally:
        _launch.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(jit.runs) == 5 and len(replays) == 1
