"""Neural-collapse metrics NC1–NC4 of penultimate features (Papyan, Han & Donoho 2020).

With features h_i (N × D), labels y_i ∈ {0..C−1}, class counts n_c, class means μ_c, the centre
μ_G = (1/C) Σ_c μ_c (mean of the class means: equals the global mean for balanced classes and keeps
the geometry independent of class frequencies otherwise), M = [μ_c − μ_G]_c (D × C), classifier W (C × D)
and bias b:

    NC1  = Tr(Σ_W Σ_B⁺) / C,   Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ,
                               Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ   (pseudo-inverse: rank C − 1)
    NC2  equinorm   = std_c ‖μ_c − μ_G‖ / mean_c ‖μ_c − μ_G‖          (also for the rows of W)
         equiangular = mean_{c≠c'} |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C−1)|   (0 for a simplex ETF)
         orthogonal  = mean_{c≠c'} |cos(μ_c, μ_c')|  (0 for the orthogonal frame that bias-free deep
                       linear networks reach on imbalanced data, Dang et al. 2023)
    NC3  = ‖ W/‖W‖_F − Mᵀ/‖M‖_F ‖_F                                      (self-duality)
    NC4  = fraction of i with argmax_c (W h_i + b)_c = argmin_c ‖h_i − μ_c‖  (nearest class centre)

Faithful to the definitions in ``felixsh/nc-toolbox`` ``nc_toolbox/metrics.py`` (NC1 with pinv of
Σ_B, NC3 with Frobenius normalisation); NC4 uses argmax of the logits *with* the bias (an older
toolbox version took argmin of H·Wᵀ — a sign error). Class sums are accumulated in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from curvlab.errors import ArgumentTypeError, EmptyDataError, ParameterError, ShapeMismatchError
from curvlab.monitors._attach import Monitor, check_params_in_optimizer

__all__ = ["NCMetrics", "NeuralCollapse", "neural_collapse_metrics"]


@dataclass(frozen=True)
class NCMetrics:
    """NC1–NC4 (see the module docstring); 0 is perfect collapse except ``nc4`` (1 is perfect)."""

    nc1: float
    nc1_trace_ratio: float
    nc2_equinorm: float
    nc2_equiangular: float
    nc2_orthogonal: float
    nc2_equinorm_w: float
    nc2_equiangular_w: float
    nc3: float
    nc4: float

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain ``dict`` of floats."""
        return asdict(self)


def _cos_matrix(rows: Tensor) -> Tensor:
    normed = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    return normed @ normed.T


def _off_diagonal(matrix: Tensor) -> Tensor:
    c = matrix.shape[0]
    return matrix[~torch.eye(c, dtype=torch.bool, device=matrix.device)]


def _equinorm(rows: Tensor) -> float:
    """std/mean of the row norms (0 when every row has the same norm)."""
    norms = rows.norm(dim=1)
    return float(norms.std(unbiased=False) / norms.mean())


def _equiangular(rows: Tensor) -> float:
    """mean over row pairs of |cos + 1/(C−1)| (0 for a simplex ETF of C rows)."""
    return float((_off_diagonal(_cos_matrix(rows)) + 1.0 / (rows.shape[0] - 1)).abs().mean())


def neural_collapse_metrics(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    num_classes: int | None = None,
) -> NCMetrics:
    """Compute NC1–NC4 of features (N × D) with labels and a linear classifier (weight C × D, bias C).

    Computed in float64. Every class in ``range(num_classes)`` must occur.

    Args:
        features: penultimate features, shape [N, D].
        labels: integer labels, shape [N].
        weight: classifier weight, shape [C, D].
        bias: classifier bias, shape [C], or None.
        num_classes: C (default: ``weight.shape[0]``).

    Returns:
        :class:`NCMetrics`.

    Raises:
        ShapeMismatchError: shapes do not fit. EmptyDataError: no example or a class is absent.

    Example:
        >>> import torch
        >>> etf = torch.eye(3) - 1 / 3                      # simplex ETF, class means in rows
        >>> h = etf.repeat_interleave(4, dim=0); y = torch.arange(3).repeat_interleave(4)
        >>> m = neural_collapse_metrics(h, y, etf)
        >>> round(m.nc1, 6), round(m.nc2_equiangular, 6), round(m.nc3, 6), m.nc4
        (0.0, 0.0, 0.0, 1.0)

    Paper: Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
    learning training", PNAS 2020 (arXiv 2008.08186); Dang, Tran, Osher, Tran-The, Ho & Nguyen,
    "Neural collapse in deep linear networks: from balanced to imbalanced data", ICML 2023
    (arXiv 2301.00437).
    """
    if features.ndim != 2:
        raise ShapeMismatchError(
            f"features must be a matrix [N, D] of penultimate features, got shape "
            f"{tuple(features.shape)}; flatten them or pick the layer before the classifier"
        )
    n, d = features.shape
    if n == 0:
        raise EmptyDataError("neural_collapse_metrics got no example; pass a non-empty batch")
    if labels.shape != (n,):
        raise ShapeMismatchError(
            f"labels must have shape [{n}] (one per feature row), got {tuple(labels.shape)}"
        )
    if weight.ndim != 2 or weight.shape[1] != d:
        raise ShapeMismatchError(
            f"the classifier weight must have shape [C, {d}] to act on {d}-dim features, got "
            f"{tuple(weight.shape)}"
        )
    c = int(num_classes) if num_classes is not None else weight.shape[0]
    if weight.shape[0] != c or c < 2:
        raise ShapeMismatchError(f"weight has {weight.shape[0]} rows but num_classes is {c} (>= 2)")
    if bias is not None and bias.shape != (c,):
        raise ShapeMismatchError(f"bias must have shape [{c}], got {tuple(bias.shape)}")
    h = features.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    b = None if bias is None else bias.detach().to(torch.float64)
    y = labels.detach().long()
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ShapeMismatchError(
            f"labels must lie in [0, {c - 1}], got [{int(y.min())}, {int(y.max())}]"
        )

    counts = torch.bincount(y, minlength=c).to(torch.float64)
    if bool((counts == 0).any()):
        absent = torch.nonzero(counts == 0).flatten().tolist()
        raise EmptyDataError(
            f"classes {absent} have no example in the batch; NC metrics need every class — use a "
            "larger or stratified probe batch"
        )
    sums = torch.zeros(c, d, dtype=torch.float64).index_add_(0, y, h)
    means = sums / counts[:, None]  # [C, D]
    centre = means.mean(dim=0)
    m = means - centre  # rows: mu_c - mu_G
    within = h - means[y]
    sigma_w = within.T @ within / n
    sigma_b = m.T @ m / c
    nc1 = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / c)
    nc1_tr = float(torch.trace(sigma_w) / torch.trace(sigma_b))

    nc3 = float((w / w.norm() - m / m.norm()).norm())

    logits = h @ w.T + (b if b is not None else 0.0)
    nearest = torch.cdist(h, means).argmin(dim=1)
    nc4 = float((logits.argmax(dim=1) == nearest).to(torch.float64).mean())
    return NCMetrics(
        nc1=nc1,
        nc1_trace_ratio=nc1_tr,
        nc2_equinorm=_equinorm(m),
        nc2_equiangular=_equiangular(m),
        nc2_orthogonal=float(_off_diagonal(_cos_matrix(means)).abs().mean()),
        nc2_equinorm_w=_equinorm(w),
        nc2_equiangular_w=_equiangular(w - w.mean(dim=0)),
        nc3=nc3,
        nc4=nc4,
    )


class NeuralCollapse(Monitor):
    """Monitor NC1–NC4 of penultimate features on a fixed probe batch.

    Every check runs ``features(inputs)`` (in eval mode, no grad) and evaluates
    :func:`neural_collapse_metrics` with the classifier's weight and bias.

    Args:
        features: a callable mapping a batch of inputs to penultimate features [N, D] (for example
            ``lambda x: model[:-1](x)`` for an ``nn.Sequential``). Required: curvlab does not guess
            which layer is penultimate.
        classifier: the final ``nn.Linear`` (weight [C, D], bias [C] or None).
        data: the probe batch ``(inputs, labels)``; every class must occur.
        model: the model (its train/eval mode is restored after each check; default: none).
        every: check every ``every`` steps.
        name: prefix of the numbers (default ``"nc"``).

    Numbers: ``nc1, nc1_trace_ratio, nc2_equinorm, nc2_equiangular, nc2_orthogonal, nc2_equinorm_w,
    nc2_equiangular_w, nc3, nc4``.

    Raises (at construction or attach):
        ArgumentTypeError: ``features`` is not callable or ``classifier`` is not an ``nn.Linear``.
        ShapeMismatchError: the features of the probe batch are not [N, D] with D = in_features.
        ParameterError: the optimizer does not update the classifier.

    Paper: Papyan, Han & Donoho, PNAS 2020 (arXiv 2008.08186).
    """

    def __init__(
        self,
        features: Callable[[Tensor], Tensor],
        classifier: nn.Linear,
        data: tuple[Tensor, Tensor],
        *,
        model: nn.Module | None = None,
        every: int = 100,
        name: str = "nc",
    ) -> None:
        super().__init__(every=every, name=name)
        if features is None or not callable(features):
            raise ArgumentTypeError(
                "NeuralCollapse needs a feature-extractor callable inputs -> penultimate features "
                "[N, D], e.g. features=lambda x: model[:-1](x) for an nn.Sequential"
            )
        if not isinstance(classifier, nn.Linear):
            raise ArgumentTypeError(
                f"NeuralCollapse needs the final nn.Linear classifier, got {type(classifier).__name__}"
            )
        self.features, self.classifier = features, classifier
        self.data, self.model = data, model

    @property
    def params(self) -> list[Tensor]:
        """The classifier's parameters (the optimizer must update them)."""
        return [p for p in self.classifier.parameters() if p.requires_grad]

    def _features(self) -> Tensor:
        assert self.data is not None
        if self.model is not None:
            self.model.eval()
        with torch.no_grad():
            return self.features(self.data[0])

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the classifier is optimized and the probe batch gives [N, in_features] features."""
        check_params_in_optimizer(self.params, optimizer, self.name)
        data = self.data
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ShapeMismatchError(f"monitor {self.name!r}: data must be a pair (inputs, labels)")
        inputs, labels = data
        was_training = self.model.training if self.model is not None else None
        try:
            feats = self._features()
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ShapeMismatchError(
                f"monitor {self.name!r}: the feature extractor failed on the probe batch of shape "
                f"{tuple(inputs.shape)}: {exc}"
            ) from exc
        finally:
            if self.model is not None and was_training is not None:
                self.model.train(was_training)
        d = self.classifier.in_features
        if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape != (inputs.shape[0], d):
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ShapeMismatchError(
                f"monitor {self.name!r}: the feature extractor must return penultimate features of "
                f"shape [N={inputs.shape[0]}, D={d}] (D = classifier.in_features), got {shape}"
            )
        if labels.shape != (inputs.shape[0],):
            raise ShapeMismatchError(
                f"monitor {self.name!r}: labels must have shape [{inputs.shape[0]}], got "
                f"{tuple(labels.shape)}"
            )
        counts = torch.bincount(labels.long(), minlength=self.classifier.out_features)
        if bool((counts == 0).any()):
            raise EmptyDataError(
                f"monitor {self.name!r}: classes {torch.nonzero(counts == 0).flatten().tolist()} "
                "are absent from the probe batch; NC metrics need every class"
            )
        if not self.params:
            raise ParameterError(
                f"monitor {self.name!r}: the classifier has no trainable parameter"
            )

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """NC1–NC4 on the probe batch."""
        assert self.data is not None
        metrics = neural_collapse_metrics(
            self._features(),
            self.data[1],
            self.classifier.weight,
            self.classifier.bias,
            num_classes=self.classifier.out_features,
        )
        return metrics.as_dict()
