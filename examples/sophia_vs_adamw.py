"""Train the same MLP on sklearn's digits with SophiaG and with AdamW, and compare.

Sophia needs curvature, so its closure returns the loss and the logits WITHOUT calling backward:
the optimizer differentiates it, and every k = 10 steps samples labels from the logits for its
Gauss-Newton-Bartlett estimate. AdamW takes the usual torch closure. Run (about 10 s):

    python examples/sophia_vs_adamw.py
"""

import torch
from torch import nn

import curvlab as cl
from curvlab.datasets import digits

X, y = digits()
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train_idx, test = perm[:1400], perm[1400:]
loss_fn = nn.CrossEntropyLoss()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return float((model(X[test]).argmax(1) == y[test]).float().mean())


def train(name: str, steps: int = 300) -> tuple[float, float]:
    """Train a fresh model with optimizer ``name``; return (final batch loss, test accuracy)."""
    model = make_model()
    if name == "sophia":
        opt = cl.optim.Sophia(model.parameters(), lr=3e-3, rho=0.05, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = cl.schedules.WarmupLinearDecay(warmup=20, total=steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = train_idx[torch.randint(0, len(train_idx), (128,), generator=gen)]

        def sophia_closure(batch: torch.Tensor = batch) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(X[batch])
            return loss_fn(logits, y[batch]), logits  # no backward: Sophia differentiates

        def torch_closure(batch: torch.Tensor = batch) -> torch.Tensor:
            opt.zero_grad()
            out = loss_fn(model(X[batch]), y[batch])
            out.backward()
            return out

        loss = opt.step(sophia_closure if name == "sophia" else torch_closure)
        sched.step()
    return float(loss.detach()), accuracy(model)


for name in ("sophia", "adamw"):
    final_loss, acc = train(name)
    print(f"{name:>7}: final batch loss {final_loss:.4f}, test accuracy {acc:.3f}")
