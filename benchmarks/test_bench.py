"""pytest-benchmark suite: rnn_ext against torch.nn, side by side.

Run on demand from the repository root:

    python -m pytest benchmarks -q --benchmark-only

It is not part of the test run (`python -m pytest tests`; pyproject's testpaths is tests/).
Cells and layers of RNN (tanh), LSTM and GRU, forward (inference, torch.no_grad) and
forward+backward (a training step, see cases.step), at the small and medium shapes in float32,
on CPU and on CUDA when present. CPU benchmarks use 2 threads, or RNN_EXT_BENCH_THREADS (on a
CPU that other jobs share, 1 thread gives far steadier figures). Each benchmark group is one case, so the table
shows the rnn_ext and torch.nn rows of a case next to each other; both run the same weights on
the same inputs (cases.build_case). On CUDA every call ends with a synchronisation. For
interleaved medians, the reference backend and GFLOP/s figures, use `python -m benchmarks.run`.
"""

from __future__ import annotations

import os

import pytest
import torch

from .cases import KINDS, MODES, Case, build_case, step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PASSES = {"forward": "inference", "forward+backward": "training"}

# a short budget per benchmark keeps the 48 benchmarks per device to a couple of minutes
pytestmark = pytest.mark.benchmark(max_time=0.3, min_rounds=5, warmup=True, warmup_iterations=2)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """CPU threads as in benchmarks.run (2 unless RNN_EXT_BENCH_THREADS), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RNN_EXT_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("contender", ["rnn_ext", "torch.nn"])
@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("shape", ["small", "medium"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bench(benchmark, device, kind, mode, shape, pass_name, contender):
    case = Case(kind, mode, shape, "float32", PASSES[pass_name])
    theirs, ours, inputs = build_case(case, torch.device(device))
    module = ours if contender == "rnn_ext" else theirs

    def call():
        step(case, module, inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{device} {kind} {mode} {shape} {pass_name}"
    benchmark.extra_info.update(contender=contender, kind=kind, mode=mode, shape=shape,
                                device=device)
    benchmark(call)
