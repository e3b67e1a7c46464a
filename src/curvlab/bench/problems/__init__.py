"""curvlab.bench.problems."""
