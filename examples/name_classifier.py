"""Classifying names by language with a character-level Elman RNN.

The model is the classic single-layer Elman network of PyTorch's "classifying names with a
character-level RNN" tutorial: each character, one-hot encoded, is combined with the previous
hidden state into the next one, h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (an
``RNNCell`` stepped over the characters in Python), and after the last character a linear
layer and LogSoftmax give the log-probability of each language; training minimises NLLLoss by
back-propagation through time. Names are processed in mini-batches: a name that has ended
keeps its hidden state while longer ones in the batch are still being read.

The data are synthetic, so nothing is downloaded: four made-up languages, each with its own
(partly overlapping) inventory of syllable onsets, vowels, codas and name endings, generate
names from a seeded random generator. Accuracy is reported on a held-out split together with a
confusion matrix.

Usage (from the repository root)::

    python examples/name_classifier.py                         # rnn_ext.RNNCell, about a minute
    python examples/name_classifier.py --backend torch         # torch.nn.RNNCell instead
    python examples/name_classifier.py --predict Thaliel Grimdur Takoshi Zhelkova
    python examples/name_classifier.py --smoke                 # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import random
import string
import time
from dataclasses import dataclass

import torch
from torch import nn

try:  # imported from the repository root (the tests)
    from examples.common import (backend_description, example_parser, parse_with_smoke,
                                 recurrent_modules)
except ImportError:  # run as a script: examples/ is on sys.path
    from common import backend_description, example_parser, parse_with_smoke, recurrent_modules

LETTERS = string.ascii_letters  # one-hot positions of the input characters


@dataclass(frozen=True)
class Language:
    """Syllable inventory of a made-up language: a name is 1-3 syllables (onset, vowel,
    coda), often followed by one of the endings."""

    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    endings: tuple[str, ...]

    def name(self, rng: random.Random) -> str:
        syllables = [rng.choice(self.onsets) + rng.choice(self.vowels) + rng.choice(self.codas)
                     for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.7:
            syllables.append(rng.choice(self.endings))
        return "".join(syllables).capitalize()


LANGUAGES = {
    "Aelvish": Language(onsets=("l", "v", "th", "s", "r", "n", "f", "gl", ""),
                        vowels=("a", "e", "i", "ae", "ia", "o"),
                        codas=("", "", "n", "l", "r", "s"),
                        endings=("iel", "ion", "wen", "as", "ith", "eth")),
    "Dwarrow": Language(onsets=("d", "b", "g", "k", "th", "gr", "br", "dr", "kh", "n"),
                        vowels=("o", "u", "a", "au", "i"),
                        codas=("", "r", "k", "m", "n", "rn", "d", "l"),
                        endings=("in", "ur", "ok", "grim", "dur", "ain")),
    "Kanari": Language(onsets=("k", "t", "n", "m", "h", "s", "y", "r", "sh", "ch"),
                       vowels=("a", "i", "u", "e", "o"),
                       codas=("", "", "", "n"),
                       endings=("ko", "ta", "mi", "ru", "shi", "ki")),
    "Zhelvic": Language(onsets=("z", "zh", "v", "sl", "st", "pr", "br", "ch", "m", "d", "k"),
                        vowels=("o", "e", "a", "i", "y"),
                        codas=("", "v", "k", "sh", "n", "l"),
                        endings=("ov", "ska", "ich", "enko", "ova", "in")),
}

# --smoke: tiny sizes that still run every code path (training, evaluation, prediction).
SMOKE_DEFAULTS = dict(names_per_language=150, hidden_size=32, epochs=2, batch_size=32)


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--names-per-language", type=int, default=2000,
                        help="names generated per language (duplicates are dropped)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--predict", nargs="*", default=["Thaliel", "Grimdur", "Takoshi",
                                                         "Zhelkova", "Brain"],
                        help="names to classify after training (ASCII letters only)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_smoke(parser, argv, SMOKE_DEFAULTS)
    bad = [name for name in args.predict if not name or set(name) - set(LETTERS)]
    if bad:
        parser.error(f"--predict takes names of ASCII letters only, got {bad}")
    return args


# -------------------------------------------------------------------------------------- data

def make_dataset(names_per_language: int, seed: int) -> list[tuple[str, int]]:
    """(name, language index) pairs, each name once (the first language to generate it wins),
    shuffled."""
    rng = random.Random(seed)
    labels: dict[str, int] = {}
    for label, language in enumerate(LANGUAGES.values()):
        for _ in range(names_per_language):
            labels.setdefault(language.name(rng), label)
    pairs = sorted(labels.items())
    rng.shuffle(pairs)
    return pairs


def encode(names: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot letters [T, B, len(LETTERS)] (zero-padded to the longest name) and lengths [B]."""
    lengths = torch.tensor([len(name) for name in names])
    steps = int(lengths.max())
    indices = torch.tensor([[LETTERS.index(letter) for letter in name] + [0] * (steps - len(name))
                            for name in names]).T  # [T, B]
    padding = torch.arange(steps).unsqueeze(1) >= lengths  # [T, B]
    onehot = nn.functional.one_hot(indices, len(LETTERS)).float().masked_fill_(
        padding.unsqueeze(2), 0.0)
    return onehot.to(device), lengths.to(device)


def batches(pairs: list[tuple[str, int]], batch_size: int, device: torch.device):
    """(one-hot letters, lengths, labels) mini-batches of the pairs, in order."""
    for start in range(0, len(pairs), batch_size):
        names, labels = zip(*pairs[start:start + batch_size])
        letters, lengths = encode(list(names), device)
        yield letters, lengths, torch.tensor(labels, device=device)


# ------------------------------------------------------------------------------------- model

class ElmanClassifier(nn.Module):
    """An Elman RNN cell read over the characters, then linear + LogSoftmax over languages."""

    def __init__(self, nn_module, hidden_size: int, num_classes: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = nn_module.RNNCell(len(LETTERS), hidden_size)  # input + hidden -> hidden
        self.h2o = nn.Linear(hidden_size, num_classes)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, letters: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """letters [T, B, L] one-hot, lengths [B] -> log-probabilities [B, num_classes]."""
        hidden = letters.new_zeros(letters.size(1), self.hidden_size)
        for t in range(letters.size(0)):
            still_reading = (t < lengths).unsqueeze(1)  # names that have ended keep their state
            hidden = torch.where(still_reading, self.cell(letters[t], hidden), hidden)
        return self.log_softmax(self.h2o(hidden))


@torch.no_grad()
def confusion_matrix(model: ElmanClassifier, pairs, batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """counts[true, predicted] over the pairs."""
    model.eval()
    counts = torch.zeros(len(LANGUAGES), len(LANGUAGES), dtype=torch.long)
    for letters, lengths, labels in batches(pairs, batch_size, device):
        predicted = model(letters, lengths).argmax(1)
        for true, guess in zip(labels.tolist(), predicted.tolist()):
            counts[true, guess] += 1
    model.train()
    return counts


def accuracy(counts: torch.Tensor) -> float:
    return counts.diag().sum().item() / counts.sum().item()


def print_confusion(counts: torch.Tensor) -> None:
    """The confusion matrix (rows: true language, columns: predicted), per-language accuracy
    and the most frequent confusion."""
    names = list(LANGUAGES)
    width = max(len(name) for name in names) + 2
    print("confusion (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{name:>{width}}" for name in names) + f"{'accuracy':>{width}}")
    for i, name in enumerate(names):
        row = "".join(f"{count:>{width}}" for count in counts[i].tolist())
        recall = counts[i, i].item() / max(counts[i].sum().item(), 1)
        print(f"{name:<{width}}{row}{recall:>{width}.1%}")
    errors = counts.clone().fill_diagonal_(0)
    if errors.sum() > 0:
        true, guess = divmod(int(errors.argmax()), len(names))
        print(f"most frequent confusion: {names[true]} read as {names[guess]} "
              f"({errors[true, guess].item()} of {counts[true].sum().item()})")


@torch.no_grad()
def predict(model: ElmanClassifier, name: str, device: torch.device, top: int = 2) -> str:
    model.eval()
    letters, lengths = encode([name], device)
    log_probs = model(letters, lengths)[0]
    model.train()
    values, indices = log_probs.topk(top)
    return ", ".join(f"{list(LANGUAGES)[i]} ({v:.2f})" for v, i in zip(values.tolist(),
                                                                        indices.tolist()))


# -------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    pairs = make_dataset(args.names_per_language, args.seed)
    split = int(len(pairs) * (1 - args.test_fraction))
    train_pairs, test_pairs = pairs[:split], pairs[split:]
    print(f"data: {len(pairs)} names of {len(LANGUAGES)} languages "
          f"({len(train_pairs)} train, {len(test_pairs)} held out), e.g. "
          + ", ".join(name for name, _ in pairs[:5]))

    model = ElmanClassifier(recurrent_modules(args.backend), args.hidden_size,
                            len(LANGUAGES)).to(device)
    print(f"model: Elman RNNCell {len(LETTERS)}->{args.hidden_size} + linear + LogSoftmax, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{backend_description(args.backend)} on {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.NLLLoss()
    rng = random.Random(args.seed)

    for epoch in range(1, args.epochs + 1):
        began = time.perf_counter()
        rng.shuffle(train_pairs)
        total, count = 0.0, 0
        for letters, lengths, labels in batches(train_pairs, args.batch_size, device):
            loss = criterion(model(letters, lengths), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            total += loss.item() * labels.numel()
            count += labels.numel()
        seconds = time.perf_counter() - began
        test_accuracy = accuracy(confusion_matrix(model, test_pairs, args.batch_size, device))
        print(f"epoch {epoch:3d}/{args.epochs} | loss {total / count:.4f} | "
              f"held-out accuracy {test_accuracy:.1%} | {seconds:.1f} s | "
              f"{count / seconds:.0f} names/s", flush=True)

    counts = confusion_matrix(model, test_pairs, args.batch_size, device)
    print(f"\nheld-out accuracy: {accuracy(counts):.1%} on {len(test_pairs)} names")
    print_confusion(counts)
    if args.predict:
        print("\npredictions (log-probabilities):")
        for name in args.predict:
            print(f"  {name:<12} {predict(model, name, device)}")


if __name__ == "__main__":
    main()
