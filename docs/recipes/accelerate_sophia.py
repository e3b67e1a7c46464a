"""SophiaH in an accelerate loop: one call, attach_curvature(model, optimizer)."""

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

import curvlab
from curvlab.integrations import attach_curvature

config = GPT2Config(
    n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16, attn_implementation="eager"
)  # SophiaH differentiates twice: eager attention
model = GPT2LMHeadModel(config)
optimizer = curvlab.optim.Sophia(model.parameters(), lr=1e-3, estimator="hutchinson",
                                 update_period=5, seed=0)  # fmt: skip
ids = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))
loader = torch.utils.data.DataLoader(ids, batch_size=8)

accelerator = Accelerator(cpu=True)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
attach_curvature(model, optimizer)  # the one line of set-up
for batch in loader:
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
print(loss.item())
