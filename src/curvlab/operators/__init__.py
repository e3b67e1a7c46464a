"""Curvature operators: the Hessian, GGN and Fisher of a model's loss, known through products."""

__all__: list[str] = []
