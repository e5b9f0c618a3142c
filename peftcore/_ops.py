"""Schemas of the ``peftcore::`` ops, with their fake kernels, autograd and the
``default`` kernel (``reference.py``), which serves any device without a native one.

``peftcore._C`` must be imported before this module (see ``__init__``): then a C++
kernel whose signature disagrees with a schema here raises an ordinary error
instead of aborting the interpreter.
"""
from __future__ import annotations

import warnings

import torch

from . import reference

lib = torch.library.Library("peftcore", "DEF")

# Schemas carry no default values on purpose: the dispatcher drops arguments equal
# to their defaults, which would change the structure autograd expects back.
# ops.py gives the Python-side defaults.

# name: schema (arguments and returns)
SCHEMAS = {
    "lora_linear": (
        "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_A, Tensor[] lora_B, "
        "Tensor scales, Tensor[]? lora_x) -> Tensor"
    ),
    "lora_linear_backward": (
        "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor[] lora_A, Tensor[] lora_B, "
        "Tensor scales, Tensor[]? lora_x, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor[])"
    ),
    "lora_embedding": (
        "lora_embedding(Tensor indices, Tensor weight, Tensor[] lora_A, Tensor[] lora_B, Tensor scales, "
        "int padding_idx) -> Tensor"
    ),
    "lora_embedding_backward": (
        "lora_embedding_backward(Tensor grad_out, Tensor indices, Tensor weight, Tensor[] lora_A, "
        "Tensor[] lora_B, Tensor scales, int padding_idx, bool[2] output_mask) -> (Tensor, Tensor[], Tensor[])"
    ),
}
for _schema in SCHEMAS.values():
    lib.define(_schema)

_warned: set[str] = set()


def _fallback(name, fn):
    """Wrap a reference function as the CompositeExplicitAutograd kernel: it runs
    wherever no native kernel is registered, warning once per (op, device)."""

    def kernel(*args):
        dev = args[0].device.type
        key = f"{name}:{dev}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"peftcore::{name} has no native kernel for device '{dev}' in this build; "
                "running the pure-PyTorch reference (slower).",
                stacklevel=3,
            )
        return fn(*args)

    return kernel


lib.impl("lora_linear", _fallback("lora_linear", reference.lora_linear), "CompositeExplicitAutograd")
lib.impl(
    "lora_linear_backward",
    _fallback("lora_linear_backward", reference.lora_linear_backward),
    "CompositeExplicitAutograd",
)
lib.impl("lora_embedding", _fallback("lora_embedding", reference.lora_embedding), "CompositeExplicitAutograd")
lib.impl(
    "lora_embedding_backward",
    _fallback("lora_embedding_backward", reference.lora_embedding_backward),
    "CompositeExplicitAutograd",
)


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("peftcore::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scales, lora_x):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("peftcore::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, scales, lora_x, output_mask):
    # Every gradient is a fresh contiguous tensor, whatever the strides of its input
    # (x may be a transposed view, weight is one for Conv1D).
    want_x, want_w, want_b, want_ad = output_mask
    gx = x.new_empty(x.shape) if want_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if want_w else x.new_empty(0)
    gb = grad_out.new_empty(weight.shape[0]) if want_b else x.new_empty(0)
    gA = [A.new_empty(A.shape) for A in lora_A] if want_ad else []
    gB = [B.new_empty(B.shape) for B in lora_B] if want_ad else []
    gxa = [t.new_empty(t.shape) for t in lora_x] if lora_x is not None else []
    return gx, gw, gb, gA, gB, gxa


@torch.library.register_fake("peftcore::lora_embedding")
def _lora_embedding_fake(indices, weight, lora_A, lora_B, scales, padding_idx):
    return weight.new_empty((*indices.shape, weight.shape[1]))


@torch.library.register_fake("peftcore::lora_embedding_backward")
def _lora_embedding_backward_fake(grad_out, indices, weight, lora_A, lora_B, scales, padding_idx, output_mask):
    want_w, want_ad = output_mask
    gw = weight.new_empty(weight.shape) if want_w else weight.new_empty(0)
    gA = [A.new_empty(A.shape) for A in lora_A] if want_ad else []
    gB = [B.new_empty(B.shape) for B in lora_B] if want_ad else []
    return gw, gA, gB


# -------------------------------------------------------------------- autograd
def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scales, lora_x = inputs
    ctx.want = (
        x.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        any(t.requires_grad for t in (*lora_A, *lora_B)),
    )
    ctx.n_adapters = len(lora_A)
    ctx.has_lora_x = lora_x is not None
    ctx.save_for_backward(x, weight, scales, *lora_A, *lora_B, *(lora_x or ()))


def _lora_linear_backward(ctx, grad):
    n = ctx.n_adapters
    x, weight, scales, *rest = ctx.saved_tensors
    lora_A, lora_B, lora_x = rest[:n], rest[n : 2 * n], (rest[2 * n :] if ctx.has_lora_x else None)
    want_x, want_w, want_b, want_ad = ctx.want
    gx, gw, gb, gA, gB, gxa = torch.ops.peftcore.lora_linear_backward(
        grad.contiguous(), x, weight, lora_A, lora_B, scales, lora_x, [want_x, want_w, want_b, want_ad]
    )
    return (
        gx if want_x else None,
        gw if want_w else None,
        gb if want_b else None,
        # A Tensor[] input needs a list of the same length back (None entries allowed).
        list(gA) if want_ad else [None] * n,
        list(gB) if want_ad else [None] * n,
        None,
        list(gxa) if ctx.has_lora_x else None,
    )


torch.library.register_autograd("peftcore::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup)


def _lora_embedding_setup(ctx, inputs, output):
    indices, weight, lora_A, lora_B, scales, padding_idx = inputs
    ctx.want = (weight.requires_grad, any(t.requires_grad for t in (*lora_A, *lora_B)))
    ctx.n_adapters = len(lora_A)
    ctx.padding_idx = padding_idx
    ctx.save_for_backward(indices, weight, scales, *lora_A, *lora_B)


def _lora_embedding_backward(ctx, grad):
    n = ctx.n_adapters
    indices, weight, scales, *rest = ctx.saved_tensors
    want_w, want_ad = ctx.want
    gw, gA, gB = torch.ops.peftcore.lora_embedding_backward(
        grad.contiguous(), indices, weight, rest[:n], rest[n:], scales, ctx.padding_idx, [want_w, want_ad]
    )
    return (
        None,
        gw if want_w else None,
        list(gA) if want_ad else [None] * n,
        list(gB) if want_ad else [None] * n,
        None,
        None,
    )


torch.library.register_autograd(
    "peftcore::lora_embedding", _lora_embedding_backward, setup_context=_lora_embedding_setup
)
