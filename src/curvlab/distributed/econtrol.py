r"""EControl: compressed gradient communication with controlled error feedback, as a DDP hook.

Each rank ``i`` keeps an error :math:`e^i` and a gradient estimate :math:`h^i`; every rank keeps
the average estimate :math:`h = \frac{1}{W}\sum_i h^i`. With a contractive compressor
:math:`C` and feedback strength :math:`\eta`, at each step, on the local gradient
:math:`g^i_t`:

.. math::
   \begin{aligned}
   &\Delta^i_t = C\big(\eta\, e^i_t + g^i_t - h^i_t\big) \qquad \text{(the only message sent)} \\
   &e^i_{t+1} = e^i_t + g^i_t - h^i_t - \Delta^i_t, \qquad h^i_{t+1} = h^i_t + \Delta^i_t \\
   &h_{t+1} = h_t + \tfrac{1}{W}\textstyle\sum_i \Delta^i_t, \qquad
     \theta_{t+1} = \theta_t - \gamma\, h_{t+1} \ \text{(the optimizer, on the hook's result)}
   \end{aligned}

initialised with :math:`e^i = 0`, :math:`h^i = g^i` and :math:`h` = their average (one
full-precision all-reduce). :math:`\eta = 0` gives EF21; the error term :math:`e^i` accumulates
what compression left out and feeds a fraction :math:`\eta` of it back.

Source: Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression and Error
Control", ICLR 2024, arXiv 2311.05645 (Algorithm 1). No code of the authors was found in the
sources searched; the update above follows the paper's algorithm as summarised in the seed
catalogue (B53). Deviations: the state is re-initialised (full all-reduce) on every iteration
before ``start_iter`` (default 2) because DDP rebuilds its gradient buckets after the first
iteration (torch's PowerSGD hook waits for the same reason); the compressor acts on each DDP
bucket (a flat concatenation of gradients), not on the whole model; ``eta`` has no default in the
paper (its theory sets it from the compressor's :math:`\delta`; tune it).

(No ``from __future__ import annotations`` here: DDP's ``register_comm_hook`` compares the hook's
annotations with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects.)
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.distributed._comm import resolve_comm
from curvlab.distributed._compress import COMPRESSORS, compress, mean_of_compressed
from curvlab.errors import InvalidArgumentError, StateDictError, UnknownOptionError

__all__ = ["EControlState", "econtrol_hook"]

# settings a saved state must share with the state it is loaded into
_SETTINGS = ("compressor", "ratio", "eta", "start_iter", "seed", "world", "rank")
_BUFFERS = ("e", "h_local", "h")


class EControlState:
    r"""The state of :func:`econtrol_hook`: compressor, feedback strength, per-bucket buffers.

    Args:
        compressor: ``"topk"`` (largest magnitudes), ``"randk"`` (random coordinates, the same on
            every rank) or ``"sign"`` (:math:`\frac{\|x\|_1}{n}\operatorname{sign}(x)`).
        ratio: fraction of coordinates kept by ``"topk"``/``"randk"``, in (0, 1] (unused by
            ``"sign"``, which sends 1 bit per coordinate).
        eta: feedback strength :math:`\eta \ge 0` (``0`` is EF21). Default ``None``: the
            compressor's :math:`\delta` for top-k/random-k (``ratio``), 0.5 for sign. Keep it of
            the order of :math:`\delta`: on the benchmark's MLP, top-1% converged like all-reduce
            with eta <= 0.01, degraded at 0.1 and diverged at 0.5; sign converged at 0.5.
        process_group: the DDP process group (default ``None``: the world), or a simulated rank of
            :class:`curvlab.distributed._comm.SimulatedWorld` (tests).
        start_iter: iterations before which every call re-initialises from a full all-reduce
            (at least 1; default 2 because DDP rebuilds its buckets after the first iteration).
        seed: seed of the ``"randk"`` coordinates (the same on every rank).

    Checkpointing: :meth:`state_dict` holds the settings, the iteration count and each bucket's
    buffers and random-k generator state; :meth:`load_state_dict` into a state built with the
    same settings on the same rank continues bit for bit (each rank saves and loads its own).

    Raises:
        UnknownOptionError: an unknown compressor (the message lists the known ones).
        InvalidArgumentError: ``ratio`` outside (0, 1], a negative ``eta`` or ``start_iter < 1``.
        DistributedError: ``torch.distributed`` is not initialised.

    Example::

        state = EControlState(compressor="topk", ratio=0.01)  # eta = 0.01
        ddp_model.register_comm_hook(state, econtrol_hook)
    """

    def __init__(
        self,
        compressor: str = "topk",
        ratio: float = 0.01,
        eta: float | None = None,
        process_group: Any = None,
        *,
        start_iter: int = 2,
        seed: int = 0,
    ) -> None:
        if compressor not in COMPRESSORS:
            raise UnknownOptionError(
                f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}"
            )
        if not _is_number(ratio) or not 0.0 < ratio <= 1.0:
            raise InvalidArgumentError(
                f"the compression ratio must be in (0, 1] (the fraction of coordinates sent), "
                f"got {ratio!r}"
            )
        # default: the compressor's delta for top-k/random-k; for sign, the benchmark's value
        if eta is None:
            eta = float(ratio) if compressor in ("topk", "randk") else 0.5
        if not _is_number(eta) or not math.isfinite(eta) or eta < 0:
            raise InvalidArgumentError(f"eta must be a finite number >= 0, got {eta!r}")
        if not isinstance(start_iter, int) or isinstance(start_iter, bool) or start_iter < 1:
            raise InvalidArgumentError(f"start_iter must be an int >= 1, got {start_iter!r}")
        self.compressor = compressor
        self.ratio = float(ratio)
        self.eta = float(eta)
        self.start_iter = start_iter
        self.seed = seed
        self.comm = resolve_comm(process_group, "an EControlState")
        self.iter = 0
        self.buckets: dict[int, dict[str, Any]] = {}

    def _settings(self) -> dict[str, Any]:
        return {
            "compressor": self.compressor,
            "ratio": self.ratio,
            "eta": self.eta,
            "start_iter": self.start_iter,
            "seed": self.seed,
            "world": self.comm.world,
            "rank": self.comm.rank,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: settings, iteration count, per-bucket buffers and generator states.

        Returns:
            ``{"compressor", "ratio", "eta", "start_iter", "seed", "world", "rank", "iter",
            "buckets"}`` where ``buckets`` maps each DDP bucket index to its ``"e"``,
            ``"h_local"``, ``"h"`` (references to the live buffers, as ``Optimizer.state_dict``:
            save it before the next step) and ``"generator"`` (the random-k generator state).
        """
        return {
            **self._settings(),
            "iter": self.iter,
            "buckets": {
                i: {**{k: st[k] for k in _BUFFERS}, "generator": st["generator"].get_state()}
                for i, st in self.buckets.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same rank (buffers are copied).

        Raises:
            StateDictError: not an EControlState state_dict, settings (compressor, ratio, eta,
                start_iter, seed, world size, rank) that differ from this state's, or bucket
                buffers whose shapes differ from each other or from this state's buckets.
        """
        keys = {*_SETTINGS, "iter", "buckets"}
        if not isinstance(state_dict, Mapping) or not keys <= set(state_dict):
            raise StateDictError(
                "EControlState.load_state_dict expects the dict returned by "
                f"EControlState.state_dict() (keys {sorted(keys)}), got "
                f"{type(state_dict).__name__}"
                + (
                    f" with keys {sorted(map(str, state_dict))}"
                    if isinstance(state_dict, Mapping)
                    else ""
                )
            )
        mine = self._settings()
        differ = [k for k in _SETTINGS if state_dict[k] != mine[k]]
        if differ:
            saved = ", ".join(f"{k}={state_dict[k]!r}" for k in differ)
            here = ", ".join(f"{k}={mine[k]!r}" for k in differ)
            raise StateDictError(
                f"the state_dict was saved with {saved} but this EControlState has {here}; "
                "build the EControlState with the saved settings and load each rank's own state"
            )
        buckets = {}
        for i, st in state_dict["buckets"].items():
            if not isinstance(st, Mapping) or not {*_BUFFERS, "generator"} <= set(st):
                raise StateDictError(
                    f"bucket {i} of the state_dict lacks the buffers {list(_BUFFERS)} and "
                    "'generator'; pass the dict returned by EControlState.state_dict()"
                )
            shapes = {k: tuple(st[k].shape) for k in _BUFFERS}
            if i in self.buckets:
                shapes["this state's"] = tuple(self.buckets[i]["e"].shape)
            if len(set(shapes.values())) > 1:
                raise StateDictError(
                    f"bucket {i} has buffers of shapes {shapes}: the state_dict was saved with "
                    "another model or DDP bucketing (bucket_cap_mb); resume with the same ones"
                )
            gen = torch.Generator().set_state(st["generator"])
            buckets[i] = {**{k: st[k].clone() for k in _BUFFERS}, "generator": gen}
        self.iter = int(state_dict["iter"])
        self.buckets = buckets

    def reduce(self, index: int, grad: Tensor) -> Tensor:
        """One EControl round for gradient bucket ``index``: the new average estimate ``h``.

        Updates this rank's ``e`` and ``h`` of the bucket and the shared average; ``grad`` (the
        local gradient) is not modified.
        """
        comm = self.comm
        if self.iter < self.start_iter or index not in self.buckets:
            avg = grad.clone()
            comm.all_reduce_sum(avg)
            avg /= comm.world
            gen = torch.Generator().manual_seed(self.seed + index)
            self.buckets[index] = {
                "e": torch.zeros_like(grad),
                "h_local": grad.clone(),
                "h": avg.clone(),
                "generator": gen,
            }
            return avg
        st = self.buckets[index]
        if st["e"].shape != grad.shape:
            raise StateDictError(
                f"gradient bucket {index} has shape {tuple(grad.shape)} but this EControlState "
                f"holds buffers of shape {tuple(st['e'].shape)} for it: a loaded state_dict came "
                "from another model or DDP bucketing (bucket_cap_mb), or DDP rebuilt its buckets "
                "after start_iter (keep start_iter >= 2)"
            )
        e, h_local, h = st["e"], st["h_local"], st["h"]
        msg = compress(
            (e * self.eta).add_(grad).sub_(h_local), self.compressor, self.ratio, st["generator"]
        )
        e.add_(grad).sub_(h_local).sub_(msg.dense)
        h_local.add_(msg.dense)
        h.add_(mean_of_compressed(msg, self.compressor, comm))
        return h.clone()


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def econtrol_hook(state: EControlState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook running EControl on each gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, econtrol_hook)``; the optimizer then
    steps with the average estimate :math:`h` (module docstring). ``bucket`` is DDP's
    ``GradBucket`` (``buffer()``, ``index()``, ``is_last()``).

    Returns:
        A completed future holding the new average estimate of the bucket.
    """
    out = state.reduce(bucket.index(), bucket.buffer())
    if bucket.is_last():
        state.iter += 1
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(out)
    return fut
