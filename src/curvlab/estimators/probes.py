"""Random probe vectors for stochastic estimators.

Every function takes an explicit ``torch.Generator`` (or ``None`` for torch's default generator);
curvlab never reseeds globally. Probes are drawn on the generator's device when one is given, so
the same seed gives the same probes on every device.

Moments (tested): a Rademacher probe z has entries in {-1, +1} with P = 1/2 each, so E[z] = 0 and
E[z zᵀ] = I; a Gaussian probe has E[z] = 0 and E[z zᵀ] = I as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.operators._checks import check_choice

__all__ = ["PROBES", "gaussian", "rademacher", "rademacher_like", "sample_probes"]

PROBES = ("rademacher", "gaussian")


def _draw_device(
    device: torch.device | str | None, generator: torch.Generator | None
) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def rademacher(
    *shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Return a tensor of i.i.d. Rademacher entries (+1 or -1, each with probability 1/2).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = rademacher(1000, generator=g)
        >>> sorted(z.unique().tolist())
        [-1.0, 1.0]
    """
    draw_on = _draw_device(device, generator)
    count = math.prod(shape)
    # one random byte gives 8 signs, its bits, taken bit plane by bit plane so that the shifts
    # broadcast over long rows, which vectorise (one draw per sign, torch.randint(0, 2), took a
    # third of a Hessian-vector product's time per probe at 1M parameters; this, a fifth of it);
    # the signs 2b - 1 are formed on bytes (255 read as int8 is -1) and converted to the dtype in
    # one pass (the affine map in the dtype took two more passes: 40% of the time at 5M)
    octets = torch.empty(1, (count + 7) // 8, dtype=torch.uint8, device=draw_on)
    octets.random_(generator=generator)  # uniform on [0, 255]
    shifts = torch.arange(8, dtype=torch.uint8, device=draw_on).unsqueeze(1)
    signs = octets.bitwise_right_shift(shifts).bitwise_and_(1).mul_(2).sub_(1)
    out = signs.reshape(-1)[:count].view(torch.int8).to(dtype).reshape(shape)
    return out.to(device) if device is not None else out


def gaussian(
    *shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Return a tensor of i.i.d. standard normal entries."""
    draw_on = _draw_device(device, generator)
    out = torch.randn(shape, generator=generator, device=draw_on, dtype=dtype)
    return out.to(device) if device is not None else out


def rademacher_like(
    tensors: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    """One Rademacher tensor per input tensor, with its shape, dtype and device.

    This is the probe AdaHessian and SophiaH draw per parameter.
    """
    return [
        rademacher(*t.shape, generator=generator, dtype=t.dtype, device=t.device) for t in tensors
    ]


def sample_probes(
    n: int,
    k: int,
    kind: str = "rademacher",
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Return an ``[n, k]`` matrix of probe columns of the given ``kind``.

    Args:
        n: dimension of each probe.
        k: number of probes (columns).
        kind: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (entries N(0, 1)).
        generator: source of randomness; ``None`` uses torch's global generator.
        dtype, device: of the returned matrix.

    Raises:
        UnknownOptionError: for an unknown ``kind``.
    """
    if check_choice(kind, PROBES, "probe kind") == "rademacher":
        return rademacher(n, k, generator=generator, dtype=dtype, device=device)
    return gaussian(n, k, generator=generator, dtype=dtype, device=device)
