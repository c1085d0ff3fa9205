"""Multi-step forecasting of a noisy multi-frequency signal with a GRU or LSTM.

The series is synthetic: a sum of three sines with incommensurate periods plus Gaussian noise,
so its future is predictable up to the noise. The last ``--test-fraction`` of it is held out.
The model reads a window of past values and predicts the next one: a sequence-to-one
forecaster, trained with MSE on random windows of the training part (every prefix of a window
longer than ``--warmup`` steps counts as one sequence-to-one example, so one pass of the
recurrence gives many of them). It forecasts ``--horizon`` steps autoregressively: the context
is read once, then each prediction is fed back as the next input while the recurrent state is
carried along.

Evaluation is on the held-out part only: one-step-ahead MSE, and the MSE of multi-step
forecasts started at several points of it (contexts taken from the held-out part too), next to
two baselines, repeating the last value and predicting the mean. A PNG plot of one forecast
against the truth is written with matplotlib when it is installed.

Usage (from the repository root)::

    python examples/forecast.py                 # GRU, rnn_ext; plot to examples/forecast.png
    python examples/forecast.py --cell lstm --backend torch --plot /tmp/lstm.png
    python examples/forecast.py --smoke         # tiny sizes, a few seconds; plot to a temp dir
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

try:  # imported from the repository root (the tests)
    from examples.common import (backend_description, example_parser, parse_with_smoke,
                                 recurrent_modules)
except ImportError:  # run as a script: examples/ is on sys.path
    from common import backend_description, example_parser, parse_with_smoke, recurrent_modules

# (amplitude, period in steps, phase) of the sines the signal is made of.
COMPONENTS = ((1.0, 50.0, 0.0), (0.6, 23.0, 1.0), (0.35, 7.3, 2.0))

# --smoke: tiny sizes that still run every code path (training, evaluation, forecast, plot).
SMOKE_DEFAULTS = dict(length=1500, window=48, warmup=8, horizon=24, hidden_size=16, epochs=2,
                      batches_per_epoch=5, batch_size=16)


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    data = parser.add_argument_group("data")
    data.add_argument("--length", type=int, default=8000, help="length of the series")
    data.add_argument("--noise", type=float, default=0.1, help="standard deviation of the noise")
    data.add_argument("--test-fraction", type=float, default=0.15)
    data.add_argument("--window", type=int, default=160, help="context length")
    data.add_argument("--warmup", type=int, default=16,
                      help="context steps read before the first prediction that counts")
    data.add_argument("--horizon", type=int, default=150, help="steps forecast autoregressively")
    model = parser.add_argument_group("model and training")
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--epochs", type=int, default=20)
    model.add_argument("--batches-per-epoch", type=int, default=50)
    model.add_argument("--batch-size", type=int, default=32)
    model.add_argument("--lr", type=float, default=3e-3,
                       help="peak learning rate (cosine decay to a tenth of it)")
    model.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--plot", type=Path,
                        help="PNG to write (default examples/forecast.png; --smoke: a temp file)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_smoke(parser, argv, SMOKE_DEFAULTS)
    test_length = int(args.length * args.test_fraction)
    if args.window + args.horizon > test_length:
        parser.error(f"--window + --horizon ({args.window + args.horizon}) must fit in the "
                     f"held-out part ({test_length} steps)")
    if not 0 <= args.warmup < args.window:
        parser.error("--warmup must be in [0, --window)")
    return args


# -------------------------------------------------------------------------------------- data

def make_series(length: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Sum of the COMPONENTS sines plus Gaussian noise: [length]."""
    t = torch.arange(length, dtype=torch.float32)
    clean = sum(a * torch.sin(2 * math.pi * t / period + phase) for a, period, phase in COMPONENTS)
    return clean + noise * torch.randn(length, generator=generator)


def random_windows(series: torch.Tensor, size: int, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """`count` windows of `size` consecutive values at random offsets: [count, size]."""
    starts = torch.randint(0, series.numel() - size + 1, (count,), generator=generator)
    return torch.stack([series[s:s + size] for s in starts.tolist()])


# ------------------------------------------------------------------------------------- model

class Forecaster(nn.Module):
    """GRU/LSTM over the values, and a linear read-out of the next value at every step."""

    def __init__(self, nn_module, cell: str, hidden_size: int, num_layers: int):
        super().__init__()
        recurrent = nn_module.GRU if cell == "gru" else nn_module.LSTM
        self.rnn = recurrent(1, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, values: torch.Tensor, state=None):
        """values [B, T] -> predictions of the next value after each step [B, T], and the
        recurrent state after the last step."""
        output, state = self.rnn(values.unsqueeze(2), state)
        return self.head(output).squeeze(2), state


@torch.no_grad()
def forecast(model: Forecaster, context: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive forecast: context [B, T] -> the next `horizon` values [B, horizon]."""
    predictions, state = model(context)
    steps = [predictions[:, -1:]]
    for _ in range(horizon - 1):
        predictions, state = model(steps[-1], state)  # feed the last prediction back
        steps.append(predictions)
    return torch.cat(steps, dim=1)


def learning_rate(args: argparse.Namespace, step: int, total: int) -> float:
    """Cosine decay from args.lr at step 1 to args.lr / 10 at step `total`."""
    progress = (step - 1) / max(total - 1, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -------------------------------------------------------------------------------------- plot

def save_plot(path: Path, context: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor,
              title: str) -> None:
    """Context, true continuation and forecast of one series, as a PNG at path."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    past = torch.arange(-context.numel(), 0)
    future = torch.arange(truth.numel())
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(past, context, color="0.5", lw=1, label="context")
    ax.plot(future, truth, color="black", lw=1, label="truth")
    ax.plot(future, prediction, color="tab:red", lw=1.5, label="forecast")
    ax.axvline(0, color="0.7", ls="--", lw=1)
    ax.set_xlabel("step (0 = first forecast step)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# -------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace, plot_path: Path) -> None:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    series = make_series(args.length, args.noise, generator)
    split = args.length - int(args.length * args.test_fraction)
    mean, std = series[:split].mean(), series[:split].std()
    normed = (series - mean) / std  # the model works on standardised values
    train_part, test_part = normed[:split], normed[split:].to(device)
    print(f"series: {args.length} steps ({split} train, {args.length - split} held out), "
          f"periods {', '.join(str(p) for _, p, _ in COMPONENTS)}, noise std {args.noise}")

    model = Forecaster(recurrent_modules(args.backend), args.cell, args.hidden_size,
                       args.num_layers).to(device)
    print(f"model: {args.cell.upper()} {args.num_layers}x{args.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{backend_description(args.backend)} on {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    total_steps = args.epochs * args.batches_per_epoch

    def to_original_mse(mse: float) -> float:
        return mse * std.item() ** 2

    for epoch in range(1, args.epochs + 1):
        began, total = time.perf_counter(), 0.0
        for batch in range(args.batches_per_epoch):
            step = (epoch - 1) * args.batches_per_epoch + batch + 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step, total_steps)
            windows = random_windows(train_part, args.window + 1, args.batch_size,
                                     generator).to(device)
            predictions, _ = model(windows[:, :-1])
            loss = nn.functional.mse_loss(predictions[:, args.warmup:],
                                          windows[:, args.warmup + 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            total += loss.item()
        seconds = time.perf_counter() - began
        with torch.no_grad():
            predictions, _ = model(test_part[:-1].unsqueeze(0))
            one_step = nn.functional.mse_loss(predictions[0, args.warmup:],
                                              test_part[args.warmup + 1:]).item()
        train_mse = to_original_mse(total / args.batches_per_epoch)
        print(f"epoch {epoch:3d}/{args.epochs} | train MSE {train_mse:.4f} | "
              f"held-out one-step MSE {to_original_mse(one_step):.4f} | {seconds:.1f} s | "
              f"{1000 * seconds / args.batches_per_epoch:.0f} ms/batch", flush=True)

    # Multi-step forecasts from several origins inside the held-out part.
    origins = range(args.window, test_part.numel() - args.horizon + 1,
                    max(args.horizon // 2, 1))
    contexts = torch.stack([test_part[o - args.window:o] for o in origins])
    truths = torch.stack([test_part[o:o + args.horizon] for o in origins])
    began = time.perf_counter()
    predictions = forecast(model, contexts, args.horizon)
    seconds = time.perf_counter() - began
    errors = ((predictions - truths) ** 2).mean(0)  # per horizon step
    last_value = ((contexts[:, -1:] - truths) ** 2).mean().item()
    mean_value = (truths ** 2).mean().item()  # the training mean is 0 after standardising
    print(f"\n{args.horizon}-step forecasts from {len(origins)} held-out origins "
          f"({seconds:.2f} s):")
    print(f"  {'model':<18} MSE {to_original_mse(errors.mean().item()):.4f}   (noise floor "
          f"{args.noise ** 2:.4f})")
    print(f"  {'repeat last value':<18} MSE {to_original_mse(last_value):.4f}")
    print(f"  {'predict the mean':<18} MSE {to_original_mse(mean_value):.4f}")
    marks = sorted({1, 10, args.horizon // 2, args.horizon} - {0})
    print("  model MSE at step " + ", ".join(
        f"{h}: {to_original_mse(errors[h - 1].item()):.4f}" for h in marks if h <= args.horizon))

    def original(values: torch.Tensor) -> torch.Tensor:
        return values.cpu() * std + mean

    save_plot(plot_path, original(contexts[0]), original(truths[0]), original(predictions[0]),
              f"{args.cell.upper()} ({args.backend}): {args.horizon}-step forecast, MSE "
              f"{to_original_mse(((predictions[0] - truths[0]) ** 2).mean().item()):.4f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot is not None:
        run(args, args.plot)
    elif args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, Path(tmp) / "forecast.png")
    else:
        run(args, Path(__file__).resolve().parent / "forecast.png")


if __name__ == "__main__":
    main()
