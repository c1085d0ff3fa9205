"""The example applications in examples/: each one's --smoke mode, run as a user runs it
(`python examples/NAME.py ...` from the repository root, in a subprocess), must finish and
print sensible results; importing an example must do nothing but define it."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("char_lm", "name_classifier", "forecast", "seq2seq")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# One intra-op thread: the smoke sizes gain nothing from more, and on a busy machine several
# OpenMP threads waiting for each other slow a run down many times over.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # each example is a process of its own, 10-20 s


def run_example(name: str, *args: str) -> str:
    """Runs examples/NAME.py --smoke ARGS and returns its stdout; fails on a non-zero exit."""
    result = subprocess.run([sys.executable, f"examples/{name}.py", "--smoke", *args], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"{name} {' '.join(args)} exited with {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def values(pattern: str, text: str) -> list[float]:
    """Every number captured by pattern's group in text, as floats."""
    return [float(match) for match in re.findall(pattern, text)]


@pytest.mark.parametrize("name", EXAMPLES)
def test_import_has_no_side_effects(name, capsys, monkeypatch):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as `import` would (dataclasses need it)
    path_before = list(sys.path)
    spec.loader.exec_module(module)
    assert capsys.readouterr().out == ""
    assert sys.path == path_before
    args = module.parse_args(["--smoke"])
    assert args.backend == "rnn_ext" and args.smoke


def test_char_lm_trains_checkpoints_and_resumes(extension, tmp_path):
    checkpoint = tmp_path / "char_lm.pt"
    out = run_example("char_lm", "--checkpoint", str(checkpoint))
    losses = values(r"\| loss ([0-9.]+) \|", out)
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), out
    assert losses[-1] < losses[0], out
    assert "rnn_ext (extension ops)" in out
    saved = torch.load(checkpoint, map_location="cpu")
    assert saved["step"] == 30 and {"model", "optimizer", "vocab"} <= saved.keys()
    sample = out.split("sample (temperature 0.8):")[1]
    assert len(sample.strip().strip("-").strip()) > 20, out

    # Resume with the other backend: the state dicts are interchangeable.
    out = run_example("char_lm", "--checkpoint", str(checkpoint), "--resume", "--steps", "40",
                      "--backend", "torch")
    assert "resumed from step 30" in out, out
    steps = [int(step) for step in re.findall(r"step\s+(\d+)/40", out)]
    assert steps == [35, 40], out
    assert all(math.isfinite(v) for v in values(r"\| loss ([0-9.]+) \|", out))
    assert torch.load(checkpoint, map_location="cpu")["step"] == 40


def test_name_classifier_backends_agree():
    outputs = {backend: run_example("name_classifier", "--backend", backend)
               for backend in ("rnn_ext", "torch")}
    for out in outputs.values():
        assert re.search(r"held-out accuracy: [0-9.]+% on \d+ names", out), out
        assert "confusion (rows: true, columns: predicted)" in out
        assert "Thaliel" in out.split("predictions (log-probabilities):")[1]
    # The same seed and the same parameters: both backends must train the same way.
    ours, theirs = (values(r"\| loss ([0-9.]+) \|", outputs[b]) for b in ("rnn_ext", "torch"))
    assert len(ours) == 2 and ours == pytest.approx(theirs, rel=1e-2)


def test_forecast_writes_plot(tmp_path):
    plot = tmp_path / "forecast.png"
    out = run_example("forecast", "--plot", str(plot))
    mse = values(r"model\s+MSE ([0-9.]+)", out)
    assert len(mse) == 1 and math.isfinite(mse[0]), out
    train = values(r"train MSE ([0-9.]+)", out)
    assert len(train) >= 2 and train[-1] < train[0], out  # the model learns
    if HAS_MATPLOTLIB:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "skipping the plot" in out and not plot.exists()


def test_seq2seq_reports_accuracy():
    out = run_example("seq2seq", "--translate", "three hundred forty two")
    assert re.search(r"held-out exact-match accuracy: [0-9.]+% \(\d+ of 100 numbers\)", out), out
    losses = values(r"\| loss ([0-9.]+) \|", out)
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), out
    assert losses[-1] < losses[0], out  # the model learns
    assert "'three hundred forty two' ->" in out
