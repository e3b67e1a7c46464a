"""curvlab.monitors."""
