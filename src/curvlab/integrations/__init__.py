"""curvlab inside the loops its users train with: Lightning, the Hugging Face Trainer, accelerate.

One line of set-up per loop; the callbacks adapt curvlab to the framework and hold no logic of
their own:

* Lightning: ``Trainer(callbacks=[curvlab.integrations.lightning.CurvatureCallback()])`` trains
  ``Sophia`` / ``AdaHessian`` in automatic optimization;
  :class:`curvlab.integrations.lightning.MonitorCallback` logs monitors through ``pl_module.log``.
* Hugging Face: ``Trainer(callbacks=[curvlab.integrations.transformers.CurvatureCallback()])``;
  :class:`curvlab.integrations.transformers.MonitorCallback` reports monitors through the
  Trainer's reporters.
* accelerate, or any loop that calls ``backward()`` and ``step()`` itself:
  :func:`attach_curvature` ``(model, optimizer)``.

``curvlab.integrations.lightning`` and ``curvlab.integrations.transformers`` import their framework;
this package imports none.
"""

from curvlab.integrations._feed import CurvatureHandle, attach_curvature

__all__ = ["CurvatureHandle", "attach_curvature"]
