"""Rules for the whole suite.

* **A missing test dependency fails the run** instead of shrinking it: PEFT (the format and
  output oracle), transformers, accelerate, bitsandbytes (its quantizer makes the quantized
  samples, its dequantizer is their oracle) and safetensors must import, bitsandbytes with
  its native library. `make test` installs them (pyproject's `test` extra).
* **The native extension must load.** A build whose ``peftcore._C`` fails to load (an
  undefined symbol, a stale binary) would otherwise pass: every op falls back to the
  reference it is compared with, and the native-only tests skip. Unless the run asks for
  the fallback (``PEFTCORE_DISABLE_C=1``), that stops the run with the loader's message.
* **A fresh torch.compile cache per run.** Inductor's on-disk cache (/tmp by default)
  outlives the run and is not keyed on a custom op's schema: after a peftcore schema
  change it replays code that calls the op with the old arguments. The suite compiles
  into its own temporary folder.
* **`cuda` tests are reported as one line.** Without a GPU, or in a build without CUDA
  kernels, the items marked `cuda` are deselected at collection and the summary says how
  many (instead of one skip per item). With a GPU they run like any other test.
"""
from __future__ import annotations

import importlib
import os
import tempfile

import pytest

_INDUCTOR_DIR = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_DIR = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftcore-tests-inductor-")

TEST_DEPENDENCIES = ("peft", "transformers", "accelerate", "bitsandbytes", "safetensors")
_cuda_deselected: list = []


def pytest_configure(config):
    missing = []
    for name in TEST_DEPENDENCIES:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken native library
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if not missing:
        try:
            from tests.op_db import bnb_functional

            bnb_functional()
        except Exception as e:
            missing.append(f"bitsandbytes.functional ({type(e).__name__}: {e})")
    if missing:
        raise pytest.UsageError(
            "test dependencies missing (install them: `make test`, or pip install -e '.[test]'): " + "; ".join(missing)
        )
    if os.environ.get("PEFTCORE_DISABLE_C", "") in ("", "0"):
        from peftcore import native

        if native._C_ERROR is not None:
            raise pytest.UsageError(f"peftcore._C failed to load ({native._C_ERROR}): rebuild it (`make build`), "
                                    "or set PEFTCORE_DISABLE_C=1 to test the reference fallback on purpose")


def pytest_unconfigure(config):
    if _INDUCTOR_DIR is not None:
        import shutil

        shutil.rmtree(_INDUCTOR_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    from tests.helpers import has_cuda_kernels

    if has_cuda_kernels():
        return
    keep = []
    for item in items:
        (_cuda_deselected if item.get_closest_marker("cuda") else keep).append(item)
    if _cuda_deselected:
        config.hook.pytest_deselected(items=_cuda_deselected)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    if _cuda_deselected:
        files = len({item.path for item in _cuda_deselected})
        terminalreporter.write_line(
            f"cuda: {len(_cuda_deselected)} tests in {files} files not run (no GPU, or no CUDA kernels in this build)"
        )
