"""Benchmarks of rnn_ext against torch.nn and against rnn_ext's pure-PyTorch reference.

Run from the repository root:

    python -m benchmarks.run                 # every case on the default device (CUDA if present)
    python -m benchmarks.run --quick         # a short subset: small+medium, float32, few repeats
    python -m benchmarks.run --device cpu --shapes small,medium --dtypes float32

Methodology
-----------
Contenders
    ``rnn_ext``    rnn_ext.RNN/LSTM/GRU and the cells, backend "extension" (the compiled ops);
    ``torch.nn``   torch's own modules: cuDNN on CUDA, oneDNN or ATen's native kernels on CPU;
    ``reference``  the same rnn_ext modules under rnn_ext.set_backend("reference") (restored to
                   "extension" right after each of its calls): plain PyTorch ops, a Python loop
                   over time steps.
Cases (see cases.py)
    kind (layer: one layer, one direction, over T steps; cell: one step), mode (RNN with tanh,
    LSTM, GRU), shape (small T=50 B=8 I=H=64, medium T=100 B=32 I=H=256, fastrnns T=100 B=64
    I=H=512; a cell uses the same B, I, H), dtype (float32 and bfloat16, plus float16 on CUDA)
    and pass (inference: forward under torch.no_grad in eval mode; training: forward, then the
    backward of the sum of the outputs, gradients zeroed with set_to_none before each step).
Same work for everyone
    The rnn_ext module loads the torch.nn module's state_dict; all contenders take the same
    input tensors. Once per case each contender's forward output is compared with torch.nn's;
    the largest difference is kept in the JSON and a stderr warning flags a large one.
Interleaved timing in one process
    After warm-up (2 untimed calls per contender; 1 with --quick), each of the repeats (15; 3
    with --quick) times every contender once, in an order that rotates from one repeat to the
    next, so that drifts of the machine's speed (other jobs on a shared host, clocks) hit all
    contenders alike; a contender's figure is its median over the repeats (the JSON keeps every
    sample and the minimum too). On a CPU that other jobs share, multi-threaded timings suffer
    most (a thread that loses its core stalls the others at the next barrier): the load average
    at start and end goes into the JSON, and a warning says when the cores were busy.
    One sample is `number` back-to-back calls, with `number` chosen at warm-up (the same for
    every contender of a case) so that a sample of the fastest lasts at least MIN_SAMPLE_S:
    single cell steps are too short to time one at a time. CPU samples use
    time.perf_counter(); CUDA samples use a pair of torch.cuda.Event around the calls, after a
    synchronisation, so launch overheads count when the GPU waits for the host.
Derived figures
    speedup vs X = the median over repeats of X's sample / rnn_ext's sample in that repeat (above
    1: rnn_ext is faster): each repeat times the two back to back, so the ratio of a pair holds
    while the machine's speed drifts between repeats. FLOPs of one call:
    forward 2*T*B*G*H*(I+H) with G = 1, 4, 3 gates (RNN, LSTM, GRU), training 3x forward, a cell
    T = 1; rnn_ext GFLOP/s is that over its median. "% of GEMM" sets it against the peak rate
    measured at start (fastest of 10 samples) of one torch.mm on the same device and dtype, of
    the medium LSTM input projection's shape ([T*B, I] x [I, 4H] = [3200, 256] x [256, 1024]):
    an achievable ceiling, far above what the small recurrent GEMMs ([B, H] x [H, G*H] per step)
    can reach.
Failures and skips
    A contender that raises (e.g. a dtype a torch.nn backend lacks) shows as "fails (reason)" and
    the run goes on. On CPU the reference is skipped in training at the fastrnns shape (its
    Python loop takes minutes per case there); --slow-reference times it anyway. Where rnn_ext
    has no kernels for the device and dtype (e.g. float16 on CPU) it runs its reference path:
    the table notes it.

Output: progress lines on stderr, the markdown table on stdout, and under --out (default
benchmarks/results) a JSON file with every sample, median and the machine, a copy of the table
(.md), and a bar chart of the speedups vs torch.nn (.png) when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import rnn_ext
from rnn_ext._backend import uses_kernels

from .cases import DTYPES, KINDS, MODES, PASSES, SHAPES, Case, build_case, first_output, flops, step

CONTENDERS = ("rnn_ext", "torch.nn", "reference")
MIN_SAMPLE_S = 2e-3  # shortest sample (back-to-back calls) worth timing
MAX_NUMBER = 1000    # cap on calls per sample
GEMM_SHAPE = (100 * 32, 256, 4 * 256)  # M, K, N: the medium LSTM input projection
DEFAULTS = {"repeats": 15, "warmup": 2}  # timed samples, untimed calls per contender and case
QUICK = {"shapes": "small,medium", "dtypes": "float32", "repeats": 3, "warmup": 1}
MODE_NAMES = {"rnn": "RNN(tanh)", "lstm": "LSTM", "gru": "GRU"}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _short(error: BaseException) -> str:
    """A one-line reason that fits in a table cell."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}".replace("|", "/")
    return text if len(text) <= 70 else text[:67] + "..."


@contextlib.contextmanager
def _backend(name: str):
    rnn_ext.set_backend(name)
    try:
        yield
    finally:
        rnn_ext.set_backend("extension")


class Timer:
    """Seconds per call of `number` back-to-back calls, on the host clock or on CUDA events."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, number: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        begin = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - begin) / number


def _calls_per_sample(seconds: float) -> int:
    return max(1, min(MAX_NUMBER, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9))))


def interleaved(fns: dict, timer: Timer, repeats: int, warmup: int
                ) -> tuple[dict, dict, int]:
    """Times every callable of `fns` (name -> fn) interleaved, after `warmup` (at least one)
    untimed calls each. Returns (name -> samples in seconds per call, name -> failure reason,
    calls per sample). A callable that raises in warm-up or timing is dropped with its reason."""
    failed, warm = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(max(1, warmup)):
                warm[name] = timer(fn, 1)
        except Exception as error:  # noqa: BLE001 - any failure is a result to report
            failed[name] = _short(error)
    live = [name for name in fns if name not in failed]
    number = _calls_per_sample(min(warm[name] for name in live)) if live else 1
    samples = {name: [] for name in live}
    for repeat in range(repeats):
        shift = repeat % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            if name in failed:
                continue
            try:
                samples[name].append(timer(fns[name], number))
            except Exception as error:  # noqa: BLE001
                failed[name] = _short(error)
                del samples[name]
    return samples, failed, number


def measure_gemm(device: torch.device, dtype: torch.dtype, timer: Timer
                 ) -> float | None:
    """Peak GFLOP/s of torch.mm at GEMM_SHAPE on this device and dtype: the fastest of 10
    samples (a ceiling, so the best the machine gave, not its median); None if torch.mm fails
    there."""
    m, k, n = GEMM_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    samples, failed, _ = interleaved({"mm": lambda: torch.mm(a, b)}, timer, 10, 2)
    if failed:
        return None
    return 2.0 * m * k * n / min(samples["mm"]) / 1e9


def _agreement(case: Case, modules: dict, inputs: tuple) -> dict:
    """Largest |output - torch.nn's output| of each contender's forward (no grad)."""
    outputs = {}
    for name, (module, backend) in modules.items():
        try:
            with _backend(backend), torch.no_grad():
                outputs[name] = first_output(case, module(*inputs)).float()
        except Exception:  # noqa: BLE001 - the timing reports the failure
            continue
    if "torch.nn" not in outputs:
        return {}
    return {name: (out - outputs["torch.nn"]).abs().max().item()
            for name, out in outputs.items() if name != "torch.nn"}


def run_case(case: Case, device: torch.device, timer: Timer, repeats: int, warmup: int,
             contenders: list[str]) -> dict:
    """Times one case; returns its JSON record."""
    theirs, ours, inputs = build_case(case, device)
    modules = {"rnn_ext": (ours, "extension"), "torch.nn": (theirs, "extension"),
               "reference": (ours, "reference")}
    modules = {name: modules[name] for name in contenders}

    def call(module, backend):
        def fn():
            with _backend(backend):
                step(case, module, inputs)
        return fn

    samples, failed, number = interleaved(
        {name: call(*modules[name]) for name in contenders}, timer, repeats, warmup)
    diffs = _agreement(case, modules, inputs)
    record = {
        "kind": case.kind, "mode": case.mode, "shape": case.shape, "dtype": case.dtype,
        "pass": case.pass_, "T_B_I_H": SHAPES[case.shape], "flops": flops(case),
        "calls_per_sample": number,
        "rnn_ext_runs_kernels": uses_kernels(inputs[0]),
        "max_abs_diff_vs_torch_nn": diffs,
        "contenders": {},
    }
    for name in CONTENDERS:
        if name in samples and samples[name]:
            record["contenders"][name] = {
                "status": "ok", "median_ms": statistics.median(samples[name]) * 1e3,
                "min_ms": min(samples[name]) * 1e3,
                "samples_ms": [s * 1e3 for s in samples[name]]}
        elif name in failed:
            record["contenders"][name] = {"status": "fails", "reason": failed[name]}
        else:
            record["contenders"][name] = {"status": "skipped"}
    return record


def _median(record: dict, name: str) -> float | None:
    entry = record["contenders"][name]
    return entry["median_ms"] if entry["status"] == "ok" else None


def _speedup(record: dict, name: str) -> float | None:
    """Median of the per-repeat ratios name / rnn_ext (see the module docstring)."""
    ours, theirs = record["contenders"]["rnn_ext"], record["contenders"][name]
    if ours["status"] != "ok" or theirs["status"] != "ok":
        return None
    return statistics.median(
        t / o for t, o in zip(theirs["samples_ms"], ours["samples_ms"], strict=True))


def _ms(value: float) -> str:
    for bound, digits in ((100, 0), (10, 1), (1, 2)):
        if value >= bound:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def _rate(gflops: float | None) -> str:
    return "fails" if gflops is None else f"{gflops:.1f}"


def _cell(record: dict, name: str) -> str:
    entry = record["contenders"][name]
    if entry["status"] == "ok":
        return _ms(entry["median_ms"])
    if entry["status"] == "fails":
        return f"fails ({entry['reason']})"
    return "skipped"


def markdown_table(records: list[dict], gemm: dict, info: dict) -> str:
    header = ("kind", "mode", "shape", "dtype", "pass", "rnn_ext ms", "torch.nn ms",
              "reference ms", "speedup vs torch.nn", "speedup vs reference", "rnn_ext GFLOP/s",
              "% of GEMM")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for record in records:
        ours = _median(record, "rnn_ext")
        rate = record["flops"] / (ours / 1e3) / 1e9 if ours else None
        peak = gemm.get(record["dtype"])
        speedups = [_speedup(record, name) for name in ("torch.nn", "reference")]
        row = [record["kind"], MODE_NAMES[record["mode"]], record["shape"], record["dtype"],
               record["pass"], _cell(record, "rnn_ext"), _cell(record, "torch.nn"),
               _cell(record, "reference"),
               *(f"{s:.2f}x" if s else "-" for s in speedups),
               f"{rate:.1f}" if rate else "-",
               f"{100 * rate / peak:.1f}%" if rate and peak else "-"]
        if not record["rnn_ext_runs_kernels"]:
            row[0] += "*"
            notes.append("* rnn_ext has no kernels for this device and dtype: it ran its "
                         "reference path.")
        lines.append("| " + " | ".join(row) + " |")
    rates = ", ".join(f"{dtype} {_rate(value)}" for dtype, value in gemm.items())
    lines.append("")
    lines.append(f"{info['device_name']}, {info['threads']} threads, torch {info['torch']}, "
                 f"{info['date']}; load average {info['load_average_at_start'][0]:.1f} at "
                 f"start, {info['load_average_at_end'][0]:.1f} at end ({info['cpu_count']} CPUs). "
                 f"Peak GEMM rate (torch.mm {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]} @ "
                 f"{GEMM_SHAPE[1]}x{GEMM_SHAPE[2]}), GFLOP/s: {rates}. "
                 "Speedup = median over repeats of other's time / rnn_ext's time in that repeat.")
    lines.extend(sorted(set(notes)))
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "rnn_ext_backend": rnn_ext.backend(),
        "rnn_ext_built_with_cuda": rnn_ext.extension_built_with_cuda(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def bar_chart(records: list[dict], path: Path, title: str) -> bool:
    """Horizontal bars of the speedup vs torch.nn per case (log scale); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    rows = [(f"{r['kind']} {MODE_NAMES[r['mode']]} {r['shape']} {r['dtype']} {r['pass']}",
             _speedup(r, "torch.nn")) for r in records]
    rows = [(label, value) for label, value in rows if value]
    if not rows:
        return False
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows)))
    labels, values = zip(*rows)
    positions = range(len(rows))
    axes.barh(positions, [value - 1.0 for value in values], left=1.0,  # bars grow from 1x
              color=["tab:green" if value >= 1 else "tab:red" for value in values])
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    low, high = min(min(values), 1.0) / 1.3, max(max(values), 1.0) * 1.3
    axes.set_xlim(low, high)
    ticks = [tick for tick in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
             if low <= tick <= high]
    axes.set_xticks(ticks, [f"{tick:g}x" for tick in ticks])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.axvline(1.0, color="black", linewidth=0.8)
    for position, value in zip(positions, values):
        axes.text(value, position, f" {value:.2f}x", va="center", fontsize=7)
    axes.set_xlabel("speedup of rnn_ext vs torch.nn (torch.nn time / rnn_ext time; log scale)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _choices(text: str, allowed, option: str) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise SystemExit(f"{option}: unknown {unknown or values}; choose from {', '.join(allowed)}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default 2 on CPU, torch's default on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help=f"short subset: {QUICK['shapes']}, {QUICK['dtypes']}, "
                             f"{QUICK['repeats']} repeats, {QUICK['warmup']} warm-up call "
                             "(explicit options still win)")
    parser.add_argument("--modes", help=f"comma list of {','.join(MODES)} (default all)")
    parser.add_argument("--shapes", help=f"comma list of {','.join(SHAPES)} (default all)")
    parser.add_argument("--dtypes", help="comma list of float32,bfloat16,float16 (default "
                                         "float32,bfloat16; float16 too on CUDA)")
    parser.add_argument("--kinds", help="comma list of layer,cell (default both)")
    parser.add_argument("--passes", help="comma list of inference,training (default both)")
    parser.add_argument("--repeats", type=int, help="timed samples per contender (default "
                                                     f"{DEFAULTS['repeats']})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="directory for the JSON, markdown and PNG results")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference contender")
    parser.add_argument("--slow-reference", action="store_true",
                        help="time the reference in training at the fastrnns shape on CPU too")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if not rnn_ext.extension_available():
        raise SystemExit("rnn_ext's compiled extension did not load; build it first "
                         "(python setup.py build_ext --inplace)")
    device = torch.device(args.device)
    if args.device == "cuda" and not rnn_ext.extension_built_with_cuda():
        _progress("WARNING: rnn_ext was built without CUDA: on this device it runs its reference")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 2)
    quick = QUICK if args.quick else {}
    default_dtypes = "float32,bfloat16" + (",float16" if args.device == "cuda" else "")
    modes = _choices(args.modes or ",".join(MODES), MODES, "--modes")
    shapes = _choices(args.shapes or quick.get("shapes", ",".join(SHAPES)), SHAPES, "--shapes")
    dtypes = _choices(args.dtypes or quick.get("dtypes", default_dtypes), DTYPES, "--dtypes")
    kinds = _choices(args.kinds or ",".join(KINDS), KINDS, "--kinds")
    passes = _choices(args.passes or ",".join(PASSES), PASSES, "--passes")
    repeats = args.repeats or quick.get("repeats", DEFAULTS["repeats"])
    warmup = quick.get("warmup", DEFAULTS["warmup"])

    timer = Timer(device)
    info = machine_info(device)
    _progress(f"rnn_ext benchmarks on {info['device_name']} ({args.device}, "
              f"{info['threads']} threads, torch {info['torch']}), {repeats} repeats")
    if args.device == "cpu" and info["load_average_at_start"][0] > 0.5:
        _progress(f"WARNING: load average {info['load_average_at_start'][0]:.1f} with "
                  f"{info['cpu_count']} CPUs: other jobs compete for the cores; CPU timings "
                  "(multi-threaded ones most) will be noisy")
    gemm = {}
    for dtype in dtypes:
        gemm[dtype] = measure_gemm(device, DTYPES[dtype], timer)
        _progress(f"GEMM rate {dtype}: {_rate(gemm[dtype])} GFLOP/s")

    cases = [Case(kind, mode, shape, dtype, pass_) for kind in kinds for mode in modes
             for shape in shapes for dtype in dtypes for pass_ in passes]
    records = []
    started = time.perf_counter()
    for index, case in enumerate(cases, 1):
        contenders = [name for name in CONTENDERS if not (name == "reference" and (
            args.no_reference or (args.device == "cpu" and case.shape == "fastrnns"
                                  and case.pass_ == "training" and not args.slow_reference)))]
        begin = time.perf_counter()
        record = run_case(case, device, timer, repeats, warmup, contenders)
        records.append(record)
        summary = ", ".join(f"{name} {_cell(record, name)}" for name in CONTENDERS)
        _progress(f"[{index}/{len(cases)}] {case.label()}: {summary} "
                  f"({time.perf_counter() - begin:.1f} s)")
        for name, diff in record["max_abs_diff_vs_torch_nn"].items():
            if diff > (1e-3 if case.dtype == "float32" else 0.1):
                _progress(f"WARNING: {case.label()}: {name} differs from torch.nn by {diff:.3g}")

    wall = time.perf_counter() - started
    info["load_average_at_end"] = os.getloadavg()
    table = markdown_table(records, gemm, info)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    settings = {"modes": modes, "shapes": shapes, "dtypes": dtypes, "kinds": kinds,
                "passes": passes, "repeats": repeats, "warmup_calls": warmup,
                "min_sample_s": MIN_SAMPLE_S, "quick": args.quick,
                "no_reference": args.no_reference, "slow_reference": args.slow_reference,
                "argv": sys.argv[1:] if argv is None else list(argv)}
    result = {"machine": info, "settings": settings,
              "gemm": {"shape_mkn": GEMM_SHAPE, "gflops": gemm},
              "wall_s": wall, "results": records}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    _progress(f"wrote {stem}.json and {stem}.md ({wall:.0f} s of cases)")
    title = (f"rnn_ext vs torch.nn on {info['device_name']}, {info['threads']} threads, "
             f"torch {info['torch']}, {info['date'][:10]}")
    if bar_chart(records, stem.with_suffix(".png"), title):
        _progress(f"wrote {stem}.png")
    else:
        _progress("no chart: matplotlib is not importable (or no speedup to plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
