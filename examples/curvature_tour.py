"""A tour of curvlab's curvature engine on a small network trained on sklearn's digits.

Run: python examples/curvature_tour.py  (about 10 s on one CPU core)
"""

import torch
from torch import nn

import curvlab as cl
from curvlab.datasets import digits

torch.manual_seed(0)
X, y = digits()
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
loss_fn = nn.CrossEntropyLoss()

# train briefly so that the curvature is that of a network in training
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100):
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step()

# the data as 4 unequal batches: operators weight them exactly like the full-data mean loss
batches = [(X[i : i + 500], y[i : i + 500]) for i in range(0, len(X), 500)]
H = cl.HessianOperator(model, loss_fn, batches)
G = cl.GGNOperator(model, loss_fn, batches)
gen = torch.Generator().manual_seed(0)

top = cl.eigsh(H, k=3, generator=gen)
print(
    "Hessian top-3:",
    top.values.tolist(),
    "residuals",
    top.residuals.tolist(),
    f"({top.num_matvecs} HVPs)",
)
bottom = cl.eigsh(H, k=1, which="SA", generator=gen)
print("Hessian most negative eigenvalue:", float(bottom.values[0]))
print("GGN top-3:    ", cl.eigsh(G, k=3, generator=gen).values.tolist())

tr = cl.trace(H, num_matvecs=99, generator=gen)
print(
    f"trace(H) = {float(tr.value):.4f} ± {float(tr.std_error):.4f}  ({tr.num_matvecs} HVPs, Hutch++)"
)

esd = cl.spectral_density(H, num_probes=2, lanczos_steps=40, generator=gen)
print("tr(H)/n from the density's first moment:", float(esd.moment(1)))

print(cl.layer_sensitivity(model, loss_fn, batches, num_matvecs=40, generator=gen).table())

# scipy interop: the same operator as a scipy LinearOperator
from scipy.sparse.linalg import eigsh as scipy_eigsh  # noqa: E402

print("scipy eigsh top-1:", scipy_eigsh(H.to_scipy(), k=1, which="LA", tol=1e-6)[0])
