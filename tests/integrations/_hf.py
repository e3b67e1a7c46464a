"""A tiny random-init GPT-2 and its in-memory data set, for the Hugging Face and accelerate tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.integrations._common import STEPS

BATCH, SEQ, VOCAB = 4, 8, 32


def tiny_gpt2(attn: str = "eager", dtype: torch.dtype = torch.float64) -> nn.Module:
    """GPT-2 with one layer, random init (seeded), no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # transformers initialises from the global generator
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).to(dtype)


def token_data(n: int = BATCH * STEPS) -> list[dict[str, torch.Tensor]]:
    """``n`` examples ``{"input_ids", "labels"}`` of random tokens (labels = inputs: causal LM)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def batches(data: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The data in consecutive batches of BATCH, stacked (what a sequential loader yields)."""
    return [
        {k: torch.stack([d[k] for d in data[i : i + BATCH]]) for k in data[0]}
        for i in range(0, len(data), BATCH)
    ]


def lm_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """``(loss, logits)`` of the model on a batch: the closure of the reference loop.

    The loss is the one the Trainer trains: it passes ``num_items_in_batch`` (the count of
    labels before the causal shift), so the summed token loss is divided by B·T, not B·(T−1).
    """
    out = model(**batch, num_items_in_batch=torch.tensor(batch["labels"].numel()))
    return out.loss, out.logits
