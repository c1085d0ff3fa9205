"""A fuzzer of rnn_ext's raw ops: every op of torch.ops.rnn_ext (listed from the dispatcher, its
argument generators checked against each schema) called with thousands of seeded, malformed
argument sets. Every call must return or raise the op's own argument error (RuntimeError,
ValueError or TypeError; an internal assert, an IndexError or an AttributeError is a failure);
calls that break a documented contract must raise; valid calls mixed in must succeed and agree
with rnn_ext.reference: the forward ops' outputs and gradients, the cell backward ops' results
on the saved tensor of a real forward call (and with themselves when their arguments are
non-contiguous).

A crash kills the process, so tests/test_fuzz.py runs this program in a child process:

    python tests/fuzz.py SEED CALLS SECONDS [cpu|cuda]

(the repository root on PYTHONPATH). It prints a CALL line before each call, FAILURE lines for
broken expectations and a SUMMARY line of JSON; it exits 0 when every expectation held, 3 when
some did not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

import rnn_ext  # noqa: F401 - registers the ops
from rnn_ext import reference
from rnn_ext._kinds import rnn_mode

ops = torch.ops.rnn_ext

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
    mode = rnn_mode(nonlinearity) if nonlinearity else family.upper()
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


# each cell backward op: its forward op, and the forward inputs its gradients are for
CELL_BACKWARD = {
    "rnn_pointwise_backward": ("rnn_pointwise_forward", ("xg",)),
    "lstm_pointwise_backward": ("lstm_pointwise_forward", ("xg", "cx")),
    "gru_pointwise_backward": ("gru_pointwise_forward", ("xg", "hg", "hx")),
}


def cell_backward_case(name: str, rng: random.Random, dtype: torch.dtype, device: str
                       ) -> tuple[dict, dict]:
    """(arguments of cell backward op `name`, arguments of the forward call that made its saved
    tensor): the backward's gradients of the outputs are random, its hy or workspace real."""
    forward_name, _ = CELL_BACKWARD[name]
    forward = valid_args(forward_name, rng, dtype, device)
    result = getattr(ops, forward_name)(*forward.values())
    hy = result if isinstance(result, torch.Tensor) else result[0]
    grad = torch.randn(hy.shape, dtype=torch.float64).to(device, dtype)
    if name == "rnn_pointwise_backward":
        return dict(grad_hy=grad, hy=result, nonlinearity=forward["nonlinearity"]), forward
    if name == "lstm_pointwise_backward":
        grad_cy = torch.randn(hy.shape, dtype=torch.float64).to(device, dtype)
        return dict(grad_hy=grad, grad_cy=grad_cy, workspace=result[2]), forward
    return dict(grad_hy=grad, workspace=result[1]), forward


def reference_cell_backward(name: str, forward: dict, a: dict) -> tuple:
    """The gradients that cell backward op `name` returns, by autograd through the reference
    on the forward call's arguments."""
    forward_name, wrt = CELL_BACKWARD[name]
    leaves = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v
              for k, v in forward.items()}
    outs = reference_outputs(forward_name, leaves)
    grads = [a["grad_hy"], a["grad_cy"]] if "grad_cy" in a else [a["grad_hy"]]
    return torch.autograd.grad(outs[:len(grads)], [leaves[k] for k in wrt], grads)


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


# Errors that are not the ops' own argument checks, raised by inputs the ops do not check yet;
# each is counted in the summary, by its key, and goes when the op checks the argument.
KNOWN_DEFECTS = {
    # CPU float16 reaches the kernels' dtype switch instead of a dtype check
    "cpu-float16": (NotImplementedError, "not implemented for 'Half'"),
    # a 0-D input of a cell inference op is indexed before its shape is checked
    "0-d-input": (IndexError, "Dimension specified as 0 but tensor has no dimensions"),
}


def _known_defect(error: Exception) -> str | None:
    for key, (kind, words) in KNOWN_DEFECTS.items():
        if type(error) is kind and words in str(error):
            return key
    return None


def _on_meta(call: Call) -> bool:
    """Whether a tensor argument of the call is on the meta device."""
    return any(isinstance(v, torch.Tensor) and v.device.type == "meta"
               for v in [*call.args.values(), *call.extra])


def _argument_error(error: Exception, call: Call) -> bool:
    """Whether `error` is how an op refuses its arguments: the op's own checks (RuntimeError),
    the dispatcher's schema parsing (TypeError, ValueError), or, for a call without a tensor
    argument, the dispatcher finding no kernel (NotImplementedError). Not an IndexError or an
    AttributeError, which are bugs in a check."""
    if type(error) is NotImplementedError:
        return not any(isinstance(v, torch.Tensor) for v in [*call.args.values(), *call.extra])
    return isinstance(error, (RuntimeError, ValueError, TypeError))


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
             "raised": {}, "raised_on_meta": 0, "known_defects": dict.fromkeys(KNOWN_DEFECTS, 0),
             "returned_may": 0, "raised_may": 0, "seconds": 0.0, "examples": {}}
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
            forward_args = None
            if name in CELL_BACKWARD:  # the saved tensor of a real forward call
                call.args, forward_args = cell_backward_case(name, rng, dtype, device)
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
                if forward_args is not None and form != 1:  # (form 1 may change values)
                    want = reference_cell_backward(name, forward_args, call.args)
                    assert len(outs) == len(want)
                    for i, (a, b) in enumerate(zip(outs, want)):
                        if not _close(a, b):
                            fail("reference", index, call,
                                 f"gradient {i} differs from the reference's")
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
            elif _on_meta(call):
                # the fake implementation checks nothing: whatever it raises is tolerated
                stats["raised_on_meta"] += 1
            elif _known_defect(e):
                stats["known_defects"][_known_defect(e)] += 1
            elif not _argument_error(e, call):
                fail("wrong-error", index, call, f"{type(e).__name__}: {e}"[:400])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("calls", type=int, help="at most this many calls")
    parser.add_argument("seconds", type=float, help="stop starting calls after this long")
    parser.add_argument("device", nargs="?", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    return fuzz_main(args.seed, args.calls, args.seconds, args.device)


if __name__ == "__main__":
    sys.exit(main())
