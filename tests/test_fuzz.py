"""The raw-op fuzzer (tests/fuzz.py) in a child process, so that a crash shows as the child's
return code instead of killing pytest. RNN_EXT_FUZZ_SEED / _CALLS / _SECONDS change the seed and
the budget (scripts/sanitize.sh gives it a minute under the sanitizers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import op_names

ROOT = Path(__file__).resolve().parents[1]
FUZZER = Path(__file__).resolve().with_name("fuzz.py")

pytestmark = [pytest.mark.usefixtures("extension"), pytest.mark.sanitize, pytest.mark.slow]


def run_fuzzer(seed: int, calls: int, seconds: float, device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    if device == "cuda":
        env.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # an error belongs to the call that made it
    return subprocess.run([sys.executable, str(FUZZER), str(seed), str(calls), str(seconds),
                           device], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=seconds + 300)


def test_fuzz_raw_ops_raise_and_never_crash(device):
    """Thousands of malformed calls of every op (forward and backward, cells and layers) in a
    child process: each returns or raises the op's own argument error, the child exits 0,
    contract breaches raise, valid calls mixed in succeed and match the reference."""
    seed = int(os.environ.get("RNN_EXT_FUZZ_SEED", "2024"))
    calls = int(os.environ.get("RNN_EXT_FUZZ_CALLS", "3000"))
    seconds = float(os.environ.get("RNN_EXT_FUZZ_SECONDS", "20"))
    proc = run_fuzzer(seed, calls, seconds, device)
    lines = proc.stdout.splitlines()
    tried = [line for line in lines if line.startswith("CALL ")]
    if proc.returncode not in (0, 3):
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with {proc.returncode}")
        pytest.fail(f"the fuzz child {how} after {len(tried)} calls.\nLast calls:\n"
                    + "\n".join(tried[-3:]) + "\nstderr (tail):\n" + proc.stderr[-4000:])
    failures = [line for line in lines if line.startswith("FAILURE")]
    assert not failures, (f"{len(failures)} broken expectations (seed {seed}):\n"
                          + "\n".join(failures[:15]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(next(line for line in lines if line.startswith("SUMMARY "))[8:])
    print(f"fuzz ({device}, seed {seed}): {summary['calls']} calls in {summary['seconds']} s, "
          f"raised {summary['raised']}, {summary['returned_may']} tolerated returns, "
          f"known defects {summary['known_defects']}")
    names = op_names()
    assert len(names) == 25, names
    assert set(summary["valid"]) == set(names)
    # every op was exercised both ways (the budget is time-bounded, e.g. under sanitizers)
    assert min(summary["valid"].values()) >= 3, summary
    assert min(summary["malformed"].values()) >= 10, summary
    assert sum(summary["raised"].values()) > summary["calls"] // 2, summary
