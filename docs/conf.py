"""Sphinx configuration for the curvlab documentation site.

Sphinx rather than MkDocs: curvlab's docstrings are reStructuredText with Google-style sections
(``Args:``, ``Returns:``, ``Raises:``) and ``.. math::`` algorithm boxes; autodoc with napoleon
renders them as written, and MyST lets the guide pages be Markdown. ``make docs`` builds with
``-W`` so a warning fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

project = "curvlab"
author = "the curvlab developers"
copyright = "2026, the curvlab developers"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
nitpicky = False
suppress_warnings = ["myst.xref_missing"]


html_theme = "furo"
html_title = "curvlab"
