"""The Fisher information (sampled labels) and the empirical Fisher, as matrix-free operators."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvlab.operators._checks import check_positive_int
from curvlab.operators.curvature import OperatorOptions
from curvlab.operators.ggn import OutputSpaceOperator, _OutputLinearisation

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EmpiricalFisherOperator", "FisherOperator"]


def _per_sample_outer(S: Tensor, jv: Tensor) -> Tensor:
    """``Σ_m s_m ⟨s_m, jv⟩_n`` with the inner product over each sample's output elements.

    ``S``: ``[M, N, ...]`` output gradients, ``jv``: ``[N, ...]``; returns ``[N, ...]``.
    """
    dims = tuple(range(2, S.ndim))
    coef = (S * jv.unsqueeze(0)).sum(dim=dims, keepdim=True) if dims else S * jv.unsqueeze(0)
    return (coef * S).sum(dim=0)


class FisherOperator(OutputSpaceOperator):
    r"""The Fisher information with labels sampled from the model (Monte-Carlo "true" Fisher).

    .. math::

        F = \kappa \sum_b \sum_{n \in b} J_n^\top \Big(\frac1M \sum_{m=1}^M s_{nm} s_{nm}^\top\Big) J_n,
        \qquad s_{nm} = \nabla_{o_n} \ell(o_n, \hat y_{nm}),\ \hat y_{nm} \sim p(y \mid o_n)

    where ``p`` is the predictive distribution the loss is the negative log-likelihood of
    (categorical for cross-entropy, Bernoulli for BCE-with-logits, Gaussian N(o, ½) for MSE, for
    which :math:`(o-y)^2 = -\log p + \text{const}`), ``J_n`` the Jacobian of sample ``n``'s outputs
    and ``κ`` as in :class:`GGNOperator`. A cross-entropy target of weight ``c`` (0 at
    ``ignore_index``, else its class weight) scales its samples by ``√c``, so ignored targets
    draw nothing. Its expectation over the labels is the GGN; with
    ``mc_samples → ∞`` it converges to it at rate ``1/√M``. The labels are drawn once, when the
    operator is built (from ``generator``), so ``F`` is a fixed PSD matrix. No per-sample gradient
    is formed: a product costs one Jacobian-vector and one vector-Jacobian product per batch.

    The other arguments are as for :class:`~curvlab.operators.HessianOperator`.

    Args:
        mc_samples: ``M``, labels drawn per example.
        generator: source of the sampled labels.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Iterable[Tensor | str] | None = None,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        **options: Unpack[OperatorOptions],
    ) -> None:
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        seed_gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self._seed = int(torch.randint(0, 2**62, (1,), generator=seed_gen, device=seed_gen.device))
        self._batch_counter = 0
        super().__init__(model, loss_fn, data, params, **options)

    def _block_kwargs(self) -> dict[str, Any]:
        kw = super()._block_kwargs()
        kw["mc_samples"] = self.mc_samples
        kw["generator"] = torch.Generator().manual_seed(self._seed)
        return kw

    def _linearisations(self) -> Iterator[Any]:
        self._batch_counter = 0  # batch b always draws its labels from seed + b
        yield from super()._linearisations()

    def _batch_extra(self, lin: _OutputLinearisation, targets: Tensor) -> Tensor:
        outputs = lin.outputs.detach()
        gen = torch.Generator(device=outputs.device).manual_seed(self._seed + self._batch_counter)
        self._batch_counter += 1
        return self.curvature.sample_output_grads(outputs, self.mc_samples, gen, lin.weights)

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        return (self._kappa / self.mc_samples) * _per_sample_outer(lin.extra, jv)


class EmpiricalFisherOperator(OutputSpaceOperator):
    r"""The empirical Fisher: outer products of per-sample gradients at the true labels.

    .. math::

        \tilde F = \kappa \sum_b \sum_{n \in b} g_n g_n^\top, \qquad
        g_n = J_n^\top \nabla_{o_n} \ell(o_n, y_n)

    (``κ`` as in :class:`GGNOperator`: ``1/N`` for a mean cross-entropy over ``N`` examples), with
    ``g_n`` the gradient of example ``n``'s loss as the loss weights it: targets at
    ``ignore_index`` contribute nothing, a class weight ``c`` scales the example's gradient. It is
    *not* the Fisher or the GGN in general (Kunstner et al. 2019, arXiv 1905.12558). Products use
    ``J`` and ``Jᵀ`` on cached graphs; no ``N × P`` per-sample gradient matrix is formed.
    """

    def _batch_extra(self, lin: _OutputLinearisation, targets: Tensor) -> Tensor:
        return self.curvature.output_grad(lin.outputs.detach(), targets, lin.weights).unsqueeze(0)

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        return self._kappa * _per_sample_outer(lin.extra, jv)
