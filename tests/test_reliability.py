"""Reliability: hostile inputs, double backward, numerical edge cases, leaks and determinism.

1. A fuzzer calls every op of torch.ops.rnn_ext (listed from the dispatcher, arguments checked
   against each schema) with thousands of seeded, malformed argument sets in a child process, so
   that a crash shows as the child's return code instead of killing pytest. Every call must
   return or raise a Python exception; calls that break a documented contract must raise; valid
   calls mixed in must succeed and agree with rnn_ext.reference (and with themselves when their
   arguments are non-contiguous). Run it alone (repository root on PYTHONPATH):
       python tests/test_reliability.py fuzz SEED CALLS SECONDS [cpu|cuda]
   RNN_EXT_FUZZ_SEED / _CALLS / _SECONDS change the pytest run's seed and budget.
2. Edge cases against torch.nn: zero batch, zero-length sequences, non-contiguous arguments,
   NaN / inf propagation, saturation, refused dtypes, a second backward, gradients through hx
   only, no saved workspace without grad.
3. gradgradcheck through every module in float64.
4. hypothesis property tests: extension == reference backend == torch.nn, outputs and gradients.
5. Memory stays flat over training steps; Python threads; bitwise determinism (CPU, and CUDA
   when present: those tests carry "cuda" in their ids, so `-k cuda` selects them).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import OpRecorder
from rnn_ext import reference

ROOT = Path(__file__).resolve().parents[1]
ops = torch.ops.rnn_ext

HAS_CUDA = torch.cuda.is_available() and rnn_ext.extension_built_with_cuda()
NO_CUDA = "no CUDA device here, or rnn_ext was built without its CUDA kernels"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))]

pytestmark = [
    pytest.mark.usefixtures("extension"),
    # torch.nn's own notice when it runs an LSTM with projections on the CPU
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny sizes: on a small shared machine spinning OpenMP workers only slow the file down.
    The thread test sets its own count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =============================================================================================
# 1. Fuzzing the raw ops (the code below runs in the child process)
# =============================================================================================

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
SAVED = {"rnn": 1, "lstm": 5, "gru": 5}
OTHER_DTYPES = (torch.int32, torch.int64, torch.bool, torch.uint8, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64)
BAD_NONLINEARITIES = ("", "TANH", "Tanh", "sigmoid", "relu ", " tanh", "tanh\x00", "gelu",
                      "tanh" * 50, 1, 0.5, None, ["tanh"])  # (the parser takes b"tanh" for a str)


def op_names() -> list[str]:
    """Every op of the rnn_ext library, as the dispatcher knows them."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("rnn_ext::"))


def _random_batch_sizes(rng: random.Random, batch: int) -> list[int]:
    steps = rng.randint(1, 4)
    if batch == 0:
        return [0] * steps
    return [batch] + sorted((rng.randint(0, batch) for _ in range(steps - 1)), reverse=True)


def _op_parts(name: str) -> tuple[str, str, str]:
    """(family, kind, direction) of a device op: kind 'cell' (the pointwise and cell inference
    ops) or 'layer' (the recurrence and layer inference ops); direction 'forward', 'backward'
    or 'inference'."""
    family, rest = name.split("_", 1)
    return (family, *{"pointwise_forward": ("cell", "forward"),
                      "pointwise_backward": ("cell", "backward"),
                      "cell_inference": ("cell", "inference"),
                      "recurrence": ("layer", "forward"),
                      "recurrence_backward": ("layer", "backward"),
                      "layer_inference": ("layer", "inference")}[rest])


def valid_args(name: str, rng: random.Random, dtype: torch.dtype, device: str = "cpu") -> dict:
    """A random, small, valid argument set of op `name` (shapes of csrc/registration.cpp),
    in schema order, its tensors on `device` (batch_sizes on the CPU, as PackedSequence's)."""
    if name == "differentiable_backward":
        return _differentiable_backward_args(rng, dtype, device)
    if name.endswith(("_cell", "_layer")):  # a composite op: the inference op's arguments
        return valid_args(f"{name}_inference", rng, dtype, device)
    family, kind, direction = _op_parts(name)
    G, S = GATES[family], SAVED[family]
    H = rng.randint(1, 5)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device, dtype)

    def maybe(*shape):
        return t(*shape) if rng.random() < 0.7 else None

    def nonlinearity():
        return rng.choice(("tanh", "relu"))

    a: dict = {}
    if kind == "cell":
        B = rng.randint(0, 5)
        if direction == "inference":
            I = rng.randint(1, 4)
            a["input"] = t(B, I)
            a["hx"] = t(B, H)
            if family == "lstm":
                a["cx"] = t(B, H)
            a.update(w_ih=t(G * H, I), w_hh=t(G * H, H), b_ih=maybe(G * H), b_hh=maybe(G * H))
            if family == "rnn":
                a["nonlinearity"] = nonlinearity()
        elif direction == "forward":
            a.update(xg=t(B, G * H), hg=t(B, G * H), b_ih=maybe(G * H), b_hh=maybe(G * H))
            if family == "rnn":
                a["nonlinearity"] = nonlinearity()
            else:
                a["cx" if family == "lstm" else "hx"] = t(B, H)
        elif family == "rnn":
            a.update(grad_hy=t(B, H), hy=t(B, H), nonlinearity=nonlinearity())
        elif family == "lstm":
            a.update(grad_hy=t(B, H), grad_cy=t(B, H), workspace=t(B, S * H))
        else:
            a.update(grad_hy=t(B, H), workspace=t(B, S * H))
        return a
    B = rng.randint(0, 4)
    sizes = _random_batch_sizes(rng, B)
    N = sum(sizes)
    proj = family == "lstm" and rng.random() < 0.4
    P = rng.randint(1, 5) if proj else H
    w_hr = t(P, H) if proj else None
    steps = dict(batch_sizes=torch.tensor(sizes, dtype=torch.int64), reverse=rng.random() < 0.5)
    if direction in ("forward", "inference"):
        if direction == "inference":  # x and w_ih in place of xg; no workspace flag
            I = rng.randint(1, 4)
            a.update(x=t(N, I), w_ih=t(G * H, I), b_ih=maybe(G * H))
        else:
            a["xg"] = t(N, G * H)
        a.update(w_hh=t(G * H, P), b_hh=maybe(G * H))
        if family == "lstm":
            a.update(w_hr=w_hr, h0=t(B, P), c0=t(B, H))
        else:
            a["h0"] = t(B, H)
        a.update(steps)
        if family == "rnn":
            a["nonlinearity"] = nonlinearity()
        elif direction == "forward":
            a["save_workspace"] = rng.random() < 0.7
    else:
        a.update(grad_y=t(N, P), grad_h_n=t(B, P))
        if family == "lstm":
            a["grad_c_n"] = t(B, H)
        a["w_hh"] = t(G * H, P)
        if family == "lstm":
            a["w_hr"] = w_hr
        a.update(h0=t(B, P), y=t(N, P))
        if family != "rnn":
            a["workspace"] = t(N, S * H)
        a.update(steps)
        if family == "rnn":
            a["nonlinearity"] = nonlinearity()
    return a


def _differentiable_backward_args(rng: random.Random, dtype: torch.dtype, device: str) -> dict:
    """differentiable_backward's: a differentiable op, valid inputs of it (requiring grad) and
    random gradients of its differentiable outputs."""
    family, op = rng.choice(("rnn", "lstm", "gru")), rng.choice(("cell", "recurrence"))
    args = valid_args(f"{family}_{op}", rng, dtype, device)
    grads = [torch.randn_like(o) for o in reference_outputs(f"{family}_{op}", args)]
    nonlinearity = args.pop("nonlinearity", None)
    batch_sizes, reverse = args.pop("batch_sizes", None), args.pop("reverse", False)
    args.pop("save_workspace", None)
    mode = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}[nonlinearity] if nonlinearity else family.upper()
    return {"op": op, "mode": mode,
            "inputs": [None if t is None else t.requires_grad_(True) for t in args.values()],
            "grads": grads, "batch_sizes": batch_sizes, "reverse": reverse}


def reference_outputs(name: str, a: dict) -> tuple:
    """What rnn_ext.reference computes for forward op `name` (its state outputs only)."""
    if name.endswith(("_cell", "_layer")):
        name += "_inference"
    family, kind, direction = _op_parts(name)
    if kind == "cell" and direction == "inference":  # the forward op's arguments, from ATen GEMMs
        a = dict(xg=a["input"] @ a["w_ih"].t(), hg=a["hx"] @ a["w_hh"].t(), b_ih=a["b_ih"],
                 b_hh=a["b_hh"], cx=a.get("cx"), hx=a["hx"], nonlinearity=a.get("nonlinearity"))
    if kind == "cell":
        if family == "rnn":
            return (reference.rnn_cell_step(a["xg"], a["hg"], a["b_ih"], a["b_hh"],
                                            a["nonlinearity"]),)
        if family == "lstm":
            return tuple(reference.lstm_cell_step(a["xg"], a["hg"], a["b_ih"], a["b_hh"],
                                                  a["cx"]))
        return (reference.gru_cell_step(a["xg"], a["hg"], a["b_ih"], a["b_hh"], a["hx"]),)
    mode = {"rnn": {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(a.get("nonlinearity")),
            "lstm": "LSTM", "gru": "GRU"}[family]
    xg = a["xg"] if "xg" in a else torch.nn.functional.linear(a["x"], a["w_ih"], a["b_ih"])
    y, h_n, c_n = reference.layer_recurrence(mode, xg, a["w_hh"], a["b_hh"], a.get("w_hr"),
                                             a["h0"], a.get("c0"), a["batch_sizes"],
                                             a["reverse"])
    return (y, h_n) if c_n is None else (y, h_n, c_n)


def noncontiguous(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A tensor of t's shape in an unusual layout: transposed in memory, strided, (values
    changed) a stride-0 expansion of t's first row, a negated view, or at a storage offset."""
    choice = rng.randrange(5)
    if choice == 3:  # contiguous, but the lazily negated view of -t
        return torch._neg_view(-t) if t.is_floating_point() else t
    if choice == 4:  # contiguous at a storage offset
        return t.new_zeros(t.numel() + 3)[3:].view(t.shape).copy_(t)
    if choice == 0 and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if choice == 1 and t.dim() >= 1 and t.size(0) > 0 and t.dtype != torch.int64:
        return t[:1].expand(t.shape)
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    view = wide[..., ::2]
    view.copy_(t)
    return view


def describe(v) -> str:
    if isinstance(v, torch.Tensor):
        s = f"T{list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
        if v.device.type != "cpu":
            s += f"@{v.device.type}"
        if not v.is_contiguous():
            s += f":strides{list(v.stride())}"
        if (v.device.type == "cpu" and v.dim() == 1 and v.numel() <= 6
                and not v.is_floating_point() and not v.is_complex()):
            s += f"={v.tolist()}"
        if v.requires_grad:
            s += ":rg"
        return s
    r = repr(v)
    return r if len(r) <= 24 else r[:21] + "..."


class Call:
    """One call of op `name`: positional values, or keyword arguments (`kw`)."""

    def __init__(self, name: str, args: dict, kw: bool = False, extra=(), device="cpu"):
        self.name, self.args, self.kw, self.extra = name, args, kw, list(extra)
        self.device = torch.device(device)  # where the valid arguments live
        self.drop_last = False

    def run(self):
        op = getattr(ops, self.name)
        if self.kw:
            names = list(self.args)[:-1] if self.drop_last else list(self.args)
            return op(**{k: self.args[k] for k in names}, **dict(self.extra))
        values = list(self.args.values())
        if self.drop_last:
            values = values[:-1]
        return op(*values, *self.extra)

    def __str__(self):
        body = ", ".join(f"{k}={describe(v)}" for k, v in self.args.items())
        if self.extra:
            body += ", EXTRA " + ", ".join(describe(v) for v in self.extra)
        if self.drop_last:
            body += " (last argument dropped)"
        return f"{self.name}({'kw: ' if self.kw else ''}{body})"


def _tensor_names(a: dict, touched: set, required: dict | None = None) -> list[str]:
    return [k for k, v in a.items() if isinstance(v, torch.Tensor) and k != "batch_sizes"
            and k not in touched and (required is None or required[k])]


# Each mutation changes one argument set in place and returns "raise" (the call breaks the
# op's contract: it must raise), "may" (it may legitimately run), or None (not applicable).

def _mut_shape(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names or "<shape>" in touched:  # two arguments reshaped alike could agree again
        return None
    touched.add("<shape>")
    k = rng.choice(names)
    old = c.args[k]
    while True:
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        if shape != tuple(old.shape):
            break
    c.args[k] = torch.randn(shape, dtype=torch.float64).to(old.device, old.dtype)
    touched.add(k)
    return "raise"


def _mut_empty_or_transposed(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names or "<shape>" in touched:  # two arguments reshaped alike could agree again
        return None
    touched.add("<shape>")
    k = rng.choice(names)
    old = c.args[k]
    form = rng.randrange(4)
    if form == 0:
        new = old.new_empty(0)
    elif form == 1:
        new = old.new_ones(())
    elif form == 2 and old.dim() == 2:
        new = old.t()  # transposed: a wrong shape unless square (then a valid layout)
    else:
        shape = list(old.shape) or [1]
        shape[rng.randrange(len(shape))] = 0
        new = old.new_empty(shape)
    c.args[k] = new
    touched.add(k)
    return "raise" if new.shape != old.shape else "may"


def _mut_dtype(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names or "<dtype>" in touched:  # two arguments cast alike could agree again
        return None
    touched.add("<dtype>")
    k = rng.choice(names)
    old = c.args[k]
    dtype = rng.choice([d for d in OTHER_DTYPES if d != old.dtype])
    c.args[k] = old.to(dtype)
    touched.add(k)
    return "raise"


def _mut_all_dtypes(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names:
        return None
    dtype = rng.choice(OTHER_DTYPES)
    for k in names:
        c.args[k] = c.args[k].to(dtype)
        touched.add(k)
    return "raise" if not dtype.is_floating_point else "may"


def _mut_none(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names:
        return None
    k = rng.choice(names)
    c.args[k] = None
    touched.add(k)
    return "raise" if required[k] else "may"


def _mut_scalar(c, rng, touched, required):
    names = _tensor_names(c.args, touched)
    if not names:
        return None
    k = rng.choice(names)
    c.args[k] = rng.choice([0, 1, 2.5, float("nan"), True, "xg", [1.0, 2.0]])
    touched.add(k)
    return "raise"


def _mut_meta(c, rng, touched, required):
    names = _tensor_names(c.args, touched) + (["batch_sizes"] if _has_batch_sizes(c, touched)
                                              else [])
    if not names:
        return None
    k = rng.choice(names)
    c.args[k] = c.args[k].to("meta")
    touched.add(k)
    # A meta argument sends the call to the fake (meta) implementation, which checks nothing:
    # it may return even when another mutation broke the contract.
    return "meta"


def _mut_device(c, rng, touched, required):
    """One argument on another device than the rest: the CPU when the call runs on a GPU,
    batch_sizes on the GPU (it must be a CPU tensor)."""
    device = c.device
    if device.type == "cpu" and not torch.cuda.is_available():
        return None
    names = _tensor_names(c.args, touched) if device.type != "cpu" else []
    if _has_batch_sizes(c, touched) and torch.cuda.is_available():
        names.append("batch_sizes")
    if not names:
        return None
    k = rng.choice(names)
    c.args[k] = c.args[k].to("cuda" if k == "batch_sizes" or device.type == "cpu" else "cpu")
    touched.add(k)
    return "raise"


def _has_batch_sizes(c, touched) -> bool:
    """Whether the call has an untouched batch_sizes (a layer's: differentiable_backward's is
    None for a cell)."""
    return c.args.get("batch_sizes") is not None and "batch_sizes" not in touched


def _mut_batch_sizes(c, rng, touched, required):
    if not _has_batch_sizes(c, touched):
        return None
    touched.add("batch_sizes")
    bs = c.args["batch_sizes"].tolist()
    B = bs[0]
    form = rng.randrange(9)
    if form == 0:  # a negative entry
        bs[rng.randrange(len(bs))] = -rng.randint(1, 2 ** 40)
        new = torch.tensor(bs)
    elif form == 1 and B > 0:  # increasing somewhere
        i = rng.randrange(len(bs))
        new = torch.tensor(bs[:i + 1] + [bs[i] + rng.randint(1, 3)] + bs[i + 1:])
    elif form == 2 and B > 0:  # wrong sum (or, after a trailing 0, rising): one more step
        new = torch.tensor(bs + [1])
    elif form == 3:  # wrong dtype
        new = torch.tensor(bs, dtype=rng.choice([torch.int32, torch.int16, torch.float64,
                                                 torch.float32, torch.bool, torch.uint8]))
    elif form == 4:  # 2-D, 0-D
        new = torch.tensor([bs]) if rng.random() < 0.5 else torch.tensor(B)
    elif form == 5:  # empty
        new = torch.tensor([], dtype=torch.int64)
    elif form == 6:  # batch_sizes[0] is not h0's batch
        new = torch.tensor([B + rng.randint(1, 3)] + bs[1:])
    elif form == 7:  # huge values
        new = torch.tensor([2 ** 62] + bs[1:])
    else:  # a shuffled, rising sequence of the same sum
        if len(bs) < 2 or bs[-1] == bs[0]:
            new = torch.tensor(bs + [B + 1])
        else:
            new = torch.tensor(list(reversed(bs)))
    c.args["batch_sizes"] = new
    return "raise"


def _mut_nonlinearity(c, rng, touched, required):
    if "nonlinearity" not in c.args or "nonlinearity" in touched:
        return None
    c.args["nonlinearity"] = rng.choice(BAD_NONLINEARITIES)
    touched.add("nonlinearity")
    return "raise"


def _mut_bool(c, rng, touched, required):
    names = [k for k in ("reverse", "save_workspace") if k in c.args and k not in touched]
    if not names:
        return None
    k = rng.choice(names)
    c.args[k] = rng.choice([None, 0, 1, 2, -1, 1.5, "yes", "", torch.tensor(True), [True]])
    touched.add(k)
    return "may"  # torch's argument parser accepts None / numbers for a bool


def _mut_arity(c, rng, touched, required):
    form = rng.randrange(3)
    if form == 0:
        c.drop_last = True
    elif form == 1:
        c.extra = [torch.zeros(1)] if not c.kw else [("bogus", torch.zeros(1))]
    else:
        c.kw = True
        c.extra = [("not_an_argument", 1)]
    return "raise"


def _mut_random_everything(c, rng, touched, required, schema=None):
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Tensor" in kind:
            if kind.startswith("Optional") and rng.random() < 0.3:
                c.args[arg.name] = None
                continue
            shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
            dtype = rng.choice(OTHER_DTYPES)
            c.args[arg.name] = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
        elif kind == "bool":
            c.args[arg.name] = rng.random() < 0.5
        else:
            c.args[arg.name] = rng.choice(("tanh", "relu") + BAD_NONLINEARITIES)
    return "may"


LOCAL_MUTATIONS = [_mut_shape, _mut_empty_or_transposed, _mut_dtype, _mut_none, _mut_scalar,
                   _mut_meta, _mut_batch_sizes, _mut_batch_sizes, _mut_nonlinearity, _mut_bool,
                   _mut_device]
GLOBAL_MUTATIONS = [_mut_all_dtypes, _mut_arity, _mut_random_everything]


def _outputs(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [r for r in items if isinstance(r, torch.Tensor)]


def _touch(result) -> None:
    """Reads every output (a use-after-free or garbage shape shows here, not later)."""
    for r in _outputs(result):
        if r.device.type != "meta" and r.numel() and (r.is_floating_point() or r.is_complex()):
            r.abs().sum().item()


def _backward_through(result, inputs) -> None:
    outs = [r for r in _outputs(result) if r.requires_grad]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if outs and leaves:
        torch.autograd.grad([o.sum() for o in outs], leaves, allow_unused=True)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float | None = None) -> bool:
    if tol is None:
        tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    return a.shape == b.shape and torch.allclose(a, b.to(a.dtype), atol=tol, rtol=tol)


def fuzz_main(seed: int, calls: int, seconds: float, device: str = "cpu") -> int:
    """The child process: returns 0 when every expectation held, 3 when some did not (then
    FAILURE lines say which); a crash kills the process (the parent reports the last CALL)."""
    torch.set_num_threads(int(os.environ.get("RNN_EXT_FUZZ_THREADS", "1")))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    names = op_names()
    schemas = {n: getattr(ops, n).default._schema for n in names}
    required = {n: {a.name: str(a.type) == "Tensor" for a in s.arguments}
                for n, s in schemas.items()}
    failures: list[str] = []
    for n in names:  # the generators follow the schemas (a new or changed op fails here)
        try:
            got = list(valid_args(n, rng, torch.float64, device))
        except Exception as e:  # noqa: BLE001
            got = [f"no generator: {e!r}"]
        want = [a.name for a in schemas[n].arguments]
        if got != want:
            failures.append(f"FAILURE schema {n}: generator gives {got}, schema has {want}")
    if failures:
        print("\n".join(failures), flush=True)
        return 3
    stats = {"valid": {n: 0 for n in names}, "malformed": {n: 0 for n in names},
             "raised": {}, "returned_may": 0, "raised_may": 0, "seconds": 0.0, "examples": {}}
    start = time.monotonic()
    deadline = start + seconds

    def fail(kind, index, call, detail):
        failures.append(f"FAILURE {kind} #{index} {call}: {detail}")
        print(failures[-1], flush=True)

    for index in range(calls):
        if time.monotonic() > deadline:
            break
        name = names[index % len(names)]
        dtype = rng.choice((torch.float32, torch.float64))
        call = Call(name, valid_args(name, rng, dtype, device), kw=rng.random() < 0.2,
                    device=device)
        inference = name.endswith("inference")  # a forward without a backward
        differentiable = name.endswith(("_recurrence", "_cell", "_layer"))  # an autograd node
        forward = differentiable or inference or name.endswith("_pointwise_forward")
        if rng.random() < 0.25:  # ------------------------------------------------ valid
            stats["valid"][name] += 1
            form = rng.randrange(3)
            if form == 1:  # the same values, non-contiguous
                nc = dict(call.args)
                for k, v in nc.items():
                    if isinstance(v, torch.Tensor) and rng.random() < 0.6:
                        nc[k] = noncontiguous(v, rng)
                contiguous = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                              for k, v in nc.items()}
                call.args = nc
            grad = differentiable and form == 2
            if grad:
                if "save_workspace" in call.args:
                    call.args["save_workspace"] = True
                for k, v in call.args.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        v.requires_grad_(True)
            print(f"CALL {index} valid{['', '-noncontiguous', '-autograd'][form]} {call}",
                  flush=True)
            try:
                result = call.run()
                _touch(result)
                outs = _outputs(result)
                if form == 1:
                    again = _outputs(Call(name, contiguous).run())
                    for i, (a, b) in enumerate(zip(outs, again)):
                        # (equal up to rounding: a GEMM may sum in another order)
                        if not _close(a, b, 1e-12 if a.dtype == torch.float64 else 1e-5):
                            fail("noncontiguous", index, call,
                                 f"output {i} differs from the contiguous call's by "
                                 f"{(a - b).abs().max().item():.3g}: {a.tolist()} vs "
                                 f"{b.tolist()}"[:600])
                if forward:
                    want = reference_outputs(name, call.args)
                    for i, (a, b) in enumerate(zip(outs, want)):
                        if not _close(a.detach(), b.detach()):
                            fail("reference", index, call, f"output {i} differs from reference")
                if grad:
                    inputs = list(call.args.values())
                    leaves = [t for t in inputs if isinstance(t, torch.Tensor)
                              and t.requires_grad]
                    ws = [torch.randn_like(o) for o in want]
                    got_g = torch.autograd.grad(
                        [(o * w).sum() for o, w in zip(outs, ws)], leaves, allow_unused=True)
                    ref_g = torch.autograd.grad(
                        [(o * w).sum() for o, w in zip(want, ws)], leaves, allow_unused=True)
                    for i, (a, b) in enumerate(zip(got_g, ref_g)):
                        a = torch.zeros_like(leaves[i]) if a is None else a
                        b = torch.zeros_like(leaves[i]) if b is None else b
                        if not _close(a, b):
                            fail("gradient", index, call, f"gradient {i} differs from reference")
            except Exception as e:  # noqa: BLE001
                fail("valid-call-raised", index, call, f"{type(e).__name__}: {e}"[:400])
            continue
        # ---------------------------------------------------------------------- malformed
        stats["malformed"][name] += 1
        touched: set[str] = set()
        expects, applied = [], []
        if rng.random() < 0.15:
            mutation = rng.choice(GLOBAL_MUTATIONS)
            if mutation is _mut_random_everything:
                expects.append(mutation(call, rng, touched, required[name],
                                        schema=schemas[name]))
            else:
                expects.append(mutation(call, rng, touched, required[name]))
            applied.append(mutation.__name__[5:])
        else:
            for _ in range(1 if rng.random() < 0.7 else 2):
                for _attempt in range(10):
                    mutation = rng.choice(LOCAL_MUTATIONS)
                    e = mutation(call, rng, touched, required[name])
                    if e is not None:
                        expects.append(e)
                        applied.append(mutation.__name__[5:])
                        break
        must_raise = "raise" in expects and "meta" not in expects
        if forward and rng.random() < 0.3:  # through the autograd registration
            for v in call.args.values():
                if (isinstance(v, torch.Tensor) and v.device.type != "meta"
                        and (v.is_floating_point() or v.is_complex())):
                    v.requires_grad_(True)
        print(f"CALL {index} malformed[{' '.join(f'{m}:{e}' for m, e in zip(applied, expects))}] "
              f"{call}", flush=True)
        try:
            result = call.run()
        except Exception as e:  # noqa: BLE001
            key = type(e).__name__
            stats["raised"][key] = stats["raised"].get(key, 0) + 1
            stats["examples"].setdefault(key, f"{call} -> {e}"[:300])
            if "INTERNAL ASSERT FAILED" in str(e):
                fail("internal-assert", index, call, str(e)[:400])
            if not must_raise:
                stats["raised_may"] += 1
            continue
        if must_raise:
            fail("missing-validation", index, call, "returned instead of raising")
            continue
        stats["returned_may"] += 1
        try:
            _touch(result)
            _backward_through(result, call.args.values())
        except Exception:  # noqa: BLE001
            pass
    stats["seconds"] = round(time.monotonic() - start, 2)
    stats["calls"] = sum(stats["valid"].values()) + sum(stats["malformed"].values())
    print("SUMMARY " + json.dumps(stats), flush=True)
    return 3 if failures else 0


def _run_fuzz_child(seed: int, calls: int, seconds: float, device: str
                    ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    if device == "cuda":
        env.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # an error belongs to the call that made it
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "fuzz", str(seed),
                           str(calls), str(seconds), device], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=seconds + 300)


@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_raw_ops_raise_and_never_crash(device):
    """Thousands of malformed calls of every op (forward and backward, cells and layers) in a
    child process: each returns or raises, the child exits 0, contract breaches raise, valid
    calls mixed in succeed and match the reference."""
    seed = int(os.environ.get("RNN_EXT_FUZZ_SEED", "2024"))
    calls = int(os.environ.get("RNN_EXT_FUZZ_CALLS", "3000"))
    seconds = float(os.environ.get("RNN_EXT_FUZZ_SECONDS", "20"))
    proc = _run_fuzz_child(seed, calls, seconds, device)
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
          f"raised {summary['raised']}, {summary['returned_may']} tolerated returns")
    names = op_names()
    assert len(names) == 25, names
    assert set(summary["valid"]) == set(names)
    # every op was exercised both ways (the budget is time-bounded, e.g. under sanitizers)
    assert min(summary["valid"].values()) >= 3, summary
    assert min(summary["malformed"].values()) >= 10, summary
    assert sum(summary["raised"].values()) > summary["calls"] // 2, summary


# =============================================================================================
# Shared helpers of the module tests
# =============================================================================================

# name -> (torch.nn class, rnn_ext class, constructor kwargs); layers take (I, H, ...), cells (I, H)
LAYERS = {
    "RNN_TANH": (nn.RNN, rnn_ext.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, rnn_ext.RNN, {"nonlinearity": "relu"}),
    "LSTM": (nn.LSTM, rnn_ext.LSTM, {}),
    "LSTM_PROJ": (nn.LSTM, rnn_ext.LSTM, {"proj_size": 2}),
    "GRU": (nn.GRU, rnn_ext.GRU, {}),
}
CELLS = {
    "RNNCell_tanh": (nn.RNNCell, rnn_ext.RNNCell, {"nonlinearity": "tanh"}),
    "RNNCell_relu": (nn.RNNCell, rnn_ext.RNNCell, {"nonlinearity": "relu"}),
    "LSTMCell": (nn.LSTMCell, rnn_ext.LSTMCell, {}),
    "GRUCell": (nn.GRUCell, rnn_ext.GRUCell, {}),
}
MODULES = {**LAYERS, **CELLS}


def is_cell(name: str) -> bool:
    return name in CELLS


def make_pair(name: str, dtype=torch.float64, device="cpu", seed=0, input_size=3,
              hidden_size=4, **kwargs):
    """(torch.nn module, rnn_ext module) with identical weights."""
    nn_cls, ext_cls, extra = MODULES[name]
    torch.manual_seed(seed)
    ref = nn_cls(input_size, hidden_size, **extra, **kwargs).to(device=device, dtype=dtype)
    ext = ext_cls(input_size, hidden_size, **extra, **kwargs).to(device=device, dtype=dtype)
    ext.load_state_dict(ref.state_dict(), strict=True)
    return ref, ext


def _is_cell_module(module) -> bool:  # (by duck type: rnn_ext's classes need not subclass)
    return not hasattr(module, "num_layers")


def _is_lstm_module(module) -> bool:  # nn.LSTM, nn.LSTMCell and rnn_ext's
    return "LSTM" in type(module).__name__


def state_sizes(module) -> list[tuple[int, ...]]:
    """Shapes of hx without the batch: [(L*D, P)] (+ [(L*D, H)] for an LSTM); cells [(H,)]."""
    if _is_cell_module(module):
        return [(module.hidden_size,)] * (2 if _is_lstm_module(module) else 1)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size
    sizes = [(layers, out)]
    if _is_lstm_module(module):
        sizes.append((layers, module.hidden_size))
    return sizes


def make_input(module, T, B, dtype=torch.float64, device="cpu", gen=None, scale=1.0):
    """x ([T, B, I] for layers (batch_first respected), [B, I] for cells) and hx (batch B)."""
    gen = gen or torch.Generator().manual_seed(1)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device,
                                                                                     dtype)

    if _is_cell_module(module):
        x = rnd(B, module.input_size)
        states = [rnd(B, *s) for s in state_sizes(module)]
    else:
        x = rnd(B, T, module.input_size) if module.batch_first else rnd(T, B, module.input_size)
        states = [rnd(s[0], B, s[1]) for s in state_sizes(module)]
    return x, (tuple(states) if len(states) == 2 else states[0])


def flatten(obj) -> list[torch.Tensor]:
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in flatten(o)]


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def run(module, x, hx, grad_x=True, grad_hx=True, params=True, seed=5, wrap=None):
    """Forward on fresh leaf copies of x and hx (`wrap` turns the x leaf into the module's
    input, e.g. packs it), then the gradient of a fixed random projection of every output
    w.r.t. the leaves that require grad. Returns (outputs, grads), grads ordered x, hx...,
    parameters (None for a leaf that does not require grad)."""
    x = leaf(x, grad_x)
    states = None if hx is None else [leaf(h, grad_hx) for h in flatten(hx)]
    hx_arg = None if states is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    outs = flatten(module(wrap(x) if wrap else x, hx_arg))
    leaves = [x] + (states or []) + ([p for p in module.parameters()] if params else [])
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    wanted = [t for t in leaves if t.requires_grad]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    found = iter(torch.autograd.grad(loss, wanted, allow_unused=True)) if wanted else iter(())
    grads = [next(found) if t.requires_grad else None for t in leaves]
    return [o.detach() for o in outs], grads


def assert_same_nan(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), (
        f"{what}: NaN at {a.isnan().nonzero().tolist()} but torch.nn has "
        f"{b.isnan().nonzero().tolist()}")


def assert_close(a, b, tol, what, equal_nan=False):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


# =============================================================================================
# 2. Edge cases, against torch.nn
# =============================================================================================

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,batch_first", [(n, bf) for n in LAYERS for bf in (False, True)]
                         + [(n, False) for n in CELLS])
def test_zero_batch(name, batch_first, device):
    """B = 0 runs forward and backward and gives torch.nn's shapes (and zero gradients)."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    ref, ext = make_pair(name, device=device, **kw)
    x, hx = make_input(ref, 3, 0, device=device)
    for given in (hx, None):
        want_out, want_grads = run(ref, x, given)
        got_out, got_grads = run(ext, x, given)
        assert [o.shape for o in got_out] == [o.shape for o in want_out]
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            assert (a is None) == (b is None), i
            if a is not None:
                assert a.shape == b.shape and torch.equal(a, b), f"grad {i}"


@pytest.mark.parametrize("form", ["time_major", "batch_first", "unbatched"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_zero_length_sequence_raises_like_torch_nn(name, form):
    ref, ext = make_pair(name, batch_first=form == "batch_first")
    x = {"time_major": torch.zeros(0, 2, 3), "batch_first": torch.zeros(2, 0, 3),
         "unbatched": torch.zeros(0, 3)}[form].double()
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        ext(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_non_contiguous_inputs_and_states(name, device):
    """Transposed inputs, strided and stride-0 (expanded) states: torch.nn's results."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True, batch_first=True)
    ref, ext = make_pair(name, device=device, **kw)
    B = 3
    x, hx = make_input(ref, 4, B, device=device)
    if is_cell(name):
        x_nc = x.t().contiguous().t()                                   # column-major [B, I]
    else:
        x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)           # [B, T, I], T-major
    states = flatten(hx)
    odd = [torch.cat([s, s], -1)[..., ::2] for s in states[:1]]          # strided
    odd += [s.narrow(-2, 0, 1).expand(s.shape) for s in states[1:]]     # expanded (stride 0)
    if is_cell(name) and len(states) == 1:
        odd = [states[0][:1].expand(states[0].shape)]
    assert not x_nc.is_contiguous() and not any(s.is_contiguous() for s in odd)
    hx_nc = tuple(odd) if isinstance(hx, tuple) else odd[0]
    want_out, want_grads = run(ref, x_nc.contiguous(),
                               tuple(s.contiguous() for s in odd) if isinstance(hx, tuple)
                               else odd[0].contiguous())
    got_out, got_grads = run(ext, x_nc, hx_nc)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_close(a, b, 1e-10, f"output {i}")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, 1e-10, f"grad {i}")


def _poison(x, hx, value, cell):
    """x and hx with `value` at a few positions (a row/time step each)."""
    x = x.clone()
    if cell:
        x[0, 1] = value
    else:
        x[1, 0, 1] = value
        x[3, 2, 0] = -value if value == float("inf") else value
    states = [s.clone() for s in flatten(hx)]
    states[0][..., 1, 0] = value if value != float("inf") else 0.5  # batch row 1 of hx
    return x, (tuple(states) if isinstance(hx, tuple) else states[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODULES))
def test_nan_and_inf_propagate_like_torch_nn(name, dtype, device):
    """NaN in the input and in hx: outputs and all gradients are NaN exactly where torch.nn's
    are, and equal elsewhere. inf in the input: the outputs' NaN positions and finite values
    match (gradients run; where 0 * inf meets a GEMM their NaN positions are the BLAS's)."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True)
    ref, ext = make_pair(name, dtype=dtype, device=device, **kw)
    x, hx = make_input(ref, 5, 3, dtype=dtype, device=device)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    x_nan, hx_nan = _poison(x, hx, float("nan"), is_cell(name))
    want_out, want_grads = run(ref, x_nan, hx_nan)
    got_out, got_grads = run(ext, x_nan, hx_nan)
    assert any(o.isnan().any() for o in want_out)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_same_nan(a, b, f"output {i}")
        assert_close(a, b, tol, f"output {i}", equal_nan=True)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_same_nan(a, b, f"grad {i}")
        assert_close(a, b, tol, f"grad {i}", equal_nan=True)

    x_inf, hx_inf = _poison(x, hx, float("inf"), is_cell(name))
    want_out, _ = run(ref, x_inf, hx_inf)
    got_out, got_grads = run(ext, x_inf, hx_inf)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert_same_nan(a, b, f"output {i} (inf input)")
        assert_close(a, b, tol, f"output {i} (inf input)", equal_nan=True)
    assert all(g is not None for g in got_grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_relu_backward_passes_gradient_through_nan_like_torch(dtype, device):
    """torch's relu backward is threshold_backward(grad, y, 0): `y <= 0 ? 0 : grad`, so a NaN
    activation passes its gradient on. The fused RNN relu backward must do the same, or every
    gradient upstream of a NaN differs from torch.nn's (finite there, zero here)."""
    _ = rnn_ext  # the ops are registered by the import
    hy = torch.tensor([[float("nan"), 1.0, 0.0, -1.0, float("inf"), -float("inf")]],
                      dtype=dtype, device=device)
    grad = torch.tensor([[2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], dtype=dtype, device=device)
    want = torch.ops.aten.threshold_backward(grad, hy, 0)
    assert_close(ops.rnn_pointwise_backward(grad, hy, "relu"), want, 0, "rnn_pointwise_backward relu")
    g_xg = ops.rnn_recurrence_backward(grad, torch.zeros_like(grad), torch.eye(6, dtype=dtype,
                                  device=device), torch.zeros_like(grad), hy,
                                  torch.tensor([1]), False, "relu")[0]
    assert_close(g_xg, want, 0, "rnn_recurrence_backward relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float64, 1e30)],
                         ids=["f32-1e4", "f64-1e30"])
@pytest.mark.parametrize("name", list(MODULES))
def test_saturating_inputs_like_torch_nn(name, dtype, scale, device):
    """Huge inputs and states: finite wherever torch.nn's results are, and equal to them."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True)
    ref, ext = make_pair(name, dtype=dtype, device=device, **kw)
    x, hx = make_input(ref, 4, 3, dtype=dtype, device=device, scale=scale)
    want_out, want_grads = run(ref, x, hx)
    got_out, got_grads = run(ext, x, hx)
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    for what, got, want in (("output", got_out, want_out), ("grad", got_grads, want_grads)):
        for i, (a, b) in enumerate(zip(got, want)):
            finite = b.isfinite()
            assert finite.any(), f"{what} {i}: torch.nn has no finite value to compare"
            assert a[finite].isfinite().all(), f"{what} {i}: non-finite where torch.nn is finite"
            # saturated values are exact; the rest scale with the inputs
            atol = rel * max(1.0, float(b[finite].abs().max()))
            torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=rel,
                                       msg=lambda m: f"{what} {i}: {m}")


def _bad_dtype_cases(name):
    ref, _ = make_pair(name)
    x, hx = make_input(ref, 2, 2)
    f32_states = tuple(s.float() for s in flatten(hx))
    return {
        "int64-input": (x.long(), hx),
        "int32-input": (x.int(), hx),
        "bool-input": (x > 0, hx),
        "float32-input": (x.float(), hx),
        "float16-input": (x.half(), hx),
        "float32-hx": (x, f32_states if isinstance(hx, tuple) else f32_states[0]),
        "int-hx": (x, tuple(s.long() for s in flatten(hx)) if isinstance(hx, tuple)
                   else hx.long()),
    }


@pytest.mark.parametrize("case", ["int64-input", "int32-input", "bool-input", "float32-input",
                                  "float16-input", "float32-hx", "int-hx"])
@pytest.mark.parametrize("name", list(MODULES))
def test_integer_and_mismatched_dtypes_refused(name, case):
    """A float64 module refuses integer / bool inputs and inputs or states of another dtype,
    with torch.nn's exception type."""
    ref, ext = make_pair(name)
    x, hx = _bad_dtype_cases(name)[case]
    with pytest.raises(Exception) as want:
        ref(x, hx)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as got:
        ext(x, hx)
    assert type(got.value) is type(want.value), (got.value, want.value)


@pytest.mark.parametrize("name", list(MODULES))
def test_second_backward_raises_like_torch_nn(name):
    """A second backward through freed buffers raises torch.nn's error; with retain_graph the
    second backward accumulates the same gradients again."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True)
    ref, ext = make_pair(name, **kw)
    x, hx = make_input(ref, 3, 2)
    messages = []
    for module in (ref, ext):
        loss = sum(o.sum() for o in flatten(module(leaf(x), hx)))
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time") as e:
            loss.backward()
        messages.append(str(e.value))
    assert messages[0] == messages[1]

    grads = []
    for module in (ref, ext):
        module.zero_grad()
        xl = leaf(x)
        loss = sum(o.sum() for o in flatten(module(xl, hx)))
        loss.backward(retain_graph=True)
        once = [xl.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        loss.backward()
        twice = [xl.grad] + [p.grad for p in module.parameters()]
        for a, b in zip(twice, once):
            assert_close(a, 2 * b, 1e-12, "second backward with retain_graph")
        grads.append(twice)
    for a, b in zip(*grads):
        assert_close(a, b, 1e-10, "accumulated grads vs torch.nn")


@pytest.mark.parametrize("which", ["all_states", "first_state"])
@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_flow_when_only_hx_requires_grad(name, which):
    """Frozen parameters, an input without grad: the gradient of h0 (or of c0 alone) is
    torch.nn's."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True)
    ref, ext = make_pair(name, **kw)
    for module in (ref, ext):
        module.requires_grad_(False)
    x, hx = make_input(ref, 3, 2)
    results = []
    for module in (ref, ext):
        states = [leaf(s, which == "all_states" or i == 0) for i, s in enumerate(flatten(hx))]
        if which == "first_state" and len(states) == 2:  # an LSTM: c alone
            states = [leaf(states[0], False), leaf(states[1], True)]
        outs = flatten(module(x, tuple(states) if isinstance(hx, tuple) else states[0]))
        assert all(o.requires_grad for o in outs)
        wanted = [s for s in states if s.requires_grad]
        results.append(torch.autograd.grad(sum((o * o).sum() for o in outs), wanted))
    for a, b in zip(*results):
        assert b.abs().sum() > 0
        assert_close(a, b, 1e-10, "grad of hx")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("name", list(MODULES))
def test_no_saved_state_without_grad(name, context):
    """Without grad the modules run the *_inference ops, which save nothing and have no
    backward, and no output carries a graph; with grad the layers' *_recurrence ops save
    their workspace."""
    kw = {} if is_cell(name) else dict(num_layers=2, bidirectional=True)
    _, ext = make_pair(name, **kw)
    x, hx = make_input(ext, 3, 2)
    if context == "nothing_requires_grad":
        ext.requires_grad_(False)
        guard = torch.enable_grad()
    else:
        guard = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with guard, OpRecorder() as rec:
        outs = flatten(ext(x, hx))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)
    if context == "inference_mode":
        assert all(o.is_inference() for o in outs)
    ops_called = [f for f, _, _ in rec.calls]
    assert len(ops_called) == (1 if is_cell(name) else 4), ops_called
    if context == "inference_mode":
        # Inference mode skips the autograd keys, so the dispatch mode sees the composite op
        # before it decomposes (into the inference op: grad mode is off, as under no_grad).
        assert all(f.endswith(("_cell.default", "_layer.default")) for f in ops_called), ops_called
    else:
        assert all("_inference" in f for f in ops_called), ops_called

    ext.requires_grad_(True)
    with OpRecorder() as rec:
        outs = flatten(ext(x, hx))
    assert all(o.grad_fn is not None for o in outs)
    for func, args, result in rec.calls:
        if "recurrence" in func and ("lstm" in func or "gru" in func):
            assert args[-1] is True and result[-1].shape[0] == result[0].shape[0], func


# =============================================================================================
# 3. Double backward through every module
# =============================================================================================

@pytest.mark.parametrize("name", list(MODULES))
def test_gradgradcheck_modules(name):
    """gradgradcheck in float64 w.r.t. the input, hx and every parameter."""
    kw = {} if is_cell(name) else dict(bidirectional=True)
    _, ext = make_pair(name, input_size=2, hidden_size=3 if "PROJ" in name else 2, **kw)
    x, hx = make_input(ext, 2, 2)
    states = flatten(hx)
    names = [n for n, _ in ext.named_parameters()]
    params = [leaf(p) for p in ext.parameters()]
    inputs = [leaf(x)] + [leaf(s) for s in states] + params

    def fn(x, *rest):
        hs, ps = rest[:len(states)], rest[len(states):]
        h = tuple(hs) if isinstance(hx, tuple) else hs[0]
        result = torch.func.functional_call(ext, dict(zip(names, ps)), (x, h))
        return tuple(flatten(result))

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# =============================================================================================
# 4. Property tests: extension == reference backend == torch.nn
# =============================================================================================

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow])


@pytest.fixture
def backends():
    """Runs a callable under a backend and restores the previous one."""
    def under(name, fn):
        previous = rnn_ext.backend()
        rnn_ext.set_backend(name)
        try:
            return fn()
        finally:
            rnn_ext.set_backend(previous)
    yield under
    assert rnn_ext.backend() == "extension"


@st.composite
def layer_configs(draw):
    mode = draw(st.sampled_from(["RNN_TANH", "RNN_RELU", "LSTM", "GRU"]))
    hidden = draw(st.integers(1, 4))
    kwargs = dict(input_size=draw(st.integers(1, 3)), hidden_size=hidden,
                  num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                  batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if mode == "LSTM":
        kwargs["proj_size"] = draw(st.integers(0, hidden - 1))
    form = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    T = draw(st.integers(1, 4))
    B = draw(st.integers(1 if form == "packed" else 0, 3))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B)) if form == "packed" \
        else None
    return dict(mode=mode, kwargs=kwargs, form=form, T=T, B=B, lengths=lengths,
                with_hx=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _layer_case(cfg):
    """(torch.nn module, rnn_ext module, x, hx, wrap) for a layer_configs example."""
    nn_cls, ext_cls, extra = LAYERS[cfg["mode"]]
    torch.manual_seed(cfg["seed"])
    ref = nn_cls(**extra, **cfg["kwargs"]).double()
    ext = ext_cls(**extra, **cfg["kwargs"]).double()
    ext.load_state_dict(ref.state_dict(), strict=True)
    batch = 1 if cfg["form"] == "unbatched" else cfg["B"]
    x, hx = make_input(ref, cfg["T"], batch, gen=torch.Generator().manual_seed(cfg["seed"]))
    wrap = None
    if cfg["form"] == "unbatched":
        x = x[0] if ref.batch_first else x[:, 0]
        hx = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    elif cfg["form"] == "packed":
        def wrap(x):
            return pack_padded_sequence(x, cfg["lengths"], batch_first=ref.batch_first,
                                        enforce_sorted=False)
    return ref, ext, x, (hx if cfg["with_hx"] else None), wrap


def _assert_all_close(got, want, what):
    (go, gg), (wo, wg) = got, want
    assert len(go) == len(wo)
    for i, (a, b) in enumerate(zip(go, wo)):
        assert_close(a, b, 1e-10, f"{what}: output {i}")
    assert len(gg) == len(wg)
    for i, (a, b) in enumerate(zip(gg, wg)):
        assert (a is None) == (b is None), f"{what}: grad {i}"
        if a is not None:
            assert_close(a, b, 1e-10, f"{what}: grad {i}")


@PROPERTY_SETTINGS
@given(cfg=layer_configs())
def test_property_layers_match_reference_and_torch_nn(cfg, backends):
    ref, ext, x, hx, wrap = _layer_case(cfg)
    want = run(ref, x, hx, wrap=wrap)
    with OpRecorder() as rec:
        got = run(ext, x, hx, wrap=wrap)
    if cfg["B"] > 0 or cfg["form"] == "unbatched":
        assert any("recurrence" in f for f, _, _ in rec.calls)  # the fused ops ran
    _assert_all_close(got, want, "extension vs torch.nn")
    with OpRecorder() as rec:
        got_ref = backends("reference", lambda: run(ext, x, hx, wrap=wrap))
    assert not rec.calls, "the reference backend ran rnn_ext ops"
    _assert_all_close(got_ref, want, "reference backend vs torch.nn")


@st.composite
def cell_configs(draw):
    return dict(name=draw(st.sampled_from(list(CELLS))), input_size=draw(st.integers(1, 4)),
                hidden_size=draw(st.integers(1, 4)), bias=draw(st.booleans()),
                B=draw(st.one_of(st.none(), st.integers(0, 3))), with_hx=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(cfg=cell_configs())
def test_property_cells_match_reference_and_torch_nn(cfg, backends):
    ref, ext = make_pair(cfg["name"], seed=cfg["seed"], input_size=cfg["input_size"],
                         hidden_size=cfg["hidden_size"], bias=cfg["bias"])
    x, hx = make_input(ref, 1, cfg["B"] or 1, gen=torch.Generator().manual_seed(cfg["seed"]))
    if cfg["B"] is None:  # unbatched
        x, hx = x[0], (tuple(h[0] for h in hx) if isinstance(hx, tuple) else hx[0])
    hx = hx if cfg["with_hx"] else None
    want = run(ref, x, hx)
    with OpRecorder() as rec:
        got = run(ext, x, hx)
    assert any("pointwise_forward" in f for f, _, _ in rec.calls)  # the fused op ran
    _assert_all_close(got, want, "extension vs torch.nn")
    with OpRecorder() as rec:
        got_ref = backends("reference", lambda: run(ext, x, hx))
    assert not rec.calls, "the reference backend ran rnn_ext ops"
    _assert_all_close(got_ref, want, "reference backend vs torch.nn")


# =============================================================================================
# 5. Leaks, threads, determinism
# =============================================================================================

def _heap_bytes() -> int | None:
    """Bytes the C heap has handed out (glibc mallinfo2), or None where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    info.restype = MallInfo2
    m = info()
    return int(m.uordblks + m.hblkhd)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_memory_stays_flat_over_training_steps():
    """1000 training steps of a small LSTM (and a few hundred of a GRU and an LSTMCell): after
    warm-up the C heap, the RSS and the number of live tensors stay flat. One leaked workspace
    per step would add megabytes; one leaked small allocation per op call a few hundred KB."""
    torch.manual_seed(0)
    lstm = rnn_ext.LSTM(4, 8, num_layers=2, proj_size=4)
    gru = rnn_ext.GRU(4, 8)
    cell = rnn_ext.LSTMCell(4, 8)
    params = [*lstm.parameters(), *gru.parameters(), *cell.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4)
    x = torch.randn(6, 4, 4)
    h0 = torch.zeros(2, 4, 4, requires_grad=True)
    c0 = torch.zeros(2, 4, 8)

    def step(i):
        out, (h, c) = lstm(x, (h0, c0))
        loss = out.square().mean() + h.sum() + c.sum()
        if i % 4 == 0:
            y, _ = gru(x)
            hc = cell(x[0])
            loss = loss + y.mean() + hc[0].mean() + hc[1].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        h0.grad = None

    for i in range(100):
        step(i)
    gc.collect()
    heap0, rss0, tensors0 = _heap_bytes(), _rss_bytes(), _live_tensors()
    for i in range(1000):
        step(i)
    gc.collect()
    heap1, rss1, tensors1 = _heap_bytes(), _rss_bytes(), _live_tensors()
    assert tensors1 <= tensors0, f"live tensors grew from {tensors0} to {tensors1}"
    assert rss1 - rss0 < 16 << 20, f"RSS grew by {(rss1 - rss0) >> 10} KiB over 1000 steps"
    if heap0 is not None:
        assert heap1 - heap0 < 64 << 10, f"C heap grew by {(heap1 - heap0) >> 10} KiB"


def _thread_workload(device):
    """Modules and a function computing every output and gradient of one input seed."""
    torch.manual_seed(0)
    modules = {
        "LSTM": rnn_ext.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=6),
        "GRU": rnn_ext.GRU(5, 12, batch_first=True),
        "RNN": rnn_ext.RNN(5, 12, nonlinearity="relu"),
        "LSTMCell": rnn_ext.LSTMCell(5, 12),
        "GRUCell": rnn_ext.GRUCell(5, 12),
    }
    for m in modules.values():
        m.double().to(device)

    def compute(seed):
        results = []
        for name, module in modules.items():
            gen = torch.Generator().manual_seed(seed)
            x, hx = make_input(module, 7, 6, device=device, gen=gen)
            packed = name == "LSTM" and seed % 2 == 0
            wrap = (lambda t: pack_padded_sequence(t, [7, 6, 6, 3, 2, 1])) if packed else None
            outs, grads = run(module, x, hx, seed=seed, wrap=wrap)
            results += outs + grads
        return results

    return compute


@pytest.mark.parametrize("device", DEVICES)
def test_threads_give_single_threaded_results(device):
    """Forward and backward from 4 Python threads at once, on shared modules: each thread's
    outputs and gradients equal the single-threaded ones bitwise."""
    compute = _thread_workload(device)
    seeds = list(range(8))
    expected = {seed: compute(seed) for seed in seeds}
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def worker(k):
        try:
            barrier.wait()
            for rep in range(6):
                seed = seeds[(k + rep) % len(seeds)]
                got = compute(seed)
                for i, (a, b) in enumerate(zip(got, expected[seed])):
                    if not torch.equal(a, b):
                        errors.append(f"thread {k} seed {seed} tensor {i}: max diff "
                                      f"{(a - b).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("name", ["RNN_TANH", "LSTM", "GRU"])
def test_threaded_float32_step_matches_torch_nn(name, form):
    """float32 steps of over 2^20 multiply-adds: the CPU splits each step (packed GEMM and
    pointwise kernel) over 2 intra-op threads by units; a packed sequence's shrinking (forward)
    and growing (reverse) steps take the unfused path. Outputs and gradients are torch.nn's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # RNN: 120 * 96 * 96 multiply-adds a step (GRU x3, LSTM x4): 2 blocks of 48 units
        ref, ext = make_pair(name, dtype=torch.float32, input_size=8, hidden_size=96,
                             bidirectional=True)
        x, hx = make_input(ref, 3, 120, dtype=torch.float32)
        wrap = None
        if form == "packed":
            def wrap(t):
                return pack_padded_sequence(t, [3] * 40 + [2] * 40 + [1] * 40)
        want_out, want_grads = run(ref, x, hx, wrap=wrap)
        got_out, got_grads = run(ext, x, hx, wrap=wrap)
    finally:
        torch.set_num_threads(threads)
    for what, got, want in (("output", got_out, want_out), ("grad", got_grads, want_grads)):
        for i, (a, b) in enumerate(zip(got, want)):
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=1e-4,
                                       msg=lambda m: f"{what} {i}: {m}")


def _run_modules(names, device, dtype, batch, hidden, steps, **layer_kwargs):
    """Outputs and gradients of fresh seeded modules `names` on seeded inputs, in one list."""
    results = []
    for name in names:
        kw = {} if is_cell(name) else layer_kwargs
        _, ext = make_pair(name, dtype=dtype, device=device, seed=7, input_size=8,
                           hidden_size=hidden, **kw)
        x, hx = make_input(ext, steps, batch, dtype=dtype, device=device,
                           gen=torch.Generator().manual_seed(3))
        outs, grads = run(ext, x, hx)
        results += outs + grads
    return results


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic_run_to_run(device):
    """Two runs with the same seed give identical outputs and gradients (torch.equal): every
    module, packed into 2 bidirectional layers, in float32 and float64; then with 2 intra-op
    threads and a batch large enough that the CPU kernels split their rows over them."""
    def once():
        torch.manual_seed(123)
        results = []
        for dtype in (torch.float32, torch.float64):
            results += _run_modules(list(MODULES), device, dtype, 5, 6, 4, num_layers=2,
                                    bidirectional=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:  # hidden 64: 128 (LSTM) to 512 (RNN) rows per task, in both directions
            results += _run_modules(["LSTM_PROJ", "GRU", "RNN_TANH", "LSTMCell", "GRUCell"],
                                    device, torch.float32, 520, 64, 1, bidirectional=True)
        finally:
            torch.set_num_threads(threads)
        return results

    first, second = once(), once()
    assert len(first) == len(second) > 50
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between runs"


if __name__ == "__main__" and sys.argv[1:2] == ["fuzz"]:
    sys.exit(fuzz_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                       sys.argv[5] if len(sys.argv) > 5 else "cpu"))
