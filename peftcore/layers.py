"""Adapter layers: a base module plus the adapters attached to it.

All adapter state lives in tensors: per-adapter parameters (LoRA's ``lora_A`` / ``lora_B``,
AdaLoRA's ``lora_A`` / ``lora_E`` / ``lora_B``, IA3's ``ia3_l``) and one float32 buffer per
layer saying what each adapter contributes: ``lora_scales`` (the adapter's effective
scale, 0 when it is inactive or adapters are disabled) or ``ia3_active`` (1 / 0).
Switching adapters writes that buffer in place, so it never rebuilds modules and never
makes a ``torch.compile``d model recompile; the fused kernels skip adapters whose entry is
0, so the base output is exact when none is active.

Layers by method and base: ``LoraLinear`` / ``LoraLinear4bit`` / ``LoraLinear8bit`` /
``LoraEmbedding``, ``AdaLoraLinear`` / ``AdaLoraLinear4bit`` / ``AdaLoraLinear8bit``,
``Ia3Linear`` / ``Ia3Linear4bit`` / ``Ia3Linear8bit`` (Linear: ``nn.Linear`` or
transformers ``Conv1D``; 4bit / 8bit: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import LORA_EXTRAS

try:  # transformers is optional: GPT-2 style Conv1D is supported when it is installed.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()


_NO_EXTRAS = (None,) * len(LORA_EXTRAS)
_below_autograd = torch._C._AutoDispatchBelowAutograd


def run_op(op, *args):
    """``op(*args)``; with grad mode off (``no_grad``: ``generate``, evaluation) straight to
    the device kernel. The ops' autograd is registered in Python (``_ops.py``), and its
    wrapper runs on every call that is not under ``inference_mode``, even when nothing will
    need a gradient: ~5-9 µs per layer, more than the rest of the layer. torch.library's
    own wrapper skips autograd with the same guard. Under torch.compile the op is called
    as it is (the compiler handles autograd itself)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


_MISSING = object()


def tensor_attr(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter (or a parameter slot holding None, as an
    absent bias), read from the module's registry: ``nn.Module.__getattr__`` costs ~0.5 µs
    per access here, and a forward reads three or four (~2 µs of a ~7 µs layer at decode).
    Anything else (a parametrization's property, a plain attribute) goes through getattr."""
    t = module._parameters.get(name, _MISSING)
    return getattr(module, name) if t is _MISSING else t


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def follow_mode(new: nn.Module, replaced: nn.Module) -> None:
    """Give a module peftcore creates, and the containers it creates inside it, the
    training mode of the module it replaces (``replaced`` itself is not touched). A fresh
    nn.Module is in training mode: in an eval model that would run LoRA dropout on every
    inference call."""
    mode = replaced.training
    new.training = mode
    for child in new.children():
        if child is not replaced:
            child.training = mode


class AdapterLayer(nn.Module):
    """What every adapter layer has: ``base_layer``; per-adapter parameters in the
    ``nn.ParameterDict``s named by ``param_dicts`` (one entry per adapter, in the same
    order); a float32 state buffer named ``state_name`` with one entry per adapter (what
    the kernel applies; 0 = off); ``merged_adapters``; and ``peft_type`` (the method)."""

    peft_type = ""
    param_dicts: tuple[str, ...] = ()
    meta_dicts: tuple[str, ...] = ()  # per-adapter plain-value dicts kept in __dict__
    state_name = ""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        # A load creates one of these per adapted module (hundreds), and nn.Module's
        # __setattr__ walks isinstance chains on every assignment: register submodules and
        # the buffer directly, and keep plain attributes in __dict__.
        self._modules["base_layer"] = base_layer
        for d in self.param_dicts:
            self._modules[d] = nn.ParameterDict()
        self._buffers[self.state_name] = torch.zeros(0, dtype=torch.float32)
        self._non_persistent_buffers_set.add(self.state_name)
        self.__dict__.update(
            merged_adapters=[],  # adapters merged into the base weight (state 0 here)
            _mixed=None,  # (rows, scales) inside peftcore.mixed_batch (see _forward_mixed)
            **module_shape(base_layer),
        )

    # Order of adapters = order of the ParameterDicts = order of the state entries.
    @property
    def adapter_names(self) -> list[str]:
        return list(self._modules[self.param_dicts[0]].keys())

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters, by ParameterDict name (e.g. {"lora_A": A, "lora_B": B})."""
        return {d: self._modules[d][name] for d in self.param_dicts}

    def _params(self, d: str) -> list[nn.Parameter]:
        # Straight from the dict's parameter registry: ParameterDict.values() goes through
        # __getattr__ per entry, a visible cost for every layer of every decode step.
        return list(self._modules[d]._parameters.values())

    def _add_params(self, name: str, **tensors: torch.Tensor) -> None:
        for d, t in tensors.items():
            self._modules[d][name] = nn.Parameter(t, requires_grad=False)
        self._new_state()

    def remove(self, name: str) -> None:
        for d in self.param_dicts:
            del self._modules[d][name]
        for m in self.meta_dicts:
            self.__dict__[m].pop(name)
        self._new_state()

    def _new_state(self) -> None:
        # Adding or removing an adapter changes the module's structure anyway (the model's
        # state table is rebuilt around the new buffer); switching only writes into it.
        n = len(self.adapter_names)
        buf = self._buffers[self.state_name]
        self._buffers[self.state_name] = torch.zeros(n, dtype=torch.float32, device=buf.device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() would round the state (alpha / sqrt(r) is rarely
        # exact in 8 bits): keep the float32 tensor (the same one when the device is
        # unchanged, so the model's state table stays valid).
        old = self._buffers[self.state_name]
        super()._apply(fn, recurse)
        buf = self._buffers[self.state_name]
        if buf.dtype != torch.float32:
            self._buffers[self.state_name] = old.to(buf.device)
        return self

    def _on_value(self, name: str) -> float:
        """The state entry of an active adapter."""
        raise NotImplementedError

    def _forward_mixed(self, x: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The forward of a mixed batch: row group g of x runs adapter slot rows[g] alone
        (-1 = the base; slots in adapter order, ``scales`` their configured values)."""
        raise NotImplementedError

    def _weight(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for Conv1D, which stores (in, out))."""
        w = tensor_attr(self._modules["base_layer"], "weight")
        return w.t() if self.is_conv1d else w

    def _state(self) -> torch.Tensor:
        """The state buffer (``lora_scales`` / ``ia3_active``), without ``__getattr__``."""
        return self._buffers[self.state_name]

    def _no_row_adapters(self, kwargs) -> None:
        # PEFT's per-row adapter_names kwarg would silently run the layer's active adapters
        # for every row here (PEFT itself ignores it for IA3): refuse, and say what works.
        if kwargs.get("adapter_names") is not None:
            from .errors import PeftcoreError

            raise PeftcoreError(
                f"{type(self).__name__}: a per-row adapter_names argument is not read by peftcore layers; "
                "run the batch inside `with peftcore.mixed_batch(model, adapter_names): ...`"
            )


def module_shape(base_layer: nn.Module) -> dict:
    """is_conv1d, in_features, out_features of an nn.Linear / Conv1D (weight stored (in, out))
    / bitsandbytes linear / nn.Embedding (num_embeddings, embedding_dim) base."""
    if isinstance(base_layer, nn.Embedding):
        return dict(is_conv1d=False, in_features=base_layer.num_embeddings, out_features=base_layer.embedding_dim)
    if bnb_kind(base_layer) is not None:
        return dict(is_conv1d=False, in_features=base_layer.in_features, out_features=base_layer.out_features)
    conv1d = bool(Conv1D) and isinstance(base_layer, Conv1D)
    w = base_layer.weight
    in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
    return dict(is_conv1d=conv1d, in_features=in_f, out_features=out_f)


# ---------------------------------------------------------------- bitsandbytes bases
# bitsandbytes is optional: nothing below imports it at module import time.
def bnb_kind(module: nn.Module) -> str | None:
    """"4bit" for ``bitsandbytes.nn.Linear4bit``, "8bit" for ``Linear8bitLt``, "other" for any
    other bitsandbytes module (Embedding4bit, ...), None for a module not from bitsandbytes."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return "other"


def unpack_cpu_4bit(base: nn.Module) -> bool:
    """Undo bitsandbytes' CPU (AVX512-BF16) packed layout of a ``Linear4bit`` weight, exactly.

    bitsandbytes converts a Linear4bit on its first eval-mode no-grad CPU forward
    (``functional._convert_weight_packed_for_cpu``): the nibbles are interleaved in
    [N, K/2] tiles, absmax becomes bfloat16 [K/blocksize, N] and double quantization is
    dropped. Its own inverse re-quantizes absmax (lossy); here the nibbles are
    un-interleaved bit for bit and ``absmax = packed_absmax.T.reshape(-1).float()``
    (bf16 -> fp32 is exact), so the layer computes the very weight bitsandbytes used.
    The result is bitsandbytes' standard layout (non-nested), which bitsandbytes itself
    still runs (it re-packs on its next eligible forward). Returns True if it converted."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or not getattr(qs, "packing_format_for_cpu", False):
        return False
    packed = w.data.view(torch.uint8)
    N, K_half = packed.shape
    K, BLOCK_N = 2 * K_half, 32
    # packed rows of 32 bytes hold 64 codes: low nibbles are tile entries 0..31, high 32..63.
    tiles = packed.reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [-1, 64]
    codes = codes.reshape(N // BLOCK_N, K_half, BLOCK_N, 2).transpose(1, 2).reshape(N, K)
    flat = codes.reshape(-1)
    qweight = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)
    qweight = qweight.reshape(qs.original_qshape)
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None:
        qweight = qweight.view(storage)
    qs.absmax = qs.absmax.t().reshape(-1).float().contiguous()
    qs.nested = False
    qs.state2 = None
    qs.offset = None
    qs.dtype = qs.original_dtype
    qs.packing_format_for_cpu = False
    w.data = qweight
    if getattr(base, "quant_state", None) is not None:
        base.quant_state = qs
    return True


def stored_4bit(base: nn.Module) -> tuple:
    """A ``Linear4bit``'s stored weight as the quantized ops take it (standard layout):
    (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize), the nested entries None / 0 without double quantization."""
    w = base.weight
    qs = w.quant_state
    if qs.nested:  # nested_offset: bitsandbytes' 0-dim float32 tensor, passed as it is
        nested = (qs.state2.absmax, qs.state2.code, qs.offset, int(qs.state2.blocksize))
    else:
        nested = (None, None, None, 0)
    return (w.data, qs.absmax, qs.code, int(qs.blocksize), *nested)


def _compute_dtype(base: nn.Module):
    return base.compute_dtype if getattr(base, "compute_type_is_set", base.compute_dtype is not None) else None


def _narrower_compute(base: nn.Module, x: torch.Tensor) -> bool:
    cdt = _compute_dtype(base)
    return cdt is not None and x.is_floating_point() and torch.finfo(cdt).bits < torch.finfo(x.dtype).bits


def compute_input_4bit(base: nn.Module, x: torch.Tensor, lora_x, n_adapters: int):
    """(x for the base product, lora_x) of a Linear4bit forward (see ``LoraLinear4bit``)."""
    cdt = _compute_dtype(base)
    if cdt is None or cdt == x.dtype or not x.is_floating_point():
        return x, lora_x
    if _narrower_compute(base, x):
        # bitsandbytes rounds x to the compute dtype for the base product: do the same, but
        # keep x's dtype so that the LoRA terms (on the original x, as PEFT feeds them) are
        # added at x's precision.
        return x.to(cdt).to(x.dtype), (lora_x if lora_x is not None else [x] * n_adapters)
    return x.to(cdt), lora_x  # an exact upcast: the LoRA branch may read it


def int8_state(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB float32 [out]) of a ``Linear8bitLt``: CB is the weight's data;
    SCB is on the weight until bitsandbytes' first forward moves it to ``state.SCB``."""
    scb = getattr(base.weight, "SCB", None)
    if scb is None:
        scb = base.state.SCB
    return base.weight.data, scb


# ---------------------------------------------------------------- base kinds
class BaseKind:
    """How an adapter layer's ops read its frozen base: one instance per base kind (dense,
    bitsandbytes 4-bit, LLM.int8), shared by every method's layer. It holds the kind's
    ops (``peftcore::<method>_linear<suffix>`` and their ``_mixed`` forms, the suffix a key
    of ``_ops.BASES``), the arguments that stand for W, and the dtype handling around the
    op; the method layers (``LoraLinear``, ``Ia3Linear``) write their forward once over it."""

    suffix = ""

    def __init__(self):
        ops = torch.ops.peftcore
        # The overloads themselves (.default): calling the packet resolves it on every call.
        self.lora, self.lora_mixed, self.ia3, self.ia3_mixed = (
            getattr(ops, f"{m}_linear{self.suffix}{x}").default for m in ("lora", "ia3") for x in ("", "_mixed")
        )

    def refresh(self, base: nn.Module) -> None:
        """Before every forward (the layout of a 4-bit weight may have changed)."""

    def weight(self, layer: "AdapterLayer") -> tuple:
        """The op's arguments for W (between x and bias)."""
        return (layer._weight(),)

    def lora_input(self, base: nn.Module, x: torch.Tensor, lora_x, n_adapters: int):
        """(x for the base product, lora_x: what the LoRA terms read, None = x)."""
        return x, lora_x

    def mixed_lora_x(self, lora_x) -> tuple:
        """The mixed LoRA op's trailing lora_x argument, where the kind has one."""
        return ()

    def ia3_input(self, base: nn.Module, x: torch.Tensor, feedforward: bool) -> torch.Tensor:
        return x

    def output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out


class Quant4Kind(BaseKind):
    """bitsandbytes ``Linear4bit``: the packed bytes and quant state, x in the layer's
    compute dtype for the base product (``compute_input_4bit``), the result in x's dtype."""

    suffix = "_4bit"

    def refresh(self, base):
        unpack_cpu_4bit(base)  # no-op unless bitsandbytes ran the base directly since injection

    def weight(self, layer):
        return (*stored_4bit(layer.base_layer), layer.out_features)

    def lora_input(self, base, x, lora_x, n_adapters):
        return compute_input_4bit(base, x, lora_x, n_adapters)

    def mixed_lora_x(self, lora_x):
        return (None if lora_x is None else lora_x[0],)

    def ia3_input(self, base, x, feedforward):
        # Output scaling: x as bitsandbytes computes with it (see compute_input_4bit).
        # Input scaling with a compute dtype narrower than x: x·l stays at x's precision
        # (bitsandbytes would round x·l to the compute dtype; this is the more exact product).
        return x if feedforward and _narrower_compute(base, x) else compute_input_4bit(base, x, None, 0)[0]

    def output(self, out, x):
        return out.to(x.dtype)


class Int8Kind(BaseKind):
    """bitsandbytes ``Linear8bitLt``: CB / SCB (``int8_state``) in x's dtype."""

    suffix = "_int8"

    def weight(self, layer):
        return int8_state(layer.base_layer)


BASE_KINDS = {None: BaseKind(), "4bit": Quant4Kind(), "8bit": Int8Kind()}  # by bnb_kind(base)


class LoraLayer(AdapterLayer):
    """Common state of LoRA layers: ``lora_A`` / ``lora_B`` (``lora_embedding_A`` / ``_B``
    for embeddings) and the ``lora_scales`` buffer (each adapter's effective scale)."""

    peft_type = "LORA"
    param_dicts = ("lora_A", "lora_B")
    meta_dicts = ("scaling", "r", "dropout_p")
    state_name = "lora_scales"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.__dict__.update(
            scaling={},  # name -> configured scale (alpha / r or alpha / sqrt(r))
            r={},  # name -> rank
            dropout_p={},  # name -> LoRA dropout probability (training only)
        )

    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) such that the adapter's delta is ``scaling · B·A``."""
        a, b = self.param_dicts[:2]
        return self._modules[a][name], self._modules[b][name]

    def _lists(self):
        m, (a, b) = self._modules, self.param_dicts[:2]
        return list(m[a]._parameters.values()), list(m[b]._parameters.values())

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # Which of the LoRA ops' per-adapter extras (_ops.LORA_EXTRAS) this layer holds: a
        # variant names its extra among its param_dicts (AdaLoRA: lora_E), and passes it.
        slots = tuple(e if e in cls.param_dicts else None for e in LORA_EXTRAS)
        cls._extra_slots = slots if any(slots) else None

    _extra_slots = None

    def _extras(self) -> tuple:
        """The ops' extras arguments, in table order: the list of this layer's tensors of
        each, None where the method has none (plain LoRA: all None)."""
        slots = self._extra_slots
        if slots is None:
            return _NO_EXTRAS
        return tuple(None if e is None else self._params(e) for e in slots)

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout_p: float) -> None:
        self.scaling[name] = scaling
        self.r[name] = A.shape[0]
        self.dropout_p[name] = dropout_p
        self._add_params(name, **{self.param_dicts[0]: A, self.param_dicts[1]: B})

    def _on_value(self, name: str) -> float:
        return self.scaling[name]

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]} scaling={self.scaling[n]:g}" for n in self.adapter_names)

    def _dropped(self, x: torch.Tensor):
        """PEFT drops out the LoRA input only, independently for each adapter (training only)."""
        if self.training and any(p > 0 for p in self.dropout_p.values()):
            return [F.dropout(x, p, True) if p > 0 else x for p in self.dropout_p.values()]
        return None


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers ``Conv1D`` (whose weight is stored (in, out)):
    one ``peftcore::lora_linear`` call. The forward is written once for every base kind
    (``kind``); the subclasses below only choose theirs."""

    kind = BASE_KINDS[None]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs:
            self._no_row_adapters(kwargs)
        kind, base = self.kind, self._modules["base_layer"]
        kind.refresh(base)
        if self._mixed is not None:
            return self._forward_mixed(x, *self._mixed)
        lora_A, lora_B = self._lists()
        xc, lora_x = kind.lora_input(base, x, self._dropped(x), len(lora_A))
        out = run_op(kind.lora, xc, *kind.weight(self), tensor_attr(base, "bias"), lora_A, lora_B, *self._extras(),
                     self._state(), lora_x)
        return kind.output(out, x)

    def _forward_mixed(self, x, rows, scales):
        kind, base = self.kind, self._modules["base_layer"]
        lora_A, lora_B = self._lists()
        xc, lora_x = kind.lora_input(base, x, None, 1)
        out = kind.lora_mixed(xc, *kind.weight(self), tensor_attr(base, "bias"), lora_A, lora_B, *self._extras(), scales,
                              rows, *kind.mixed_lora_x(lora_x))
        return kind.output(out, x)


class LoraLinear4bit(LoraLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (nf4 / fp4, optional double quantization).

    The forward runs ``peftcore::lora_linear_4bit`` on the layer's packed bytes and
    quant state (never bitsandbytes' forward, never a dequantized weight). As bitsandbytes
    does, x is cast to the layer's ``compute_dtype`` for the base product and the result is
    returned in x's dtype. The LoRA branch sees the *original* x, as in PEFT:

    * compute dtype narrower than x (fp32 x, bf16 compute): the base product reads x rounded
      to the compute dtype (as bitsandbytes), kept in x's dtype, and the original x goes to
      the LoRA terms as ``lora_x``; everything is summed at x's precision.
    * compute dtype wider (bf16 x, fp32 compute): the upcast is exact, so base and LoRA
      read it, are summed in fp32 and rounded to x's dtype once (PEFT rounds the base and
      the LoRA output to x's dtype separately before adding: a one-ulp difference).
    """

    kind = BASE_KINDS["4bit"]

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        unpack_cpu_4bit(base_layer)  # no-op unless bitsandbytes already ran it on CPU


class LoraLinear8bit(LoraLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8, ``has_fp16_weights=False``).

    The forward runs ``peftcore::lora_linear_int8`` on CB / SCB in x's dtype. The layer's
    ``threshold`` (outlier decomposition) plays no part: peftcore computes against the exact
    dequantized weight CB·SCB/127, which is what the outlier path approximates."""

    kind = BASE_KINDS["8bit"]


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: A is (r, num_embeddings), B is (embedding_dim, r); no dropout."""

    param_dicts = ("lora_embedding_A", "lora_embedding_B")

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._modules["base_layer"]
        lora_A, lora_B = self._lists()
        pad = -1 if base.padding_idx is None else base.padding_idx
        return run_op(torch.ops.peftcore.lora_embedding.default, input_ids, tensor_attr(base, "weight"), lora_A, lora_B,
                      self._state(), pad)


# ---------------------------------------------------------------- AdaLoRA
def adalora_scaling(lora_alpha: float, r: int, ranknum: float) -> float:
    """PEFT's AdaLoRA factor: alpha (r when alpha <= 0; NOT alpha / r) / (ranknum + 1e-5),
    with ranknum = init_r, also after pruning and reloading."""
    return (lora_alpha if lora_alpha > 0 else float(r)) / (ranknum + 1e-5)


class AdaLoraLayer(LoraLayer):
    """AdaLoRA (SVD-form LoRA): ``lora_A`` (r, in), ``lora_B`` (out, r) and the singular
    values ``lora_E`` (r, 1); ``ranknum`` holds init_r (a frozen one-element parameter, as
    in PEFT). The delta is ``scaling · B·(A ⊙ E)`` with ``scaling = adalora_scaling(...)``;
    rank allocation zeroes entries of E (``peftcore.update_and_allocate``)."""

    peft_type = "ADALORA"
    param_dicts = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._modules["ranknum"] = nn.ParameterDict()

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, E: torch.Tensor, scaling: float,
            dropout_p: float, ranknum: float) -> None:
        self.scaling[name] = scaling
        self.r[name] = A.shape[0]
        self.dropout_p[name] = dropout_p
        self._modules["ranknum"][name] = nn.Parameter(torch.tensor([float(ranknum)], device=A.device), requires_grad=False)
        self._add_params(name, lora_A=A, lora_B=B, lora_E=E)

    def remove(self, name: str) -> None:
        del self._modules["ranknum"][name]
        super().remove(name)

    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name] * self.lora_E[name], self.lora_B[name]


# One class per base kind (its LoRA layer's kind): the LoRA forward, which passes lora_E (a
# param_dict of AdaLoraLayer) as the ops' extra of that name.
class AdaLoraLinear(AdaLoraLayer, LoraLinear):
    """AdaLoRA on ``nn.Linear`` / transformers ``Conv1D``: ``peftcore::lora_linear`` with lora_E."""


class AdaLoraLinear4bit(AdaLoraLayer, LoraLinear4bit):
    """AdaLoRA on ``bitsandbytes.nn.Linear4bit``: ``peftcore::lora_linear_4bit`` with lora_E."""


class AdaLoraLinear8bit(AdaLoraLayer, LoraLinear8bit):
    """AdaLoRA on ``bitsandbytes.nn.Linear8bitLt``: ``peftcore::lora_linear_int8`` with lora_E."""


class Ia3Layer(AdapterLayer):
    """(IA)³: each adapter is a vector ``ia3_l``, (out, 1) when the layer scales its output
    (attention projections; the bias is scaled too) or (1, in) when it scales its input
    (``is_feedforward``, fixed when the layer is created, as in PEFT). Active adapters
    multiply: the kernels use the product of the vectors whose ``ia3_active`` entry is 1."""

    peft_type = "IA3"
    param_dicts = ("ia3_l",)
    state_name = "ia3_active"

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer)
        self.__dict__.update(is_feedforward=bool(feedforward))

    def add(self, name: str, l: torch.Tensor) -> None:  # noqa: E741
        self._add_params(name, ia3_l=l)

    def _on_value(self, name: str) -> float:
        return 1.0

    def vector_shape(self) -> tuple[int, int]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, adapters={self.adapter_names}"


class Ia3Linear(Ia3Layer):
    """IA3 on ``nn.Linear`` / transformers ``Conv1D``: one ``peftcore::ia3_linear`` call,
    written once for every base kind (``kind``), as ``LoraLinear``."""

    kind = BASE_KINDS[None]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs:
            self._no_row_adapters(kwargs)
        kind, base = self.kind, self._modules["base_layer"]
        kind.refresh(base)
        if self._mixed is not None:
            return self._forward_mixed(x, *self._mixed)
        xc = kind.ia3_input(base, x, self.is_feedforward)
        out = run_op(kind.ia3, xc, *kind.weight(self), tensor_attr(base, "bias"), self._params("ia3_l"), self._state(),
                     self.is_feedforward)
        return kind.output(out, x)

    def _forward_mixed(self, x, rows, scales):
        kind, base = self.kind, self._modules["base_layer"]
        xc = kind.ia3_input(base, x, self.is_feedforward)
        out = kind.ia3_mixed(xc, *kind.weight(self), tensor_attr(base, "bias"), self._params("ia3_l"), rows,
                             self.is_feedforward)
        return kind.output(out, x)


class Ia3Linear4bit(Ia3Linear):
    """IA3 on ``bitsandbytes.nn.Linear4bit``: one ``peftcore::ia3_linear_4bit`` call on the
    packed weight, returned in x's dtype."""

    kind = BASE_KINDS["4bit"]

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer, feedforward)
        unpack_cpu_4bit(base_layer)


class Ia3Linear8bit(Ia3Linear):
    """IA3 on ``bitsandbytes.nn.Linear8bitLt``: one ``peftcore::ia3_linear_int8`` call on CB / SCB."""

    kind = BASE_KINDS["8bit"]


class ModulesToSaveWrapper(nn.Module):
    """A module trained and saved in full for some adapters (PEFT's ``modules_to_save``).

    ``original_module`` stays frozen; ``modules_to_save[name]`` is each adapter's copy.
    The copy of the first active adapter that has one runs, else the original. (This is a
    choice between modules, so under ``torch.compile`` switching it recompiles once.)
    Inside ``peftcore.mixed_batch`` (``mixed_names`` set), each row of the first input runs
    the copy of its own adapter (the original for adapters without one).
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.mixed_names: list[str] | None = None
        follow_mode(self, original_module)  # each copy is a deepcopy: it has the original's modes

    def forward(self, *args, **kwargs):
        if self.mixed_names is not None:
            return self._forward_mixed(*args, **kwargs)
        if self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _forward_mixed(self, x, *args, **kwargs):
        # Whole modules: one call per run of consecutive rows that share a module.
        names = self.mixed_names
        if x.shape[0] % len(names):
            from .errors import PeftcoreError

            raise PeftcoreError(f"mixed_batch: a batch of {x.shape[0]} rows for {len(names)} adapter names "
                                "(the batch must be a whole multiple of the list: beams / return sequences)")
        per = x.shape[0] // len(names)
        mods = [self.modules_to_save[n] if n in self.modules_to_save else self.original_module for n in names]
        outs, start = [], 0
        for g in range(1, len(mods) + 1):
            if g == len(mods) or mods[g] is not mods[start]:
                outs.append(mods[start](x[start * per:g * per], *args, **kwargs))
                start = g
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def set_active(self, active: list[str], enabled: bool) -> None:
        self.active_adapter = next((n for n in active if n in self.modules_to_save), None) if enabled else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())
