"""EControl DDP hook: simulated workers bit-exact against the paper's algorithm; DDP on 2 gloo ranks."""

from __future__ import annotations

import inspect
import io
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlab.distributed import EControlState, econtrol_hook
from curvlab.distributed._comm import SimulatedWorld, run_ranks
from curvlab.errors import (
    DistributedError,
    InvalidArgumentError,
    StateDictError,
    UnknownOptionError,
)
from tests.distributed._gloo import needs_gloo, run_two_ranks


class _Bucket:
    """The part of DDP's GradBucket the hook reads: one bucket holding the whole gradient."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def _problem(world: int, d: int = 40):
    """Heterogeneous least squares: rank i holds f_i(x) = 0.5 ||A_i x - b_i||^2 / m."""
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(world):
        a = torch.randn(30, d, generator=g, dtype=torch.float64)
        b = torch.randn(30, generator=g, dtype=torch.float64) + 3.0 * i
        data.append((a, b))
    return data


def _grad(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.T @ (a @ x - b) / a.shape[0]


def _through_a_file(obj):
    """``obj`` saved and loaded back, as a checkpoint read by a fresh process."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _simulated(world, steps, lr, resume_at=None, load=True, **kw) -> list[torch.Tensor]:
    """Each rank's iterate; with ``resume_at``, the state is checkpointed there and reloaded
    into a new EControlState (and the iterate through the same file); ``load=False`` skips
    ``load_state_dict`` (the new state starts afresh)."""
    data, sim = _problem(world), SimulatedWorld(world)

    def worker(r: int) -> torch.Tensor:
        state = EControlState(process_group=sim.rank(r), **kw)
        x = torch.zeros(data[0][0].shape[1], dtype=torch.float64)
        for t in range(steps):
            if t == resume_at:
                saved = _through_a_file({"x": x, "econtrol": state.state_dict()})
                state = EControlState(process_group=sim.rank(r), **kw)
                if load:
                    state.load_state_dict(saved["econtrol"])
                x = saved["x"]
            x = x - lr * econtrol_hook(state, _Bucket(_grad(*data[r], x))).value()
        return x

    return run_ranks(sim, worker)


def _compress_ref(u, compressor, ratio, gen):
    """The compressors, from their definitions."""
    if compressor == "sign":
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype) * (u.abs().sum() / u.numel())
    k = max(1, int(ratio * u.numel()))
    if compressor == "topk":
        idx = torch.topk(u.abs(), k, sorted=False).indices
    else:
        idx = torch.randperm(u.numel(), generator=gen)[:k]
    out = torch.zeros_like(u)
    out[idx] = u[idx]
    return out


def _reference(world, steps, lr, compressor, ratio, eta, start_iter=2, seed=0):
    """EControl (Gao, Islamov, Stich 2024, Algorithm 1) on a list of ranks."""
    data = _problem(world)
    x = torch.zeros(data[0][0].shape[1], dtype=torch.float64)
    gens = [torch.Generator().manual_seed(seed) for _ in range(world)]  # same seed everywhere
    for t in range(steps):
        g = [_grad(*data[i], x) for i in range(world)]
        if t < start_iter:  # initialisation: e = 0, h_i = g_i, h = mean g_i
            e = [torch.zeros_like(x) for _ in range(world)]
            h_loc = [gi.clone() for gi in g]
            h = sum(g) / world
        else:
            delta = [
                _compress_ref(eta * e[i] + g[i] - h_loc[i], compressor, ratio, gens[i])
                for i in range(world)
            ]
            for i in range(world):
                e[i] = e[i] + g[i] - h_loc[i] - delta[i]
                h_loc[i] = h_loc[i] + delta[i]
            h = h + sum(delta) / world
        x = x - lr * h
    return x


@pytest.mark.parametrize("compressor", ["topk", "sign", "randk"])
@pytest.mark.parametrize("world", [2, 3])
def test_simulated_workers_equal_the_papers_algorithm_bit_for_bit(compressor, world):
    kw = {"compressor": compressor, "ratio": 0.1, "eta": 0.3}
    got = _simulated(world, steps=8, lr=0.05, **kw)
    ref = _reference(world, steps=8, lr=0.05, **kw)
    for x in got:
        assert torch.equal(x, ref)


@pytest.mark.parametrize(
    ("compressor", "resume_at"), [("topk", 5), ("sign", 5), ("randk", 5), ("randk", 1)]
)
def test_resume_from_state_dict_continues_bit_for_bit(compressor, resume_at):
    kw = {"compressor": compressor, "ratio": 0.1, "eta": 0.3}
    straight = _simulated(2, steps=10, lr=0.05, **kw)
    resumed = _simulated(2, steps=10, lr=0.05, resume_at=resume_at, **kw)
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)
    # the checkpoint matters: a new state without it (re-initialised) ends elsewhere
    afresh = _simulated(2, steps=10, lr=0.05, resume_at=resume_at, load=False, **kw)
    assert not torch.equal(straight[0], afresh[0])


def _saved_state(**kw) -> dict:
    """Rank 0's state_dict of a 2-rank topk run of 3 steps on 40 coordinates."""
    sim, data = SimulatedWorld(2), _problem(2)

    def worker(r: int) -> dict:
        state = EControlState(process_group=sim.rank(r), **{"ratio": 0.1, **kw})
        for _ in range(3):
            econtrol_hook(state, _Bucket(_grad(*data[r], torch.zeros(40, dtype=torch.float64))))
        return state.state_dict()

    return run_ranks(sim, worker)[0]


@pytest.mark.parametrize(
    ("kwargs", "edit", "match"),
    [
        (
            {"compressor": "sign", "eta": 0.1},
            None,
            "saved with compressor='topk' but this EControlState has "
            "compressor='sign'; build the EControlState with the saved settings",
        ),
        (
            {"ratio": 0.2, "eta": 0.1},
            None,
            "saved with ratio=0.1 but this EControlState has ratio=0.2",
        ),
        ({"eta": 0.5}, None, "saved with eta=0.1 but this EControlState has eta=0.5"),
        ({"rank": 1}, None, "saved with rank=0 but this EControlState has rank=1"),
        ({}, lambda sd: {"state": {}}, "expects the dict returned by EControlState.state_dict()"),
        (
            {},
            lambda sd: {**sd, "buckets": {0: {"e": sd["buckets"][0]["e"]}}},
            "bucket 0 of the state_dict lacks the buffers",
        ),
        (
            {},
            lambda sd: {**sd, "buckets": {0: {**sd["buckets"][0], "h": torch.zeros(7)}}},
            r"bucket 0 has buffers of shapes .*'h': \(7,\).*another model or DDP bucketing",
        ),
    ],
)
def test_load_state_dict_bad_input(kwargs, edit, match):
    saved = _saved_state()
    if edit is not None:
        saved = edit(saved)
    sim = SimulatedWorld(2)
    kwargs = {"ratio": 0.1, **kwargs}
    state = EControlState(process_group=sim.rank(kwargs.pop("rank", 0)), **kwargs)
    with pytest.raises(StateDictError, match=match):
        state.load_state_dict(saved)


def test_resumed_state_rejects_a_bucket_of_another_shape():
    sim = SimulatedWorld(2)
    state = EControlState(process_group=sim.rank(0), ratio=0.1)
    state.load_state_dict(_saved_state())
    with pytest.raises(
        StateDictError,
        match=r"gradient bucket 0 has shape \(30,\) but this "
        r"EControlState holds buffers of shape \(40,\)",
    ):
        state.reduce(0, torch.zeros(30, dtype=torch.float64))


def test_top_k_bytes_are_k_values_and_indices():
    sim, d = SimulatedWorld(2), 1000

    def worker(r: int) -> list[int]:
        state = EControlState("topk", ratio=0.05, process_group=sim.rank(r))
        sent = []
        for t in range(3):
            before = state.comm.bytes_sent
            econtrol_hook(
                state, _Bucket(torch.randn(d, generator=torch.Generator().manual_seed(t)))
            )
            sent.append(state.comm.bytes_sent - before)
        return sent

    init, _, compressed = run_ranks(sim, worker)[0]
    assert init == d * 4  # ring all-reduce of fp32 over 2 ranks sends the tensor once
    assert compressed == 50 * (4 + 4)  # 50 fp32 values and 50 int32 indices


def test_hook_annotations_are_the_objects_ddp_checks():
    """DDP's register_comm_hook rejects a hook whose annotations are strings (postponed)."""
    sig = inspect.signature(econtrol_hook)
    assert sig.parameters["bucket"].annotation is dist.GradBucket
    assert sig.return_annotation == torch.futures.Future[torch.Tensor]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, DistributedError, "call torch.distributed.init_process_group"),
        ({"ratio": 0.0}, InvalidArgumentError, r"compression ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, InvalidArgumentError, r"compression ratio must be in \(0, 1\]"),
        ({"ratio": "0.1"}, InvalidArgumentError, r"compression ratio must be in \(0, 1\]"),
        ({"compressor": "qsgd"}, UnknownOptionError, "unknown compressor 'qsgd'; choose one of"),
        ({"eta": -0.1}, InvalidArgumentError, "eta must be a finite number >= 0"),
        ({"start_iter": 0}, InvalidArgumentError, "start_iter must be an int >= 1"),
    ],
)
def test_bad_input(kwargs, error, match):
    assert not dist.is_initialized()
    with pytest.raises(error, match=match):
        EControlState(**kwargs)


# ---- for real: DDP on two gloo processes, replayed on simulated workers -----------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(nn.Linear(6, 3).double())
        state = EControlState("topk", ratio=0.3, eta=0.5)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(st: EControlState, bucket):  # records the local gradient and the result
            fut = econtrol_hook(st, bucket)
            seen.append((bucket.buffer().clone(), fut.value().clone()))
            return fut

        model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        y = torch.randn(16, 3, generator=g, dtype=torch.float64) + rank
        for _ in range(5):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        params = [p.detach() for p in model.parameters()]
        torch.save({"seen": seen, "params": params}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_gloo
def test_ddp_on_two_gloo_processes_equals_the_simulated_workers(tmp_path):
    run_two_ranks(_ddp_worker, tmp_path)
    runs = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    for p, q in zip(runs[0]["params"], runs[1]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the ranks stay in lockstep
    sim = SimulatedWorld(2)

    def replay(r: int) -> list[torch.Tensor]:
        state = EControlState("topk", ratio=0.3, eta=0.5, process_group=sim.rank(r))
        return [econtrol_hook(state, _Bucket(g)).value() for g, _ in runs[r]["seen"]]

    for r, outs in enumerate(run_ranks(sim, replay)):
        assert len(outs) == 5
        for out, (_, real) in zip(outs, runs[r]["seen"]):
            torch.testing.assert_close(out, real, rtol=1e-12, atol=1e-14)
