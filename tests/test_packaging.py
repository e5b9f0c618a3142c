"""The package list a non-editable install (``pip install .``) takes: every package under
peftcore/ must be in pyproject.toml's [tool.setuptools] packages, or the installed
peftcore fails to import (the editable install the suite runs from would not notice)."""
from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "peftcore"))
        if "__init__.py" in files
    }
    assert found == listed, f"pyproject.toml packages {sorted(listed)} but the tree has {sorted(found)}"
