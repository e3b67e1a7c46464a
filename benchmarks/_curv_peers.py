"""The rows of ``benchmarks/curvature_peers.py``: one function per (library, task), HVPs counted.

Every row builds its operator and solves (library defaults unless the name says otherwise) and
returns a dict with ``nhvp`` (products counted at the library's own matvec entry point) and its
answer: ``values`` (eigenvalues, descending), ``vectors`` ([n, k], for residuals), ``trace``,
``se`` (standard error), ``blocks`` (per-layer traces), ``nodes``/``weights`` (quadrature) or
``grid``/``density`` (smoothed density).

Peers are imported lazily; ``available()`` says which are importable and why not.
PyHessian 0.1 calls ``torch.eig`` (removed from torch) in ``density()``: ``_torch_eig_shim``
installs a stand-in built on ``torch.linalg.eigh`` **inside this benchmark only**, as the
research note's benchmark did (upstream fixed it on GitHub in PR #23, never released).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _curv_problems import Problem
from torch import Tensor

__all__ = ["COUNTER", "PEERS", "available", "rows_for"]

PEERS = ("curvlab", "bare", "pyhessian", "curvlinops", "eigenthings")
_MODULES = {
    "curvlab": "curvlab",
    "bare": "torch",
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops",
    "eigenthings": "hessian_eigenthings",
}


def available() -> dict[str, str | None]:
    """``{peer: None}`` if importable, else the reason it is skipped."""
    out: dict[str, str | None] = {}
    for peer, mod in _MODULES.items():
        try:
            importlib.import_module(mod)
            out[peer] = None
        except Exception as exc:
            out[peer] = f"{type(exc).__name__}: {exc}"
    return out


def version(peer: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    dist = {
        "curvlab": "curvlab",
        "bare": "torch",
        "pyhessian": "pyhessian",
        "curvlinops": "curvlinops-for-pytorch",
        "eigenthings": "hessian-eigenthings",
    }[peer]
    try:
        return v(dist)
    except PackageNotFoundError:
        return "src"


class _Counter:
    n = 0


COUNTER = _Counter()
_INSTALLED: set[str] = set()


def _install_counters(peer: str) -> None:
    """Wrap each peer's own HVP entry point once, so every product is counted."""
    if peer in _INSTALLED:
        return
    _INSTALLED.add(peer)
    if peer == "pyhessian":
        import pyhessian  # noqa: F401 - the package shadows its module ``hessian`` by the class

        ph = sys.modules["pyhessian.hessian"]
        orig = ph.hessian_vector_product

        def counted(gradsH: Any, params: Any, v: Any) -> Any:
            COUNTER.n += 1
            return orig(gradsH, params, v)

        ph.hessian_vector_product = counted
        _torch_eig_shim()
    elif peer == "curvlinops":
        from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator

        for cls in (HessianLinearOperator, GGNLinearOperator, EFLinearOperator):
            orig_mm = cls._matmat_batch

            def counted_mm(self: Any, X: Any, y: Any, M: list[Tensor], _o: Any = orig_mm) -> Any:
                COUNTER.n += int(M[0].shape[-1])
                return _o(self, X, y, M)

            cls._matmat_batch = counted_mm  # type: ignore[method-assign]
    elif peer == "eigenthings":
        from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HessianOperator

        for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
            orig_mv = cls.matvec

            def counted_mv(self: Any, v: Tensor, _o: Any = orig_mv) -> Tensor:
                COUNTER.n += 1
                return _o(self, v)

            cls.matvec = counted_mv  # type: ignore[method-assign]


def _torch_eig_shim() -> None:
    """``torch.eig(T, eigenvectors=True)`` for the symmetric T of PyHessian's density (benchmark only)."""
    if hasattr(torch, "eig") and getattr(torch.eig, "_curv_shim", False):
        return

    def eig(T: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    eig._curv_shim = True  # type: ignore[attr-defined]
    torch.eig = eig  # type: ignore[attr-defined]


def _clear_grads(p: Problem) -> None:
    for q in p.model.parameters():
        q.grad = None


# -- bare reference ----------------------------------------------------------------------------
def bare_lanczos(p: Problem, steps: int, k: int = 1, probe: Tensor | None = None) -> dict[str, Any]:
    """The floor: ``steps`` Lanczos steps on a cached gradient graph, no library around them.

    One forward and ``create_graph`` backward, then per step one double-backward HVP on flat
    vectors, the three-term coefficients and full re-orthogonalisation (two classical
    Gram-Schmidt passes over the rows of the basis), and one eigendecomposition of the
    tridiagonal matrix at the end. No stopping rule: the caller passes the number of HVPs the
    library row used, so the ratio of the two times is the library's overhead.
    """
    params = [q for q in p.model.parameters() if q.requires_grad]
    sizes = [q.numel() for q in params]
    with torch.enable_grad():
        loss = p.loss_fn(p.model(p.X), p.y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    n = sum(sizes)
    V = torch.empty(steps + 1, n, dtype=params[0].dtype)
    v = probe if probe is not None else torch.randn(n, generator=_gen(), dtype=V.dtype)
    V[0] = v / v.norm()
    alpha, beta = np.zeros(steps), np.zeros(steps)
    for j in range(steps):
        vs = [s.view_as(q) for s, q in zip(torch.split(V[j], sizes), params)]
        hv = torch.autograd.grad(grads, params, vs, retain_graph=True)
        w = torch.cat([h.reshape(-1) for h in hv])
        alpha[j] = float(V[j] @ w)
        B = V[: j + 1]
        w = torch.addmv(w, B.T, B @ w, alpha=-1.0)
        w = torch.addmv(w, B.T, B @ w, alpha=-1.0)
        beta[j] = float(w.norm())
        V[j + 1] = w / beta[j]
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    theta, S = np.linalg.eigh(T)
    top = np.argsort(-theta)[:k]
    vecs = V[:steps].T @ torch.as_tensor(S[:, top], dtype=V.dtype)
    return {
        "values": theta[top].tolist(),
        "vectors": vecs,
        "nodes": theta,
        "weights": S[0] ** 2,
        "nhvp": steps,
    }


# -- curvlab ---------------------------------------------------------------------------------
def _cl_H(p: Problem) -> Any:
    from curvlab.operators import HessianOperator

    return HessianOperator(p.model, p.loss_fn, (p.X, p.y))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cl_eigsh(p: Problem, k: int) -> dict[str, Any]:
    from curvlab.estimators import eigsh

    r = eigsh(_cl_H(p), k=k, which="LA", generator=_gen())
    return {
        "values": r.values.tolist(),
        "vectors": r.vectors,
        "nhvp": r.num_matvecs,
        "residual_reported": float((r.residuals / r.values.abs()).max()),
    }


def cl_power(p: Problem, k: int) -> dict[str, Any]:
    from curvlab.estimators import power_iteration

    r = power_iteration(_cl_H(p), k=k, generator=_gen())
    return {"values": r.values.tolist(), "vectors": r.vectors, "nhvp": r.num_matvecs}


def cl_trace(p: Problem, m: int, method: str, rtol: float | None = None) -> dict[str, Any]:
    from curvlab.estimators import trace

    r = trace(_cl_H(p), m, method=method, blocks="module", rtol=rtol, generator=_gen())
    return {
        "trace": float(r.value),
        "se": float(r.std_error),
        "blocks": {b: float(e.value) for b, e in r.blocks.items()},
        "nhvp": r.num_matvecs,
    }


def cl_exact_ggn_trace(p: Problem) -> dict[str, Any]:
    """Exact GGN diagonal; for piecewise-linear (ReLU) nets it is the Hessian diagonal."""
    from curvlab.estimators import trace
    from curvlab.operators import GGNOperator

    G = GGNOperator(p.model, p.loss_fn, (p.X, p.y))
    r = trace(G, method="exact", blocks="module")
    return {
        "trace": float(r.value),
        "se": 0.0,
        "blocks": {b: float(e.value) for b, e in r.blocks.items()},
        "nhvp": 0,
    }


def cl_density(p: Problem, steps: int) -> dict[str, Any]:
    from curvlab.estimators import spectral_density

    r = spectral_density(_cl_H(p), num_probes=1, lanczos_steps=steps, generator=_gen())
    return {
        "nodes": r.nodes.reshape(-1).numpy(),
        "weights": r.weights.reshape(-1).numpy(),
        "nhvp": r.num_matvecs,
    }


# -- PyHessian -------------------------------------------------------------------------------
def _ph(p: Problem) -> Any:
    from pyhessian import hessian

    _install_counters("pyhessian")
    _clear_grads(p)
    return hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=False)


def _ph_vec(vs: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in vs]).detach()


def ph_eig(p: Problem, k: int) -> dict[str, Any]:
    torch.manual_seed(0)
    COUNTER.n = 0
    H = _ph(p)
    vals, vecs = H.eigenvalues(top_n=k)
    _clear_grads(p)
    return {
        "values": list(vals),
        "vectors": torch.stack([_ph_vec(v) for v in vecs], 1),
        "nhvp": COUNTER.n,
    }


def ph_trace(p: Problem, m: int) -> dict[str, Any]:
    torch.manual_seed(0)
    COUNTER.n = 0
    H = _ph(p)
    s = H.trace(maxIter=m, tol=0.0)
    _clear_grads(p)
    return {
        "trace": float(np.mean(s)),
        "se": float(np.std(s, ddof=1) / np.sqrt(len(s))),
        "nhvp": COUNTER.n,
    }


def ph_density(p: Problem, steps: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    COUNTER.n = 0
    H = _ph(p)
    nodes, weights = H.density(iter=steps, n_v=1)
    _clear_grads(p)
    return {"nodes": np.asarray(nodes[0]), "weights": np.asarray(weights[0]), "nhvp": COUNTER.n}


# -- curvlinops ------------------------------------------------------------------------------
def _clo(p: Problem, params: list[Tensor] | None = None, cls: str = "HessianLinearOperator") -> Any:
    import curvlinops

    _install_counters("curvlinops")
    ps = params if params is not None else [q for q in p.model.parameters() if q.requires_grad]
    return getattr(curvlinops, cls)(p.model, p.loss_fn, ps, [(p.X, p.y)])


def clo_eigsh(p: Problem, k: int) -> dict[str, Any]:
    from scipy.sparse.linalg import eigsh

    COUNTER.n = 0
    H = _clo(p)
    vals, vecs = eigsh(H.to_scipy(), k=k, which="LA")
    order = np.argsort(-vals)
    return {
        "values": vals[order].tolist(),
        "vectors": torch.from_numpy(vecs[:, order]),
        "nhvp": COUNTER.n,
    }


def clo_trace(p: Problem, m: int, method: str) -> dict[str, Any]:
    from curvlinops import hutchinson_trace, hutchpp_trace

    torch.manual_seed(0)
    COUNTER.n = 0
    H = _clo(p)
    fn = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    return {"trace": float(fn(H, m)), "se": float("nan"), "nhvp": COUNTER.n}


def clo_layers(p: Problem, m: int) -> dict[str, Any]:
    from curvlinops import hutchinson_trace

    torch.manual_seed(0)
    COUNTER.n = 0
    named = dict(p.model.named_parameters())
    blocks = {}
    for layer, names in p.layers.items():
        H = _clo(p, [named[n] for n in names])
        blocks[layer] = float(hutchinson_trace(H, m))
    return {"trace": sum(blocks.values()), "blocks": blocks, "se": float("nan"), "nhvp": COUNTER.n}


def clo_density(p: Problem, steps: int, seed: int = 0) -> dict[str, Any]:
    from curvlinops import lanczos_approximate_spectrum

    torch.manual_seed(seed)
    COUNTER.n = 0
    H = _clo(p)
    grid, dens = lanczos_approximate_spectrum(H, ncv=steps)
    return {"grid": grid.double().numpy(), "density": dens.double().numpy(), "nhvp": COUNTER.n}


# -- hessian-eigenthings ---------------------------------------------------------------------
def _et(p: Problem, param_filter: Any = None) -> Any:
    from hessian_eigenthings import HessianOperator, supervised_loss

    _install_counters("eigenthings")
    return HessianOperator(
        p.model, [(p.X, p.y)], supervised_loss(p.loss_fn), param_filter=param_filter
    )


def et_lanczos(p: Problem, k: int, max_iter: int | None = None) -> dict[str, Any]:
    from hessian_eigenthings import lanczos

    COUNTER.n = 0
    r = lanczos(_et(p), k=k, max_iter=max_iter, seed=0)
    return {"values": r.eigenvalues.tolist(), "vectors": r.eigenvectors.T, "nhvp": COUNTER.n}


def et_power(p: Problem, k: int) -> dict[str, Any]:
    from hessian_eigenthings import deflated_power_iteration

    COUNTER.n = 0
    r = deflated_power_iteration(_et(p), k=k, seed=0)
    return {"values": r.eigenvalues.tolist(), "vectors": r.eigenvectors.T, "nhvp": COUNTER.n}


def et_trace(p: Problem, m: int, method: str) -> dict[str, Any]:
    from hessian_eigenthings import hutch_plus_plus, hutchinson

    COUNTER.n = 0
    H = _et(p)
    if method == "hutchinson":
        r = hutchinson(H, num_samples=m, seed=0)
    else:
        r = hutch_plus_plus(H, num_matvecs=m, seed=0)
    return {"trace": float(r.estimate), "se": float(r.stderr), "nhvp": COUNTER.n}


def et_layers(p: Problem, m: int) -> dict[str, Any]:
    from hessian_eigenthings import hutchinson, match_names

    COUNTER.n = 0
    blocks = {}
    for layer, names in p.layers.items():
        r = hutchinson(_et(p, match_names(*names)), num_samples=m, seed=0)
        blocks[layer] = float(r.estimate)
    return {"trace": sum(blocks.values()), "blocks": blocks, "se": float("nan"), "nhvp": COUNTER.n}


def et_density(p: Problem, steps: int) -> dict[str, Any]:
    from hessian_eigenthings import spectral_density

    COUNTER.n = 0
    r = spectral_density(_et(p), num_runs=1, lanczos_steps=steps, seed=0)
    w = r.raw_weights.reshape(-1).double().numpy()
    x = r.raw_eigenvalues.reshape(-1).double().numpy()
    keep = np.isfinite(x)
    return {"nodes": x[keep], "weights": w[keep], "nhvp": COUNTER.n}


# -- the task table --------------------------------------------------------------------------
Row = tuple[str, str, Callable[[Problem], dict[str, Any]]]


def _curvlab_hvps(p: Problem, k: int) -> int:
    """The number of HVPs curvlab's ``eigsh(k)`` takes here (the bare row runs as many)."""
    return int(cl_eigsh(p, k)["nhvp"])


def rows_for(task: str, p: Problem, m: int, steps: int) -> list[Row]:
    """``(peer, label, fn)`` rows of one task (peers filtered by the caller).

    The ``bare`` rows are the floor (:func:`bare_lanczos`) with the HVP count of curvlab's row.
    """
    if task in ("top1", "top5"):
        k = 1 if task == "top1" else 5
        nk = _curvlab_hvps(p, k)
        bare: Row = (
            "bare",
            f"cached-graph Lanczos, {nk} steps [= curvlab's #HVP]",
            lambda q: bare_lanczos(q, nk, k),
        )
    if task == "top1":
        return [
            ("curvlab", "eigsh(k=1) [default tol 1e-3]", lambda q: cl_eigsh(q, 1)),
            bare,
            ("curvlab", "power_iteration(k=1) [baseline]", lambda q: cl_power(q, 1)),
            ("pyhessian", "eigenvalues(top_n=1)", lambda q: ph_eig(q, 1)),
            ("curvlinops", "H.to_scipy() + scipy eigsh(k=1,'LA')", lambda q: clo_eigsh(q, 1)),
            ("eigenthings", "lanczos(k=1) [defaults]", lambda q: et_lanczos(q, 1)),
            ("eigenthings", "deflated_power_iteration(k=1)", lambda q: et_power(q, 1)),
        ]
    if task == "top5":
        return [
            ("curvlab", "eigsh(k=5) [default tol 1e-3]", lambda q: cl_eigsh(q, 5)),
            bare,
            ("pyhessian", "eigenvalues(top_n=5)", lambda q: ph_eig(q, 5)),
            ("curvlinops", "H.to_scipy() + scipy eigsh(k=5,'LA')", lambda q: clo_eigsh(q, 5)),
            ("eigenthings", "lanczos(k=5) [defaults]", lambda q: et_lanczos(q, 5)),
            ("eigenthings", "lanczos(k=5, max_iter=40)", lambda q: et_lanczos(q, 5, 40)),
            ("eigenthings", "deflated_power_iteration(k=5)", lambda q: et_power(q, 5)),
        ]
    if task == "trace":
        return [
            (
                "curvlab",
                f"trace(m={m}, hutchinson, blocks='module')",
                lambda q: cl_trace(q, m, "hutchinson"),
            ),
            (
                "curvlab",
                f"trace(m={m}, hutch++, blocks='module')",
                lambda q: cl_trace(q, m, "hutch++"),
            ),
            (
                "curvlab",
                "trace(hutchinson, rtol=0.05, max 400) [s.e. stopping rule]",
                lambda q: cl_trace(q, 400, "hutchinson", rtol=0.05),
            ),
            ("pyhessian", f"trace(maxIter={m}, tol=0)", lambda q: ph_trace(q, m)),
            ("curvlinops", f"hutchinson_trace(m={m})", lambda q: clo_trace(q, m, "hutchinson")),
            ("curvlinops", f"hutchpp_trace(m={m})", lambda q: clo_trace(q, m, "hutch++")),
            ("eigenthings", f"hutchinson(m={m})", lambda q: et_trace(q, m, "hutchinson")),
            ("eigenthings", f"hutch_plus_plus(m={m})", lambda q: et_trace(q, m, "hutch++")),
        ]
    if task == "layers":
        return [
            (
                "curvlab",
                f"trace(m={m}, hutchinson, blocks='module') [one probe set]",
                lambda q: cl_trace(q, m, "hutchinson"),
            ),
            (
                "curvlab",
                "trace(GGN, method='exact') [= Hessian iff piecewise-linear]",
                cl_exact_ggn_trace,
            ),
            (
                "curvlinops",
                f"1 operator per layer + hutchinson_trace(m={m})",
                lambda q: clo_layers(q, m),
            ),
            (
                "eigenthings",
                f"param_filter per layer + hutchinson(m={m})",
                lambda q: et_layers(q, m),
            ),
        ]
    if task == "density":
        return [
            (
                "curvlab",
                f"spectral_density(1 probe, {steps} steps)",
                lambda q: cl_density(q, steps),
            ),
            ("bare", f"cached-graph Lanczos, {steps} steps", lambda q: bare_lanczos(q, steps)),
            (
                "pyhessian",
                f"density(iter={steps}, n_v=1) [torch.eig shim]",
                lambda q: ph_density(q, steps),
            ),
            (
                "curvlinops",
                f"lanczos_approximate_spectrum(ncv={steps})",
                lambda q: clo_density(q, steps),
            ),
            (
                "eigenthings",
                f"spectral_density(num_runs=1, lanczos_steps={steps})",
                lambda q: et_density(q, steps),
            ),
        ]
    raise ValueError(task)


def product_ops(p: Problem, peer: str, kind: str) -> Callable[[Tensor], Tensor] | None:
    """A ``v -> A v`` closure of a built operator (GGN / EF / Hessian), or None if unsupported."""
    if peer == "curvlab":
        from curvlab.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

        cls = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}[kind]
        op = cls(p.model, p.loss_fn, (p.X, p.y))
        return lambda v: op @ v
    if peer == "curvlinops":
        cls_name = {
            "hessian": "HessianLinearOperator",
            "ggn": "GGNLinearOperator",
            "ef": "EFLinearOperator",
        }[kind]
        op = _clo(p, cls=cls_name)
        return lambda v: op @ v
    if peer == "eigenthings":
        import hessian_eigenthings as he

        _install_counters("eigenthings")
        data = [(p.X, p.y)]
        if kind == "hessian":
            op = _et(p)
        elif kind == "ggn":
            op = he.GGNOperator(
                p.model, data, he.supervised_forward, he.supervised_loss_of_output(p.loss_fn)
            )
        else:
            op = he.EmpiricalFisherOperator(p.model, data, he.supervised_per_sample_loss(p.loss_fn))
        return lambda v: op.matvec(v)
    if peer == "pyhessian" and kind == "hessian":
        import pyhessian.utils as pu

        H = _ph(p)

        def mv(v: Tensor) -> Tensor:
            vs = [
                s.view_as(q)
                for s, q in zip(torch.split(v, [q.numel() for q in H.params]), H.params)
            ]
            return _ph_vec(pu.hessian_vector_product(H.gradsH, H.params, vs))

        return mv
    return None
