"""Every op the dispatcher knows under ``peftcore::`` has samples in tests/op_db.py
and (when the extension is built) a native CPU kernel, so no op can be added without
tests or silently fall back to the reference."""
from __future__ import annotations

import pytest
import torch

import peftcore
from tests.op_db import OPS, native_loaded


def _peftcore_ops():
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("peftcore::")}
    assert names, "no peftcore:: op registered"
    return sorted(names)


@pytest.mark.parametrize("op", _peftcore_ops())
def test_op_has_samples(op):
    assert op in OPS, f"peftcore::{op} has no entry in tests/op_db.py"
    info = OPS[op]
    assert any(True for _ in info.sample_inputs(torch.float32, torch.float32, False))


@pytest.mark.skipif(not native_loaded(), reason="peftcore._C not loaded (PEFTCORE_DISABLE_C or not built)")
@pytest.mark.parametrize("op", _peftcore_ops())
def test_op_has_native_cpu_kernel(op):
    assert peftcore.native_available(op, "cpu"), peftcore.show_config()


def test_op_db_has_no_stale_entries():
    assert set(OPS) <= set(_peftcore_ops())
