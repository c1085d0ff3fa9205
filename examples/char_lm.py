"""Character-level language model on Python's own standard-library source code.

An LSTM or GRU reads the source text of a few standard-library modules (obtained with
``inspect.getsource``, so nothing is downloaded) one character at a time and learns to predict
the next one. Training uses truncated back-propagation through time: the corpus is cut into
``--batch-size`` parallel streams, each stream is read in chunks of ``--bptt`` characters, and
the hidden state is carried from one chunk to the next but detached, so gradients flow only
within a chunk. Gradients are clipped by norm, the learning rate follows a cosine schedule, and
a checkpoint (model, optimizer, step) can be saved and resumed. At the end the model writes new
"Python" by sampling one character at a time with a temperature.

Usage (from the repository root)::

    python examples/char_lm.py                                   # LSTM, rnn_ext, a few minutes
    python examples/char_lm.py --cell gru --backend torch        # GRU from torch.nn instead
    python examples/char_lm.py --checkpoint /tmp/lm.pt           # save a checkpoint as it trains
    python examples/char_lm.py --checkpoint /tmp/lm.pt --resume --steps 2000   # train further
    python examples/char_lm.py --temperature 0.5 --prime "def "  # more conservative samples
    python examples/char_lm.py --smoke                           # tiny sizes, a few seconds

``--backend`` switches the recurrent modules between rnn_ext (fused kernels) and torch.nn; the
two have the same parameters, so a checkpoint written with one resumes with the other.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import sys
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

CORPUS_MODULES = ("argparse", "textwrap", "string", "heapq", "bisect", "functools",
                  "collections", "dataclasses", "fractions", "statistics", "json.decoder",
                  "json.encoder", "random", "calendar", "difflib", "enum", "pathlib", "ast")

# --smoke: tiny sizes that still run every code path (training, evaluation, checkpoint, sampling).
SMOKE_DEFAULTS = dict(max_chars=20_000, embed_size=16, hidden_size=64, batch_size=8, bptt=32,
                      steps=30, log_every=5, eval_every=15, checkpoint_every=15,
                      sample_length=120)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    data = parser.add_argument_group("data")
    data.add_argument("--max-chars", type=int, default=600_000,
                      help="characters of standard-library source to use (10%% for validation)")
    model = parser.add_argument_group("model")
    model.add_argument("--embed-size", type=int, default=64)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--dropout", type=float, default=0.1)
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1000,
                       help="total optimizer steps (the cosine learning-rate schedule spans them)")
    train.add_argument("--batch-size", type=int, default=32, help="parallel text streams")
    train.add_argument("--bptt", type=int, default=64, help="characters per truncated-BPTT chunk")
    train.add_argument("--lr", type=float, default=3e-3,
                       help="peak learning rate (cosine decay to a tenth of it)")
    train.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    train.add_argument("--log-every", type=int, default=50)
    train.add_argument("--eval-every", type=int, default=250)
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument("--checkpoint", type=Path,
                      help="file to save model, optimizer and step to (--smoke: a temp file)")
    ckpt.add_argument("--checkpoint-every", type=int, default=250)
    ckpt.add_argument("--resume", action="store_true",
                      help="continue from --checkpoint (the carried state restarts at zero)")
    sample = parser.add_argument_group("sampling")
    sample.add_argument("--temperature", type=positive_float, default=0.8,
                        help="softmax temperature: lower is more conservative")
    sample.add_argument("--sample-length", type=int, default=600)
    sample.add_argument("--prime", default="def ", help="text the sample starts from")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_smoke(parser, argv, SMOKE_DEFAULTS)
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH")
    if args.resume and not args.checkpoint.is_file():
        parser.error(f"--resume: no checkpoint at {args.checkpoint}")
    if not args.prime:
        parser.error("--prime must not be empty")
    return args


# -------------------------------------------------------------------------------------- data

def load_corpus(max_chars: int) -> str:
    """The source text of CORPUS_MODULES, concatenated and cut to max_chars."""
    parts = [inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES]
    return "\n\n".join(parts)[:max_chars]


def as_streams(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A 1-D id tensor cut into batch_size contiguous streams: [batch_size, length]."""
    length = ids.numel() // batch_size
    return ids[:length * batch_size].view(batch_size, length)


def chunk(streams: torch.Tensor, index: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of truncated-BPTT chunk `index`: two [B, bptt]."""
    start = index * bptt
    return streams[:, start:start + bptt], streams[:, start + 1:start + 1 + bptt]


def num_chunks(streams: torch.Tensor, bptt: int) -> int:
    return (streams.size(1) - 1) // bptt


# ------------------------------------------------------------------------------------- model

class CharLM(nn.Module):
    """Embedding -> multi-layer LSTM/GRU -> dropout -> linear over the vocabulary."""

    def __init__(self, nn_module, cell: str, vocab_size: int, embed_size: int,
                 hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        recurrent = nn_module.LSTM if cell == "lstm" else nn_module.GRU
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.rnn = recurrent(embed_size, hidden_size, num_layers=num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state=None):
        """tokens [B, T] -> logits [B, T, vocab] and the final recurrent state."""
        output, state = self.rnn(self.embed(tokens), state)
        return self.head(self.drop(output)), state


def detach(state):
    """The recurrent state cut from the graph: h for a GRU, (h, c) for an LSTM."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Cosine decay from args.lr at step 1 to args.lr / 10 at the last step."""
    progress = (step - 1) / max(args.steps - 1, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: CharLM, streams: torch.Tensor, bptt: int) -> float:
    """Mean cross-entropy (nats per character) over the validation streams."""
    model.eval()
    total, count, state = 0.0, 0, None
    for index in range(num_chunks(streams, bptt)):
        inputs, targets = chunk(streams, index, bptt)
        logits, state = model(inputs, state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="sum").item()
        count += targets.numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model: CharLM, vocab: str, prime: str, length: int, temperature: float,
           device: torch.device) -> str:
    """prime followed by `length` characters drawn from softmax(logits / temperature)."""
    model.eval()
    index = {ch: i for i, ch in enumerate(vocab)}
    tokens = torch.tensor([[index[ch] for ch in prime]], device=device)
    logits, state = model(tokens)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
        token = torch.multinomial(probs, 1)  # [1, 1]
        out.append(vocab[token.item()])
        logits, state = model(token, state)
    model.train()
    return prime + "".join(out)


# -------------------------------------------------------------------------------- checkpoint

def model_config(args: argparse.Namespace) -> dict:
    return dict(cell=args.cell, embed_size=args.embed_size, hidden_size=args.hidden_size,
                num_layers=args.num_layers)


def save_checkpoint(path: Path, model, optimizer, step: int, vocab: str, config: dict) -> None:
    """Writes the checkpoint atomically: a crash mid-save leaves the previous one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "vocab": vocab, "config": config}, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, model, optimizer, vocab: str, config: dict) -> int:
    """Restores model and optimizer from path and returns the step it was saved at."""
    state = torch.load(path, map_location="cpu")
    if state["config"] != config:
        sys.exit(f"{path} holds a model with {state['config']}; this run asks for {config}. "
                 "Pass the same model flags to resume.")
    if state["vocab"] != vocab:
        sys.exit(f"{path} was trained on a different vocabulary; use the same --max-chars.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# -------------------------------------------------------------------------------------- main

def train(args: argparse.Namespace, checkpoint: Path | None) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    text = load_corpus(args.max_chars)
    vocab = "".join(sorted(set(text)))
    unknown = set(args.prime) - set(vocab)
    if unknown:
        sys.exit(f"--prime has characters outside the corpus vocabulary: {sorted(unknown)}")
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(0.9 * ids.numel())
    train_streams = as_streams(ids[:split], args.batch_size).to(device)
    val_streams = as_streams(ids[split:], args.batch_size).to(device)
    chunks = num_chunks(train_streams, args.bptt)
    if chunks < 1 or num_chunks(val_streams, args.bptt) < 1:
        sys.exit("--max-chars is too small for --batch-size x --bptt")

    model = CharLM(recurrent_modules(args.backend), args.cell, len(vocab), args.embed_size,
                   args.hidden_size, args.num_layers, args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    config = model_config(args)
    print(f"corpus: {len(text):,} characters of {len(CORPUS_MODULES)} stdlib modules, "
          f"vocabulary {len(vocab)}, {chunks} chunks of {args.batch_size}x{args.bptt} per epoch")
    print(f"model: {args.cell.upper()} {args.num_layers}x{args.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{backend_description(args.backend)} on {device}")

    start_step = 1
    if args.resume:
        start_step = load_checkpoint(checkpoint, model, optimizer, vocab, config) + 1
        print(f"resumed from step {start_step - 1} ({checkpoint})")
    if start_step > args.steps:
        print(f"nothing to train: the checkpoint is at step {start_step - 1}, --steps is "
              f"{args.steps}")

    state, window_loss, window_start = None, 0.0, time.perf_counter()
    for step in range(start_step, args.steps + 1):
        position = (step - 1) % chunks
        if position == 0:
            state = None  # a new pass over the streams starts from a zero state
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        inputs, targets = chunk(train_streams, position, args.bptt)
        logits, state = model(inputs, state)
        state = detach(state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        window_loss += loss.item()

        done = step - start_step + 1
        if step % args.log_every == 0 or step == args.steps:
            steps_in_window = min(done, (step - 1) % args.log_every + 1)
            elapsed = time.perf_counter() - window_start
            mean = window_loss / steps_in_window
            print(f"step {step:5d}/{args.steps} | epoch {(step - 1) // chunks + 1} | "
                  f"loss {mean:.3f} | bpc {mean / math.log(2):.2f} | "
                  f"lr {learning_rate(args, step):.1e} | "
                  f"{1000 * elapsed / steps_in_window:.0f} ms/step | "
                  f"{steps_in_window * inputs.numel() / elapsed / 1000:.1f}k char/s", flush=True)
            window_loss, window_start = 0.0, time.perf_counter()
        if step % args.eval_every == 0 or step == args.steps:
            began = time.perf_counter()
            val = evaluate(model, val_streams, args.bptt)
            print(f"step {step:5d} | val loss {val:.3f} | val bpc {val / math.log(2):.2f} | "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
            window_start += time.perf_counter() - began  # evaluation is not training time
        if checkpoint is not None and (step % args.checkpoint_every == 0 or step == args.steps):
            save_checkpoint(checkpoint, model, optimizer, step, vocab, config)
            print(f"step {step:5d} | saved checkpoint {checkpoint}", flush=True)

    print(f"\nsample (temperature {args.temperature}):\n" + "-" * 72)
    print(sample(model, vocab, args.prime, args.sample_length, args.temperature, device))
    print("-" * 72)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke and args.checkpoint is None:
        with tempfile.TemporaryDirectory() as tmp:
            train(args, Path(tmp) / "char_lm.pt")
    else:
        train(args, args.checkpoint)


if __name__ == "__main__":
    main()
