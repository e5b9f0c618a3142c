"""LoRA (``peft_type`` "LORA"): y = base(x) + s·(x·Aᵀ)·Bᵀ per adapter, s = alpha / r
(alpha / √r with rsLoRA).

On-disk keys: ``<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r);
embeddings ``.lora_embedding_A`` (r, num_embeddings) / ``.lora_embedding_B`` (dim, r).
Layers: ``LoraLinear`` (nn.Linear, transformers Conv1D), ``LoraLinear4bit`` /
``LoraLinear8bit`` (bitsandbytes), ``LoraEmbedding``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AdapterConfigError, AdapterWeightsError, UnsupportedAdapterError
from ..layers import LoraEmbedding, LoraLayer, LoraLinear, LoraLinear4bit, LoraLinear8bit, bnb_kind, lora_scaling
from .base import Method, adapter_kw, fill, pattern_value, shape_in_out, take


def lora_suffixes(is_embedding: bool) -> tuple[str, str]:
    """On-disk suffixes of the two LoRA factors of a module."""
    return ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A.weight", "lora_B.weight")


COMBINATIONS = ("svd", "linear", "cat")


def _factors(layer: LoraLayer, present: list[tuple[str, float]], combination: str, rank: int,
                  svd_clamp: Optional[float], full_matrices: bool, driver: Optional[str]):
    """(A, B) of the combined adapter on one layer, in float32 (float64 for float64 adapters)."""
    f = torch.float64 if any(layer.adapter_weights(n)[0].dtype == torch.float64 for n, _ in present) else torch.float32
    fac = [(layer.adapter_weights(n)[0].detach().to(f), layer.adapter_weights(n)[1].detach().to(f), w * layer.scaling[n])
           for n, w in present]
    if combination == "cat":
        A = torch.cat([ws * a for a, _, ws in fac], dim=0)
        B = torch.cat([b for _, b, _ in fac], dim=1)
        pad = rank - A.shape[0]  # adapters this layer does not carry: zero rows / columns
        return torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
    if combination == "linear":
        A = sum((1.0 if ws >= 0 else -1.0) * abs(ws) ** 0.5 * a for a, _, ws in fac)
        B = sum(abs(ws) ** 0.5 * b for _, b, ws in fac)
        return A, B
    delta = sum(ws * (b @ a) for a, b, ws in fac)  # [out, in] (embeddings: [dim, num_embeddings])
    if rank > min(delta.shape):
        raise AdapterConfigError(
            f"add_weighted_adapter: svd_rank={rank} exceeds the smaller side of a {tuple(delta.shape)} delta"
        )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
        A, B = A.clamp(-hi, hi), B.clamp(-hi, hi)
    return A, B


# PEFT's defaults for target_modules=None, per transformers model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


class Lora(Method):
    peft_type = "LORA"
    default_targets = DEFAULT_TARGETS
    label = "LoRA"
    on_embeddings = True
    # Layer class by bitsandbytes kind of the base (None: nn.Linear / Conv1D).
    layers = {"4bit": LoraLinear4bit, "8bit": LoraLinear8bit, None: LoraLinear}
    factors = ("lora_A", "lora_B")  # the layer's parameter dicts of A and B

    def make_layer(self, module, feedforward):
        if self.on_embeddings and isinstance(module, nn.Embedding):
            return LoraEmbedding(module)
        return self.layers[bnb_kind(module)](module)

    def new(self, config, path, module, feedforward):
        n_in, n_out, is_emb = shape_in_out(module)
        r = pattern_value(config.rank_pattern, path, config.r)
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        kw = adapter_kw(module)
        A = torch.empty(r, n_in, **kw)
        B = torch.empty(n_out, r, **kw)
        init = config.init_lora_weights
        if is_emb:  # PEFT: A zero, B standard normal (the reverse of Linear)
            if init is False:
                A.normal_(), B.normal_()
            else:
                A.zero_(), B.normal_()
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:  # nn.Linear's own init for both factors
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                if init == "gaussian":
                    nn.init.normal_(A, std=1 / r)
                B.zero_()
        return dict(A=A, B=B, scaling=lora_scaling(r, alpha, config.use_rslora), dropout_p=config.lora_dropout)

    def bind(self, config, path, module, feedforward, remaining, source):
        n_in, n_out, is_emb = shape_in_out(module)
        ka, kb = lora_suffixes(is_emb)
        A, B = take(remaining, source, path, (ka, kb))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] < 1 or A.shape[1] != n_in or B.shape != (n_out, A.shape[0]):
            raise AdapterWeightsError(
                f"{source}: module {path!r} expects {ka} of shape (r, {n_in}) and {kb} of shape ({n_out}, r) "
                f"with r >= 1, got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        r = A.shape[0]  # the tensors decide the rank (rank_pattern order is not reliable, see PEFT's sort_keys)
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        kw = adapter_kw(module)
        return dict(A=A.to(**kw), B=B.to(**kw), scaling=lora_scaling(r, alpha, config.use_rslora),
                    dropout_p=config.lora_dropout)

    def saved(self, layer, name, config, path):
        p = layer.adapter_params(name)
        A, B = (p[k].detach() for k in layer.param_dicts)
        return dict(zip(lora_suffixes(isinstance(layer, LoraEmbedding)), (A, B)))

    @staticmethod
    def delta_weight(layer: LoraLayer, name: str) -> torch.Tensor:
        """``scaling·B·A`` of adapter ``name``, in the orientation the base stores its weight
        ([out, in]; [in, out] for Conv1D; [num_embeddings, dim] for embeddings), float32
        (float64 for float64 adapters)."""
        A, B = layer.adapter_weights(name)
        f = torch.float64 if A.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            d = (B.detach().to(f) @ A.detach().to(f)) * layer.scaling[name]
        if isinstance(layer, LoraEmbedding) or getattr(layer, "is_conv1d", False):
            d = d.t()
        return d

    def merge(self, layer, names, sign, acc, bias):
        for n in names:
            acc += sign * self.delta_weight(layer, n).to(device=acc.device, dtype=acc.dtype)
        return acc, bias

    def combine(self, config, configs, layers, adapters, weights, options):
        """Per layer, over the source adapters that layer carries (``s_i`` their scales):

        * ``"cat"``: A = [w_1·s_1·A_1; w_2·s_2·A_2; ...], B = [B_1, B_2, ...]: exactly
          Σ w_i·s_i·B_i·A_i, at rank Σ r_i (a layer missing an adapter keeps zero rows there);
        * ``"linear"``: A = Σ sign(w_i s_i)·√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i (equal ranks
          only): PEFT's cheap approximation, not the weighted sum of the deltas;
        * ``"svd"``: the rank-``svd_rank`` (default: the largest source rank) truncated SVD of
          Σ w_i·s_i·B_i·A_i, B = U·S, A = Vᴴ, optionally clamped at the ``svd_clamp`` quantile.

        The new adapter's scale is exactly 1: its config has ``lora_alpha = r`` and
        ``use_rslora = False``. (PEFT copies ``use_rslora`` from the first source, which
        scales the combined adapter by √r instead of 1 under rsLoRA.)"""
        combination_type = options["combination_type"]
        if combination_type not in COMBINATIONS:
            raise UnsupportedAdapterError(
                f"add_weighted_adapter: combination_type={combination_type!r} is not supported; use one of {COMBINATIONS}"
            )
        if len(adapters) == 1:
            combination_type = "linear"  # PEFT's rule: one adapter is simply rescaled
        ranks = {n: max([m.r[n] for _, m in layers if n in m.adapter_names], default=0) for n in adapters}
        if combination_type == "linear" and len(set(ranks.values())) != 1:
            raise AdapterConfigError(
                f"add_weighted_adapter: combination_type='linear' needs adapters of one rank, got {ranks}; "
                "use 'cat' (exact) or 'svd'"
            )
        rank = {"linear": max(ranks.values()), "cat": sum(ranks.values())}.get(combination_type)
        if rank is None:
            rank = options["svd_rank"] or max(ranks.values())
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False  # scale exactly 1
        config.rank_pattern, config.alpha_pattern = {}, {}
        out = []
        for path, m in layers:
            present = [(n, w) for n, w in zip(adapters, weights) if n in m.adapter_names]
            A, B = _factors(m, present, combination_type, rank, options["svd_clamp"], options["svd_full_matrices"],
                            options["svd_driver"])
            dt = m.adapter_weights(present[0][0])[0].dtype
            out.append((path, m, dict(A=A.to(dt).contiguous(), B=B.to(dt).contiguous(), scaling=1.0,
                                      dropout_p=config.lora_dropout)))
        return out

    def swap_slots(self, layer) -> tuple:
        """(kwargs key, parameter dict, rank along dim 0) of each tensor a hot-swap writes."""
        a, b = layer.param_dicts[:2]
        return ("A", a, True), ("B", b, False)

    def check_swap(self, layer, name, new, path, source):
        for key, dict_name, rows in self.swap_slots(layer):
            have = layer.adapter_params(name)[dict_name].shape[0 if rows else 1]
            got = new[key].shape[0 if rows else 1]
            if got > have:
                raise AdapterConfigError(
                    f"{source}: module {path!r} has rank {got} but adapter {name!r}'s slot holds "
                    f"rank {have}; load the first adapter at the largest rank you will swap in"
                )

    def swap(self, layer, name, new: Optional[dict]):
        """A smaller rank is zero-padded into the slot; a module the new adapter leaves
        alone gets zeros. The scale and dropout follow the new adapter."""
        params = layer.adapter_params(name)
        for key, dict_name, rows in self.swap_slots(layer):
            fill(params[dict_name], None if new is None else new[key], rows)
        if new is not None:
            layer.scaling[name] = new["scaling"]
            layer.dropout_p[name] = new["dropout_p"]


LORA = Lora()
