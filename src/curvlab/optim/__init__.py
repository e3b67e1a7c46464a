"""curvlab.optim."""
