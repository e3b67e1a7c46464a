"""Watch the edge of stability: full-batch GD on a small tanh MLP, with a Sharpness monitor.

Cohen et al. (2021): under gradient descent with step size η the top Hessian eigenvalue rises
until it reaches 2/η and then hovers there. The monitor runs a warm-started Lanczos every 25 steps
and reports λ_max·η/2 (1 = the edge). Run (about 20 s):

    python examples/watch_sharpness.py
"""

import torch
from torch import nn

from curvlab.datasets import digits
from curvlab.monitors import HistorySink, Sharpness, attach

X, y = digits()
X, y = X[:200], y[:200]
targets = nn.functional.one_hot(y, 10).float()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖outputs − targets‖² summed over the outputs, averaged over examples (Cohen et al.)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


lr = 0.5
opt = torch.optim.SGD(model.parameters(), lr=lr)

handle = attach(opt, Sharpness(model, loss_fn, (X, targets), every=25), HistorySink())
for _ in range(800):
    opt.zero_grad()
    loss = loss_fn(model(X), targets)
    loss.backward()
    opt.step()
handle.remove()

sink = handle.sink
for step, ratio, hvps in zip(
    sink.steps("sharpness/ratio"), sink.values("sharpness/ratio"), sink.values("sharpness/matvecs")
):
    print(f"step {step:4d}  λ_max·η/2 = {ratio:5.3f}   ({int(hvps)} HVPs)")
