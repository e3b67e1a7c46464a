"""Estimators: numbers computed from a curvature operator (or a dense symmetric tensor)."""

from curvlab.estimators.probes import gaussian, rademacher, rademacher_like, sample_probes

__all__ = ["gaussian", "rademacher", "rademacher_like", "sample_probes"]
