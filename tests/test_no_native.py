"""With peftcore._C unloadable (PEFTCORE_DISABLE_C=1) peftcore still imports, warns
once, and every op runs through the pure-PyTorch reference. Run in a subprocess so
the dispatcher registrations of this process are untouched."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    import peftcore, importlib
    importlib.import_module("peftcore")  # a second import must not warn again
    import torch
    from peftcore import reference
    assert not peftcore.native_available("lora_linear", "cpu")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    A, B, s = [torch.randn(2, 8)], [torch.randn(5, 2)], torch.tensor([0.5])
    for _ in range(2):
        y = torch.ops.peftcore.lora_linear(x, w, None, A, B, None, s, None)
    assert torch.equal(y, reference.lora_linear(x, w, None, A, B, None, s, None))
    out = torch.empty(3, 5)
    torch.ops.peftcore.lora_linear(x, w, None, A, B, None, s, None, out=out)  # the .out overload's fallback
    assert torch.equal(out, y)
    try:
        torch.ops.peftcore.lora_linear(x, w, None, A, B, None, s, None, out=torch.empty(3, 6))
        raise AssertionError("a mis-shaped out was accepted")
    except RuntimeError as e:
        assert "out has shape [3, 6] but the result has shape [3, 5]" in str(e), e
    idx, W = torch.tensor([1, 2]), torch.randn(4, 3)
    e = torch.ops.peftcore.lora_embedding(idx, W, [torch.randn(2, 4)], [torch.randn(3, 2)], s, -1)
    assert e.shape == (2, 3)
    l, on = [torch.rand(5, 1) + 0.5], torch.ones(1)
    assert torch.equal(torch.ops.peftcore.ia3_linear(x, w, None, l, on, False),
                       reference.ia3_linear(x, w, None, l, on, False))
    E = [torch.randn(2, 1)]
    assert torch.equal(torch.ops.peftcore.lora_linear(x, w, None, A, B, E, s, None),
                       reference.lora_linear(x, w, None, A, B, E, s, None))
    print("REFERENCE-OK")
    """
)


def test_import_without_native_extension_warns_once_and_runs_reference():
    env = dict(os.environ, PEFTCORE_DISABLE_C="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "REFERENCE-OK" in p.stdout
    assert p.stderr.count("peftcore._C could not be loaded") == 1, p.stderr
    # the fallback kernel warns once per (op, device), however often it runs
    assert p.stderr.count("peftcore::lora_linear has no native kernel for device 'cpu'") == 1, p.stderr
    assert p.stderr.count("peftcore::lora_embedding has no native kernel for device 'cpu'") == 1, p.stderr
