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

from curvlab.errors import ShapeMismatchError
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
    out: Tensor | None = None,
) -> Tensor:
    """Return a tensor of i.i.d. Rademacher entries (+1 or -1, each with probability 1/2).

    Each sign is one bit of a 64-bit random word (one generator call per 64 signs); the bits are
    turned into signs a byte at a time through a 256 x 8 table of ±1 rows (one pass that writes
    the result). ``out``: a contiguous tensor of ``shape`` to write into, whose dtype and device
    then replace ``dtype`` and ``device`` (a buffer reused across draws: no fresh pages).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = rademacher(1000, generator=g)
        >>> sorted(z.unique().tolist())
        [-1.0, 1.0]
    """
    draw_on = _draw_device(device, generator)
    count = math.prod(shape)
    if out is None:
        target = torch.device(device) if device is not None else draw_on
        out = torch.empty(shape, dtype=dtype, device=target)
    elif tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ShapeMismatchError(
            f"out has shape {tuple(out.shape)}, contiguous={out.is_contiguous()}; pass a "
            f"contiguous tensor of shape {tuple(shape)}"
        )
    target = out.device  # an ``out`` decides the device and dtype
    # the random bits: 64 per draw of the generator (torch.randint(0, 2) draws once per sign,
    # random bytes once per 8 signs: 4.1 ms of the 5M-entry probe, the 64-bit words 0.9 ms)
    # drawn on the CPU for a CUDA tensor: the words (1/32 of the probe's float32 bytes) go over
    # from pinned memory without blocking, so the draw makes no host synchronisation
    pinned = draw_on.type == "cpu" and target.type == "cuda"
    words = torch.empty((count + 63) // 64, dtype=torch.int64, device=draw_on, pin_memory=pinned)
    words.random_(torch.iinfo(torch.int64).min, None, generator=generator)  # all 64 bits
    words = words.to(target, non_blocking=pinned)
    octets = words.view(torch.uint8).to(torch.int32)  # index_select's index
    table = _sign_table(out.dtype, target)
    flat, whole = out.view(-1), count // 8
    torch.index_select(table, 0, octets[:whole], out=flat[: 8 * whole].view(whole, 8))
    if count > 8 * whole:  # the last, partial byte
        flat[8 * whole :] = torch.index_select(table, 0, octets[whole : whole + 1])[0, : count % 8]
    return out


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[256, 8]``: row ``b`` holds ``2·bit - 1`` for the bits of the byte ``b``, lowest first."""
    table = _SIGN_TABLES.get((dtype, device))
    if table is None:
        bits = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1)
        table = (2 * bits - 1).to(dtype=dtype, device=device)
        _SIGN_TABLES[(dtype, device)] = table
    return table


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
    out: Tensor | None = None,
) -> Tensor:
    """Return an ``[n, k]`` matrix of probe columns of the given ``kind``.

    Args:
        n: dimension of each probe.
        k: number of probes (columns).
        kind: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (entries N(0, 1)).
        generator: source of randomness; ``None`` uses torch's global generator.
        dtype, device: of the returned matrix.
        out: a contiguous ``[n, k]`` tensor of that dtype and device to write into (a buffer
            reused across draws), returned.

    Raises:
        UnknownOptionError: for an unknown ``kind``.
    """
    if check_choice(kind, PROBES, "probe kind") == "rademacher":
        return rademacher(n, k, generator=generator, dtype=dtype, device=device, out=out)
    if out is not None and out.device == _draw_device(device, generator):
        return torch.randn(n, k, generator=generator, out=out)  # the buffer's pages again
    z = gaussian(n, k, generator=generator, dtype=dtype, device=device)
    return z if out is None else out.copy_(z)
