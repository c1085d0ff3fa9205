"""Sequence-to-sequence "translation" of English number words into digits.

    "three hundred forty two thousand seven"  ->  "342007"

The encoder embeds the words of a batch of padded sentences, packs them with
``pack_padded_sequence`` (so no work is spent on padding) and reads them with a bidirectional
GRU; its final states, joined by a linear layer, start the decoder. The decoder is a GRUCell
stepped one output digit at a time: its input is the previous digit and an attention-weighted
summary of the encoder outputs (dot-product attention, padding masked out), and a linear layer
scores the next digit or the end of the sequence. Training uses teacher forcing: at each step
every sentence of the batch is fed the true previous digit with probability
``--teacher-forcing`` and its own prediction otherwise. Evaluation decodes greedily and reports
the exact-match accuracy on numbers never seen in training.

Usage (from the repository root)::

    python examples/seq2seq.py                          # rnn_ext.GRU + rnn_ext.GRUCell
    python examples/seq2seq.py --backend torch          # torch.nn's modules instead
    python examples/seq2seq.py --teacher-forcing 1.0    # always feed the true previous digit
    python examples/seq2seq.py --translate "nine hundred ninety nine thousand one"
    python examples/seq2seq.py --smoke                  # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

try:  # imported from the repository root (the tests)
    from examples.common import (backend_description, example_parser, parse_with_smoke,
                                 recurrent_modules)
except ImportError:  # run as a script: examples/ is on sys.path
    from common import backend_description, example_parser, parse_with_smoke, recurrent_modules

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
PAD, SOS, EOS = 0, 1, 2
SOURCE_VOCAB = ["<pad>"] + ONES + list(TENS[2:]) + ["hundred", "thousand"]
TARGET_VOCAB = ["<pad>", "<s>", "</s>"] + list("0123456789")
MAX_DIGITS = 6  # numbers below a million

# --smoke: tiny sizes that still run every code path (training, greedy decoding, accuracy).
SMOKE_DEFAULTS = dict(train_size=400, test_size=100, embed_size=16, hidden_size=32, epochs=2)


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=20_000, help="distinct training numbers")
    parser.add_argument("--test-size", type=int, default=2_000,
                        help="distinct held-out numbers, none of them in the training set")
    parser.add_argument("--embed-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--teacher-forcing", type=probability, default=0.5,
                        help="probability of feeding the true previous digit in training")
    parser.add_argument("--translate", nargs="*", default=[],
                        help="number phrases to translate after training")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_smoke(parser, argv, SMOKE_DEFAULTS)
    for phrase in args.translate:
        unknown = set(phrase.split()) - set(SOURCE_VOCAB[1:])
        if unknown or not phrase.split():
            parser.error(f"--translate {phrase!r}: unknown words {sorted(unknown)}; "
                         f"known: {' '.join(SOURCE_VOCAB[1:])}")
    if args.train_size + args.test_size > 10 ** MAX_DIGITS // 2:
        parser.error("--train-size + --test-size is too large")
    return args


# -------------------------------------------------------------------------------------- data

def words_below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        n %= 10
    if n or not words:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> str:
    """English words of 0 <= n < 1,000,000: 342007 -> 'three hundred forty two thousand seven'."""
    if n < 1000:
        return " ".join(words_below_thousand(n))
    words = words_below_thousand(n // 1000) + ["thousand"]
    if n % 1000:
        words += words_below_thousand(n % 1000)
    return " ".join(words)


def make_split(train_size: int, test_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint sets of distinct numbers; the number of digits is drawn uniformly from 1 to
    MAX_DIGITS first, so short numbers are as common as the (far more numerous) long ones."""
    rng = random.Random(seed)
    numbers: set[int] = set()
    while len(numbers) < train_size + test_size:
        digits = rng.randint(1, MAX_DIGITS)
        numbers.add(rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))
    ordered = sorted(numbers)
    rng.shuffle(ordered)
    return ordered[:train_size], ordered[train_size:]


def encode_source(phrases: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids [B, S] padded with PAD, and lengths [B] (on the CPU, as packing wants)."""
    ids = [[SOURCE_VOCAB.index(word) for word in phrase.split()] for phrase in phrases]
    lengths = torch.tensor([len(sentence) for sentence in ids])
    longest = int(lengths.max())
    padded = torch.tensor([sentence + [PAD] * (longest - len(sentence)) for sentence in ids])
    return padded.to(device), lengths


def encode_target(numbers: list[int], device: torch.device) -> torch.Tensor:
    """Digit ids followed by EOS, padded with PAD: [B, MAX_DIGITS + 1]."""
    rows = [[TARGET_VOCAB.index(d) for d in str(n)] + [EOS] for n in numbers]
    return torch.tensor([row + [PAD] * (MAX_DIGITS + 1 - len(row)) for row in rows],
                        device=device)


def batches(numbers: list[int], batch_size: int, device: torch.device):
    """(source ids, source lengths, target ids, numbers) mini-batches, in order."""
    for start in range(0, len(numbers), batch_size):
        chunk = numbers[start:start + batch_size]
        source, lengths = encode_source([number_to_words(n) for n in chunk], device)
        yield source, lengths, encode_target(chunk, device), chunk


# ------------------------------------------------------------------------------------- model

class Encoder(nn.Module):
    """Word embedding -> bidirectional GRU over the packed batch."""

    def __init__(self, nn_module, embed_size: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(len(SOURCE_VOCAB), embed_size, padding_idx=PAD)
        self.rnn = nn_module.GRU(embed_size, hidden_size, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor):
        """source [B, S], lengths [B] -> outputs [B, S, 2H] (zero past each length) and the
        decoder's initial state [B, H]."""
        packed = pack_padded_sequence(self.embed(source), lengths, batch_first=True,
                                      enforce_sorted=False)
        outputs, h_n = self.rnn(packed)  # h_n [2 directions, B, H]
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=source.size(1))
        return outputs, torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], dim=1)))


class Decoder(nn.Module):
    """GRUCell over (previous digit, attention context), and a linear layer over the digits."""

    def __init__(self, nn_module, embed_size: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(len(TARGET_VOCAB), embed_size)
        self.keys = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.cell = nn_module.GRUCell(embed_size + 2 * hidden_size, hidden_size)
        self.out = nn.Linear(3 * hidden_size, len(TARGET_VOCAB))

    def step(self, token, state, keys, memory, mask):
        """One output step: token [B], state [B, H], keys [B, S, H], memory [B, S, 2H], mask
        [B, S] (True on words) -> logits [B, V] and the next state."""
        scores = torch.bmm(keys, state.unsqueeze(2)).squeeze(2).masked_fill(~mask, float("-inf"))
        context = torch.bmm(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        state = self.cell(torch.cat([self.embed(token), context], dim=1), state)
        return self.out(torch.cat([state, context], dim=1)), state


class Seq2Seq(nn.Module):
    def __init__(self, nn_module, embed_size: int, hidden_size: int):
        super().__init__()
        self.encoder = Encoder(nn_module, embed_size, hidden_size)
        self.decoder = Decoder(nn_module, embed_size, hidden_size)

    def forward(self, source, lengths, target=None, teacher_forcing: float = 0.0):
        """Logits [B, MAX_DIGITS + 1, V]. With target [B, MAX_DIGITS + 1], each step's input
        is the true previous digit with probability teacher_forcing (per sentence), the
        greedy prediction otherwise; without target, decoding is greedy throughout."""
        memory, state = self.encoder(source, lengths)
        keys, mask = self.decoder.keys(memory), source != PAD
        token = torch.full((source.size(0),), SOS, dtype=torch.long, device=source.device)
        steps = []
        for t in range(MAX_DIGITS + 1):
            logits, state = self.decoder.step(token, state, keys, memory, mask)
            steps.append(logits)
            token = logits.argmax(1)
            if target is not None and teacher_forcing > 0:
                forced = torch.rand(token.shape, device=token.device) < teacher_forcing
                token = torch.where(forced, target[:, t], token)
        return torch.stack(steps, dim=1)


def digits(logits_row: torch.Tensor) -> str:
    """Greedy digits of one decoded sequence, up to the first end-of-sequence."""
    out = []
    for token in logits_row.argmax(-1).tolist():
        if token in (EOS, PAD, SOS):
            break
        out.append(TARGET_VOCAB[token])
    return "".join(out)


@torch.no_grad()
def exact_match(model: Seq2Seq, numbers: list[int], batch_size: int,
                device: torch.device) -> tuple[int, list[tuple[int, str]]]:
    """How many numbers are decoded exactly (greedy), and (number, decoded) of every number."""
    model.eval()
    decoded = []
    for source, lengths, _, chunk in batches(numbers, batch_size, device):
        logits = model(source, lengths)
        decoded += [(n, digits(row)) for n, row in zip(chunk, logits)]
    model.train()
    return sum(str(n) == out for n, out in decoded), decoded


@torch.no_grad()
def translate(model: Seq2Seq, phrase: str, device: torch.device) -> str:
    model.eval()
    source, lengths = encode_source([phrase], device)
    out = digits(model(source, lengths)[0])
    model.train()
    return out


# -------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_numbers, test_numbers = make_split(args.train_size, args.test_size, args.seed)
    print(f"data: {len(train_numbers)} training and {len(test_numbers)} held-out numbers "
          f"below {10 ** MAX_DIGITS:,}, e.g. {number_to_words(train_numbers[0])!r} -> "
          f"{train_numbers[0]}")

    model = Seq2Seq(recurrent_modules(args.backend), args.embed_size, args.hidden_size).to(device)
    print(f"model: bidirectional GRU encoder + attention GRUCell decoder, hidden "
          f"{args.hidden_size}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{backend_description(args.backend)} on {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)

    for epoch in range(1, args.epochs + 1):
        began, total, count = time.perf_counter(), 0.0, 0
        rng.shuffle(train_numbers)
        for source, lengths, target, _ in batches(train_numbers, args.batch_size, device):
            logits = model(source, lengths, target, args.teacher_forcing)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                               ignore_index=PAD)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            total += loss.item() * source.size(0)
            count += source.size(0)
        seconds = time.perf_counter() - began
        correct, _ = exact_match(model, test_numbers, 256, device)
        print(f"epoch {epoch:3d}/{args.epochs} | loss {total / count:.4f} | "
              f"held-out exact match {correct / len(test_numbers):.2%} | {seconds:.1f} s | "
              f"{count / seconds:.0f} sentences/s", flush=True)

    correct, decoded = exact_match(model, test_numbers, 256, device)
    print(f"\nheld-out exact-match accuracy: {correct / len(test_numbers):.2%} "
          f"({correct} of {len(test_numbers)} numbers)")
    wrong = [(n, out) for n, out in decoded if str(n) != out]
    shown = decoded[:5] + [pair for pair in wrong[:5] if pair not in decoded[:5]]
    print("examples (greedy decoding):")
    for n, out in shown:
        print(f"  {'ok   ' if str(n) == out else 'WRONG'} {number_to_words(n)!r} -> {out!r}"
              + ("" if str(n) == out else f" (expected {n})"))
    for phrase in args.translate:
        print(f"  {phrase!r} -> {translate(model, phrase, device)!r}")


if __name__ == "__main__":
    main()
