"""Schemas of the ``peftcore::`` ops, with their fake kernels, autograd and the
``default`` kernel (``reference.py``), which serves any device without a native one.

``peftcore._C`` must be imported before this module (see ``__init__``): then a C++
kernel whose signature disagrees with a schema here raises an ordinary error
instead of aborting the interpreter.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import reference

lib = torch.library.Library("peftcore", "DEF")

# ------------------------------------------------------------------ the op table
# Every peftcore:: op is declared here once. The linear family is a product: a method's
# adapter arguments over a base kind's weight arguments, single or mixed; the schemas,
# the reference fallbacks, the fake kernels, the autograd registrations, the tests'
# OpInfos (tests/op_db.py) and CI's CUDA coverage check (.ci/check_cuda_ops.py) all read
# OPS. The C++ entry points mirror it in csrc/ops.h (the dispatcher checks each C++
# signature against its schema when _C loads).
#
# Schemas carry no default values on purpose: the dispatcher drops arguments equal
# to their defaults, which would change the structure autograd expects back.
# ops.py gives the Python-side defaults.

# The arguments that stand for the frozen weight W, between x and bias, per base kind
# (the suffix of the op names): dense W, bitsandbytes' 4-bit weight (formats in
# reference.dequantize_4bit), LLM.int8's CB and SCB.
BASES = {
    "": "Tensor weight",
    "_4bit": ("Tensor qweight, Tensor absmax, Tensor code, int blocksize, Tensor? nested_absmax, "
              "Tensor? nested_code, Tensor? nested_offset, int nested_blocksize, int out_features"),
    "_int8": "Tensor weight, Tensor row_scale",
}
# Per method: (its adapter arguments, then the tail of the single op, of the mixed op).
# The LoRA family's optional per-adapter extras sit with its factors: lora_E (AdaLoRA's
# singular values, r_a per adapter) today, a future one (DoRA's magnitude) beside it.
# Mixed batches (inference only): row group g of x uses adapter slot rows[g] alone, -1 = base.
LORA_EXTRAS = ("lora_E",)
METHODS = {
    "lora": ("Tensor[] lora_A, Tensor[] lora_B, " + "".join(f"Tensor[]? {e}, " for e in LORA_EXTRAS) + "Tensor scales",
             "Tensor[]? lora_x", "Tensor rows"),
    "ia3": ("Tensor[] ia3_l", "Tensor active, bool feedforward", "Tensor rows, bool feedforward"),
}
# The one irregular tail: on a 4-bit base the base product reads x rounded to the compute
# dtype while the LoRA terms read the original x (layers.compute_input_4bit).
MIXED_TAILS = {"lora_linear_4bit_mixed": "Tensor rows, Tensor? lora_x"}


@dataclass(frozen=True)
class OpDef:
    name: str
    args: str  # the schema's arguments
    returns: str = "Tensor"
    method: Optional[str] = None  # the linear family: "lora" / "ia3" (a METHODS key)
    base: Optional[str] = None  # the linear family: a BASES key
    mixed: bool = False
    forward: bool = True  # a forward op: has the `.out` overload (see below)
    trains: bool = False  # has autograd

    @property
    def schema(self) -> str:
        return f"{self.name}({self.args}) -> {self.returns}"

    @property
    def arg_names(self) -> list[str]:
        return [a.strip().split(" ")[-1] for a in self.args.split(",")]


def _linear_family():
    for method, (adapters, single, mixed_tail) in METHODS.items():
        for base, weight in BASES.items():
            for mixed in (False, True):
                name = f"{method}_linear{base}{'_mixed' if mixed else ''}"
                tail = MIXED_TAILS.get(name, mixed_tail if mixed else single)
                yield OpDef(name, f"Tensor x, {weight}, Tensor? bias, {adapters}, {tail}", method=method, base=base,
                            mixed=mixed, trains=not mixed)


OPS: dict[str, OpDef] = {d.name: d for d in (
    *_linear_family(),
    OpDef("lora_embedding", "Tensor indices, Tensor weight, Tensor[] lora_A, Tensor[] lora_B, Tensor scales, "
          "int padding_idx", trains=True),
    # The backward ops serve the autograd below (every gradient of plain LoRA factors).
    OpDef("lora_linear_backward", "Tensor grad_out, Tensor x, Tensor weight, Tensor[] lora_A, Tensor[] lora_B, "
          "Tensor scales, Tensor[]? lora_x, bool[4] output_mask",
          returns="(Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor[])", forward=False),
    OpDef("lora_embedding_backward", "Tensor grad_out, Tensor indices, Tensor weight, Tensor[] lora_A, "
          "Tensor[] lora_B, Tensor scales, int padding_idx, bool[2] output_mask",
          returns="(Tensor, Tensor[], Tensor[])", forward=False),
    # W of the quantized bases as a dense [out, in] tensor of `dtype`.
    OpDef("dequantize_4bit", f"{BASES['_4bit']}, int in_features, ScalarType dtype", forward=False),
    OpDef("dequantize_int8", f"{BASES['_int8']}, ScalarType dtype", forward=False),
)}
SCHEMAS = {name: d.schema for name, d in OPS.items()}
# The forward ops. Each also has an `.out` overload that writes the result into a caller's
# buffer (static addresses for CUDA graphs and serving engines):
#   <name>.out(<arguments>, *, Tensor(a!) out) -> ()
# It returns nothing, so torch.compile can functionalize it (an alias-annotated return it
# cannot). The buffer must have the result's shape, dtype and device; it is never resized.
# Inference only: no autograd.
FORWARD_OPS = tuple(name for name, d in OPS.items() if d.forward)


def out_schema(name: str) -> str:
    """The `.out` overload's schema, derived from the functional one."""
    functional = SCHEMAS[name]
    head, tail = f"{name}(", ") -> Tensor"
    assert functional.startswith(head) and functional.endswith(tail), functional
    return f"{name}.out({functional[len(head):-len(tail)]}, *, Tensor(a!) out) -> ()"


for _schema in SCHEMAS.values():
    lib.define(_schema)
for _name in FORWARD_OPS:
    lib.define(out_schema(_name))

_warned: set[str] = set()


def _warn_fallback(name, dev):
    key = f"{name}:{dev}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"peftcore::{name} has no native kernel for device '{dev}' in this build; "
            "running the pure-PyTorch reference (slower).",
            stacklevel=4,
        )


def _fallback(name, fn):
    """Wrap a reference function as the CompositeExplicitAutograd kernel: it runs
    wherever no native kernel is registered, warning once per (op, device)."""

    def kernel(*args):
        _warn_fallback(name, args[0].device.type)
        return fn(*args)

    return kernel


def check_out(name, out, result):
    """The `.out` boundary check (the native kernels make the same one, common/output.h):
    `result` is the functional result or its fake."""
    op = f"peftcore::{name}.out"
    if out.device != result.device:
        raise RuntimeError(f"{op}: out is on {out.device} but the result is on {result.device}")
    if out.dtype != result.dtype:
        raise RuntimeError(f"{op}: out has dtype {out.dtype} but the result has dtype {result.dtype}")
    if out.shape != result.shape:
        raise RuntimeError(f"{op}: out has shape {list(out.shape)} but the result has shape {list(result.shape)} "
                           "(out is never resized: it is a static buffer)")


def _fallback_out(name, fn):
    """The `.out` overload's fallback: the reference result copied into out."""

    def kernel(*args, out):
        _warn_fallback(f"{name}.out", args[0].device.type)
        with torch.no_grad():
            result = fn(*args)
            check_out(name, out, result)
            out.copy_(result)

    return kernel


for _name in OPS:  # reference.<name> is each op's readable spec and its fallback
    lib.impl(_name, _fallback(_name, getattr(reference, _name)), "CompositeExplicitAutograd")
for _name in FORWARD_OPS:
    lib.impl(f"{_name}.out", _fallback_out(_name, getattr(reference, _name)), "CompositeExplicitAutograd")


# ---------------------------------------------------------------- fake kernels
_FAKES = {}


def _fake(name):
    """register_fake for peftcore::<name>; a forward op's fake also serves its `.out`."""

    def register(fn):
        torch.library.register_fake(f"peftcore::{name}")(fn)
        _FAKES[name] = fn
        return fn

    return register


@_fake("lora_linear_backward")
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


@_fake("lora_embedding_backward")
def _lora_embedding_backward_fake(grad_out, indices, weight, lora_A, lora_B, scales, padding_idx, output_mask):
    want_w, want_ad = output_mask
    gw = weight.new_empty(weight.shape) if want_w else weight.new_empty(0)
    gA = [A.new_empty(A.shape) for A in lora_A] if want_ad else []
    gB = [B.new_empty(B.shape) for B in lora_B] if want_ad else []
    return gw, gA, gB


@_fake("dequantize_4bit")
def _dequantize_4bit_fake(qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                          nested_blocksize, out_features, in_features, dtype):
    return qweight.new_empty((out_features, in_features), dtype=dtype)


@_fake("dequantize_int8")
def _dequantize_int8_fake(weight, row_scale, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


def _forward_fake(name):
    """A forward op's fake, from its schema's argument names: x's leading dims +
    [out_features] (that argument where the op has it, else weight.shape[0]) in x's
    dtype; an op over ``indices`` (lora_embedding): indices' shape + [weight.shape[1]] in
    weight's dtype."""
    names = OPS[name].arg_names

    def fake(*args):
        a = dict(zip(names, args))
        if "indices" in a:
            return a["weight"].new_empty((*a["indices"].shape, a["weight"].shape[1]))
        out = a["out_features"] if "out_features" in a else a["weight"].shape[0]
        return a["x"].new_empty((*a["x"].shape[:-1], out))

    return fake


for _name in FORWARD_OPS:
    _fake(_name)(_forward_fake(_name))


def _out_fake(name):
    fake = _FAKES[name]

    def out_fake(*args, out):
        check_out(name, out, fake(*args))

    return out_fake


for _name in FORWARD_OPS:
    torch.library.register_fake(f"peftcore::{_name}.out")(_out_fake(_name))


# -------------------------------------------------------------------- autograd
# The LoRA family. lora_linear_backward computes every gradient of plain LoRA factors;
# with lora_E (AdaLoRA) it runs on A_eff = A ⊙ E (E per rank, broadcast over in_features)
# and the chain rule follows: gA = gA_eff ⊙ E, gE = Σ_in gA_eff ⊙ A, zeros for an adapter
# whose scale is 0 (its weights may hold NaN). Tensor ops only (no host read of the
# scales), so torch.compile traces it.
def _adapter_want(lora_A, lora_B, lora_E):
    return any(t.requires_grad for t in (*lora_A, *lora_B, *(lora_E or ())))


def _save_adapters(ctx, lora_A, lora_B, lora_E, lora_x):
    """The adapter tensors in save order, with what is needed to split them again."""
    ctx.n_adapters = len(lora_A)
    ctx.has_lora_E = lora_E is not None
    ctx.has_lora_x = lora_x is not None
    return [*lora_A, *lora_B, *(lora_E or ()), *(lora_x or ())]


def _split_adapters(ctx, rest):
    n = ctx.n_adapters
    lora_A, lora_B, rest = rest[:n], rest[n:2 * n], rest[2 * n:]
    lora_E, rest = (rest[:n], rest[n:]) if ctx.has_lora_E else (None, rest)
    return lora_A, lora_B, lora_E, (rest if ctx.has_lora_x else None)


def _effective_A(x, lora_A, lora_E):
    if lora_E is None:
        return lora_A
    f = reference._acc(x)  # A_eff in float32 (float64): an adapter dtype every kernel accepts
    return [A.to(f) * E.to(f).reshape(-1, 1) for A, E in zip(lora_A, lora_E)]


def _adapter_grads(ctx, x, scales, lora_A, lora_E, gA_eff, gB):
    """The gradients to return for lora_A, lora_B and lora_E (None where not asked)."""
    n = ctx.n_adapters
    if not ctx.want[-1]:
        return [None] * n, [None] * n, ([None] * n if ctx.has_lora_E else None)
    if lora_E is None:
        return list(gA_eff), list(gB), None
    f = reference._acc(x)
    gA, gE = [], []
    for a in range(n):
        A, E = lora_A[a], lora_E[a]
        on = (scales[a] != 0).to(A.device)
        gA.append(torch.where(on, gA_eff[a] * E.to(f).reshape(-1, 1), 0).to(A.dtype))
        gE.append(torch.where(on, (gA_eff[a] * A.to(f)).sum(1), 0).reshape(E.shape).to(E.dtype))
    return gA, list(gB), gE


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, lora_E, scales, lora_x = inputs
    ctx.want = (
        x.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        _adapter_want(lora_A, lora_B, lora_E),
    )
    ctx.save_for_backward(x, weight, scales, *_save_adapters(ctx, lora_A, lora_B, lora_E, lora_x))


def _lora_linear_backward(ctx, grad):
    x, weight, scales, *rest = ctx.saved_tensors
    lora_A, lora_B, lora_E, lora_x = _split_adapters(ctx, rest)
    want_x, want_w, want_b, want_ad = ctx.want
    gx, gw, gb, gAe, gB, gxa = torch.ops.peftcore.lora_linear_backward(
        grad.contiguous(), x, weight, _effective_A(x, lora_A, lora_E), lora_B, scales, lora_x,
        [want_x, want_w, want_b, want_ad]
    )
    gA, gB, gE = _adapter_grads(ctx, x, scales, lora_A, lora_E, gAe, gB)
    # A Tensor[] input needs a list of the same length back (None entries allowed).
    return (gx if want_x else None, gw if want_w else None, gb if want_b else None, gA, gB, gE, None,
            list(gxa) if ctx.has_lora_x else None)




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


# The quantized bases are frozen: gradients flow to x, the bias and the adapters.
# The backward dequantizes W once (a temporary, as bitsandbytes' own backward does)
# and reuses lora_linear_backward, so the adapter gradients share one implementation.
def _quantized_setup(n_before_bias):
    """setup_context for an op whose inputs are (x, <n_before_bias - 1 quant args>, bias,
    lora_A, lora_B, lora_E, scales, lora_x)."""

    def setup(ctx, inputs, output):
        x, *quant = inputs[:n_before_bias]
        bias, lora_A, lora_B, lora_E, scales, lora_x = inputs[n_before_bias:]
        # The frozen quantized weight: tensors (None allowed) saved, ints kept as attributes.
        ctx.quant_kinds = [isinstance(q, torch.Tensor) or q is None for q in quant]
        ctx.quant_ints = [q for q, t in zip(quant, ctx.quant_kinds) if not t]
        ctx.want = (x.requires_grad, bias is not None and bias.requires_grad, _adapter_want(lora_A, lora_B, lora_E))
        ctx.n_quant = n_before_bias - 1
        ctx.save_for_backward(*[q for q, t in zip(quant, ctx.quant_kinds) if t], x, scales,
                              *_save_adapters(ctx, lora_A, lora_B, lora_E, lora_x))

    return setup


def _quantized_backward(dequantize):
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        n_saved_quant = sum(ctx.quant_kinds)
        tensors, ints = iter(saved[:n_saved_quant]), iter(ctx.quant_ints)
        quant = [next(tensors) if t else next(ints) for t in ctx.quant_kinds]
        x, scales, *rest = saved[n_saved_quant:]
        lora_A, lora_B, lora_E, lora_x = _split_adapters(ctx, rest)
        want_x, want_b, want_ad = ctx.want
        weight = dequantize(quant, x)
        gx, _, gb, gAe, gB, gxa = torch.ops.peftcore.lora_linear_backward(
            grad.contiguous(), x, weight, _effective_A(x, lora_A, lora_E), lora_B, scales, lora_x,
            [want_x, False, want_b, want_ad]
        )
        gA, gB, gE = _adapter_grads(ctx, x, scales, lora_A, lora_E, gAe, gB)
        return (gx if want_x else None, *([None] * ctx.n_quant), gb if want_b else None, gA, gB, gE, None,
                list(gxa) if ctx.has_lora_x else None)

    return backward


def _dequantize_4bit_for(quant, x):
    qweight, absmax, code, blocksize, n_absmax, n_code, n_offset, n_blocksize, out_features = quant
    return torch.ops.peftcore.dequantize_4bit(
        qweight, absmax, code, blocksize, n_absmax, n_code, n_offset, n_blocksize, out_features, x.shape[-1], x.dtype
    )


def _dequantize_int8_for(quant, x):
    weight, row_scale = quant
    return torch.ops.peftcore.dequantize_int8(weight, row_scale, x.dtype)




# (IA)³: y = s(x) with l = Π_{active a} l_a; feedforward y = base(x ⊙ l), else y = base(x) ⊙ l
# (each rounding taken as the identity). dL/dl_a = dL/dl ⊙ Π_{active b ≠ a} l_b, zero for an
# inactive a. The unscaled base output (non-feedforward) is recomputed, not y / l (l may be
# 0). Tensor ops only (the active mask is a tensor), so torch.compile traces it.
def _ia3_factors(ia3_l, active, f, device):
    """Each vector as it enters the product (flattened, in f; ones when inactive, so
    NaN in an inactive vector never propagates) and their product l (None: no vectors)."""
    on = (active != 0).to(device)
    one = torch.ones((), dtype=f, device=device)
    factors = [torch.where(on[a], t.reshape(-1).to(f), one) for a, t in enumerate(ia3_l)]
    l = None
    for t in factors:
        l = t if l is None else l * t
    return on, factors, l


def _ia3_grads(grad, x, weight, ia3_l, active, feedforward, base, want):
    """(grad_x, grad_weight, grad_bias, grad_ia3_l[]), each cast to its input's dtype and
    shape; base(x) recomputes the unscaled base output. The base's GEMMs run in the base
    dtype (x's, as W), as F.linear's backward runs them (no float32 copy of W); the
    scaling and the vectors' gradients in float32 (float64)."""
    want_x, want_w, want_b, want_l = want
    f = reference._acc(x)
    out_f, in_f = grad.shape[-1], x.shape[-1]
    go = grad.reshape(-1, out_f)
    g = go.to(f)
    x2 = x.reshape(-1, in_f)
    on, factors, l = _ia3_factors(ia3_l, active, f, x.device)
    gx = gw = gb = gl = None
    if feedforward:
        gxs = (go @ weight).to(f) if (want_x or want_l) else None  # dL/dx', x' = x ⊙ l
        if want_x:
            gx = gxs if l is None else gxs * l
        if want_l and l is not None:
            gl = (gxs * x2.to(f)).sum(0)
        if want_w:
            xs = x2 if l is None else (x2.to(f) * l).to(x.dtype)
            gw = go.t() @ xs
        if want_b:
            gb = g.sum(0)
    else:
        gbase = g if l is None else g * l  # dL/d base(x), rounded to x's dtype for the GEMMs
        gbase_x = gbase.to(x.dtype)
        if want_x:
            gx = gbase_x @ weight
        if want_w:
            gw = gbase_x.t() @ x2
        if want_b:
            gb = gbase.sum(0)
        if want_l and l is not None:
            gl = (g * base(x).reshape(-1, out_f).to(f)).sum(0)
    gls = [None] * len(ia3_l)
    if want_l:
        for a, t in enumerate(ia3_l):
            others = None
            for b, fb in enumerate(factors):
                if b != a:
                    others = fb if others is None else others * fb
            ga = gl if others is None else gl * others
            gls[a] = torch.where(on[a], ga, 0).reshape(t.shape).to(t.dtype)
    return (
        gx.reshape(x.shape).to(x.dtype) if gx is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb,
        gls,
    )


def _ia3_setup(ctx, inputs, output):
    x, weight, bias, ia3_l, active, feedforward = inputs
    ctx.want = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                any(t.requires_grad for t in ia3_l))
    ctx.n = len(ia3_l)
    ctx.feedforward = feedforward
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, active, *([bias] if bias is not None else []), *ia3_l)


def _ia3_backward(ctx, grad):
    x, weight, active, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    ia3_l = rest[1:] if ctx.has_bias else rest
    gx, gw, gb, gls = _ia3_grads(grad, x, weight, ia3_l, active, ctx.feedforward,
                                 lambda t: torch.nn.functional.linear(t, weight, bias), ctx.want)
    return gx, gw, gb.to(bias.dtype) if gb is not None else None, gls, None, None




def _ia3_quantized_setup(n_before_bias):
    """setup_context for (x, <n_before_bias - 1 quant args>, bias, ia3_l, active, feedforward)."""

    def setup(ctx, inputs, output):
        x, *quant = inputs[:n_before_bias]
        bias, ia3_l, active, feedforward = inputs[n_before_bias:]
        ctx.quant_kinds = [isinstance(q, torch.Tensor) or q is None for q in quant]
        ctx.quant_ints = [q for q, t in zip(quant, ctx.quant_kinds) if not t]
        ctx.want = (x.requires_grad, False, bias is not None and bias.requires_grad,
                    any(t.requires_grad for t in ia3_l))
        ctx.n_quant = n_before_bias - 1
        ctx.n = len(ia3_l)
        ctx.feedforward = feedforward
        ctx.has_bias = bias is not None
        tensors = [q for q, t in zip(quant, ctx.quant_kinds) if t]
        ctx.save_for_backward(*tensors, x, active, *([bias] if bias is not None else []), *ia3_l)

    return setup


def _ia3_quantized_backward(dequantize, base_op):
    """Frozen quantized W: dequantized once (a temporary), as the LoRA quantized backward;
    the unscaled base recomputed by the quantized base op itself (the forward's base)."""

    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        n_saved_quant = sum(ctx.quant_kinds)
        tensors, ints = iter(saved[:n_saved_quant]), iter(ctx.quant_ints)
        quant = [next(tensors) if t else next(ints) for t in ctx.quant_kinds]
        x, active, *rest = saved[n_saved_quant:]
        bias = rest[0] if ctx.has_bias else None
        ia3_l = rest[1:] if ctx.has_bias else rest
        weight = dequantize(quant, x)
        none = torch.zeros(0)
        gx, _, gb, gls = _ia3_grads(grad, x, weight, ia3_l, active, ctx.feedforward,
                                    lambda t: base_op(t, *quant, bias, [], [], None, none, None), ctx.want)
        return (gx, *([None] * ctx.n_quant), gb.to(bias.dtype) if gb is not None else None, gls, None, None)

    return backward




# The linear family's autograd, from the table: per method, the dense base's pair, or the
# quantized pair built from the base kind's dequantizer and its number of arguments.
_DEQUANTIZE = {"_4bit": _dequantize_4bit_for, "_int8": _dequantize_int8_for}


def _n_before_bias(base: str) -> int:
    return 1 + len(BASES[base].split(","))  # x, then the base kind's weight arguments


def _autograd(d: OpDef):
    """(backward, setup_context) of a linear-family op that trains."""
    if d.base == "":
        return {"lora": (_lora_linear_backward, _lora_linear_setup), "ia3": (_ia3_backward, _ia3_setup)}[d.method]
    n, dequantize = _n_before_bias(d.base), _DEQUANTIZE[d.base]
    if d.method == "lora":
        return _quantized_backward(dequantize), _quantized_setup(n)
    # IA3 recomputes its unscaled base output with the LoRA op of the same base (no adapters).
    return _ia3_quantized_backward(dequantize, getattr(torch.ops.peftcore, f"lora_linear{d.base}")), \
        _ia3_quantized_setup(n)


for _d in OPS.values():
    if _d.trains and _d.method is not None:
        _backward, _setup = _autograd(_d)
        torch.library.register_autograd(f"peftcore::{_d.name}", _backward, setup_context=_setup)
