"""curvlab.bench."""
