"""AdaLoRA (``peft_type`` "ADALORA"): LoRA in SVD form, y = base(x) + s·((x·Aᵀ) ⊙ Eᵀ)·Bᵀ
with s = alpha / (ranknum + 1e-5), ranknum = init_r; rank allocation zeroes entries of
E during training (``peftcore/adalora.py``).

On-disk keys: ``<module>.lora_A`` (r, in), ``.lora_B`` (out, r), ``.lora_E`` (r, 1), no
``.weight``; files written after rank allocation hold the kept triplets only (the
``rank_pattern`` masks), and older files a ``.ranknum`` entry. Layers: ``AdaLoraLinear``
/ ``AdaLoraLinear4bit`` / ``AdaLoraLinear8bit``: the LoRA layers with E passed to the ops
as ``lora_E``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import peft_format
from ..errors import AdapterWeightsError, UnsupportedAdapterError
from ..layers import AdaLoraLinear, AdaLoraLinear4bit, AdaLoraLinear8bit, adalora_scaling
from .base import adapter_kw, shape_in_out, take
from .lora import Lora

SUFFIXES = ("lora_A", "lora_B", "lora_E")  # plain parameters: no '.weight'


# PEFT's AdaLoRA defaults for target_modules=None, per transformers model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class AdaLora(Lora):
    peft_type = "ADALORA"
    default_targets = DEFAULT_TARGETS
    label = "AdaLoRA"
    on_embeddings = False
    trains_alone = True
    layers = {"4bit": AdaLoraLinear4bit, "8bit": AdaLoraLinear8bit, None: AdaLoraLinear}

    def new(self, config, path, module, feedforward):
        # PEFT's order of random draws (A, E, B, then the ranknum placeholder), so a seeded
        # run starts from PEFT's weights; with init_lora_weights E = 0 (the model is
        # unchanged) and A, B ~ N(0, 0.02).
        n_in, n_out, _ = shape_in_out(module)
        r = config.init_r
        A, E, B = torch.randn(r, n_in), torch.randn(r, 1), torch.randn(n_out, r)
        torch.randn(1)
        if config.init_lora_weights:
            E.zero_()
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        kw = adapter_kw(module)
        A, E, B = (t.to(**kw) for t in (A, E, B))
        return dict(A=A, B=B, E=E, scaling=adalora_scaling(config.lora_alpha, r, r), dropout_p=config.lora_dropout,
                    ranknum=float(r))

    def bind(self, config, path, module, feedforward, remaining, source):
        """Kept triplets only (rank = the mask's count, possibly 0), keys without '.weight',
        and (older PEFT) a ``ranknum`` entry."""
        n_in, n_out, _ = shape_in_out(module)
        ka, kb, ke = SUFFIXES
        A, B, E = take(remaining, source, path, SUFFIXES)
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != n_in or B.shape != (n_out, r) or E.shape != (r, 1):
            raise AdapterWeightsError(
                f"{source}: module {path!r} expects {ka} (r, {n_in}), {kb} ({n_out}, r) and {ke} (r, 1), "
                f"got {tuple(A.shape)}, {tuple(B.shape)} and {tuple(E.shape)}"
            )
        mask = config.pattern_mask(path)
        if mask is not None and r != sum(mask):
            if r != len(mask):
                raise AdapterWeightsError(
                    f"{source}: module {path!r} has rank {r}, but its rank_pattern keeps {sum(mask)} of {len(mask)}"
                )
            keep = torch.tensor(mask)  # a file saved before pruning: keep the pattern's triplets
            A, E, B = A[keep], E[keep], B[:, keep]
            r = int(keep.sum())
        ranknum = float(config.init_r)
        legacy = remaining.pop(f"{path}.ranknum", None)
        if legacy is not None:
            if legacy.numel() != 1:
                raise AdapterWeightsError(
                    f"{source}: {peft_format.PREFIX}{path}.ranknum has shape {tuple(legacy.shape)}, expected (1,)"
                )
            ranknum = float(legacy.reshape(()))
        kw = adapter_kw(module)
        return dict(A=A.to(**kw), B=B.to(**kw), E=E.to(**kw), scaling=adalora_scaling(config.lora_alpha, r, ranknum),
                    dropout_p=config.lora_dropout, ranknum=ranknum)

    def saved(self, layer, name, config, path):
        p = layer.adapter_params(name)
        A, B, E = (p[k].detach() for k in SUFFIXES)
        mask = config.pattern_mask(path)
        if mask is not None and len(mask) == A.shape[0] and sum(mask) != A.shape[0]:
            # PEFT writes the kept triplets only (resize_state_dict_by_rank_pattern).
            keep = torch.tensor(mask, device=A.device)
            A, E, B = A[keep], E[keep], B[:, keep]
        return dict(zip(SUFFIXES, (A, B, E)))

    def combine(self, config, configs, layers, adapters, weights, options):
        raise UnsupportedAdapterError("add_weighted_adapter: AdaLoRA adapters cannot be combined (as in PEFT)")

    def swap_slots(self, layer):
        return ("A", "lora_A", True), ("E", "lora_E", True), ("B", "lora_B", False)

    def swap(self, layer, name, new):
        super().swap(layer, name, new)
        if new is not None:
            layer.ranknum[name].fill_(new["ranknum"])


ADALORA = AdaLora()
