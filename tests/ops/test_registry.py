"""Every op the dispatcher knows under ``peftcore::`` is in peftcore's op table
(``peftcore._ops.OPS``), has samples in tests/op_db.py and (when the extension is built) a
native CPU kernel, so no op can be added without tests or silently fall back to the
reference; the reference and the typed wrapper of each op take the table's arguments."""
from __future__ import annotations

import pytest
import torch

import inspect

import peftcore
from peftcore import ops, reference
from peftcore._ops import OPS as OP_TABLE
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


def test_dispatcher_ops_are_the_table():
    assert set(_peftcore_ops()) == set(OP_TABLE)
    for name, d in OP_TABLE.items():
        schema = str(torch._C._get_schema(f"peftcore::{name}", ""))
        assert schema.startswith(f"peftcore::{name}(") and d.arg_names == [
            a.name for a in torch._C._get_schema(f"peftcore::{name}", "").arguments
        ], (schema, d.schema)


@pytest.mark.parametrize("op", sorted(OP_TABLE))
def test_reference_takes_the_table_arguments(op):
    assert list(inspect.signature(getattr(reference, op)).parameters) == OP_TABLE[op].arg_names


@pytest.mark.parametrize("op", sorted(n for n in OP_TABLE if hasattr(ops, n)))
def test_typed_wrapper_takes_the_table_arguments(op):
    # The wrappers order their arguments for callers (defaults last, lora_E by keyword),
    # but take exactly the schema's arguments, plus out= on the forward ops.
    params = set(inspect.signature(getattr(ops, op)).parameters)
    assert params == set(OP_TABLE[op].arg_names) | ({"out"} if OP_TABLE[op].forward else set())
