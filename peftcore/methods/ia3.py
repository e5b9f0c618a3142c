"""(IA)³ (``peft_type`` "IA3"): each adapter is a vector l that scales a layer's output,
y = base(x) ⊙ l (bias included), or, for ``feedforward_modules``, its input,
y = base(x ⊙ l). Several active adapters multiply.

On-disk key: ``<module>.ia3_l``, (out, 1), or (1, in) for feedforward modules. Layers:
``Ia3Linear`` / ``Ia3Linear4bit`` / ``Ia3Linear8bit`` (the scaling inside the layer's op:
it is not a low-rank update, so IA3 keeps its own ops, ``ia3_linear*``).
"""
from __future__ import annotations

import torch

from .. import inject
from ..errors import AdapterConfigError, AdapterWeightsError
from ..layers import AdapterLayer, Ia3Linear, Ia3Linear4bit, Ia3Linear8bit, bnb_kind
from .base import Method, adapter_kw, shape_in_out, take, union_modules

SUFFIX = "ia3_l"


# PEFT's IA3 defaults for target_modules=None, per transformers model_type.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"],
    "bart": ["q_proj", "v_proj", "fc2"],
}
# The feedforward subset of DEFAULT_TARGETS (input scaling).
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "opt": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "gpt_neox": ["dense_4h_to_h"],
    "gptj": ["fc_out"],
    "falcon": ["dense_4h_to_h"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "t5": ["wo"],
    "bart": ["fc2"],
}


def resolve_feedforward_modules(model, config) -> object:
    """IA3's effective ``feedforward_modules``: as given, or (None) PEFT's per-architecture
    default, whatever target_modules is (PEFT's rule; [] means none)."""
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    mt = inject.model_type(model)
    if mt not in DEFAULT_FEEDFORWARD:
        raise AdapterConfigError(
            f"feedforward_modules is not set and peftcore knows no IA3 default for model_type={mt!r}; "
            "name them (an empty list for none)"
        )
    return list(DEFAULT_FEEDFORWARD[mt])


class Ia3(Method):
    peft_type = "IA3"
    default_targets = DEFAULT_TARGETS
    label = "IA3"
    layers = {"4bit": Ia3Linear4bit, "8bit": Ia3Linear8bit, None: Ia3Linear}

    def make_layer(self, module, feedforward):
        return self.layers[bnb_kind(module)](module, feedforward)

    def prepare_config(self, model, config):
        config.feedforward_modules = resolve_feedforward_modules(model, config)

    def feedforward(self, config, path, module):
        """Whether ``path`` scales its input; a layer that already has IA3 adapters keeps
        its kind, so a second adapter that disagrees is refused."""
        ff = inject.is_feedforward(config.feedforward_modules, path)
        if isinstance(module, AdapterLayer) and module.is_feedforward != ff:
            raise AdapterConfigError(
                f"module {path!r} scales its {'input' if module.is_feedforward else 'output'} for IA3 adapters "
                f"{module.adapter_names}, but this config makes it {'a feedforward' if ff else 'a non-feedforward'} "
                "module"
            )
        return ff

    def new(self, config, path, module, feedforward):
        n_in, n_out, _ = shape_in_out(module)
        l = torch.randn((1, n_in) if feedforward else (n_out, 1))  # noqa: E741  (PEFT draws, then fills ones)
        if config.init_ia3_weights:
            l.fill_(1.0)
        return dict(l=l.to(**adapter_kw(module)))

    def bind(self, config, path, module, feedforward, remaining, source):
        n_in, n_out, _ = shape_in_out(module)
        (l,) = take(remaining, source, path, (SUFFIX,))  # noqa: E741
        want = (1, n_in) if feedforward else (n_out, 1)
        if tuple(l.shape) != want:
            raise AdapterWeightsError(
                f"{source}: module {path!r} is {'a feedforward' if feedforward else 'a non-feedforward'} IA3 module "
                f"and expects {SUFFIX} of shape {want}, got {tuple(l.shape)}"
            )
        return dict(l=l.to(**adapter_kw(module)))

    def saved(self, layer, name, config, path):
        return {SUFFIX: layer.adapter_params(name)["ia3_l"].detach()}

    def merges_bias(self, layer):
        return not layer.is_feedforward

    def merge(self, layer, names, sign, acc, bias):
        """Multiply W (and, scaling the output, the bias) by l; unmerge divides by l + 1e-8,
        as PEFT (lossy where l ≈ 0)."""
        for n in names:
            l = layer.ia3_l[n].detach().to(device=acc.device, dtype=acc.dtype)  # noqa: E741
            if sign < 0:
                l = l + 1e-8  # noqa: E741
            lw = l.t() if layer.is_conv1d else l  # Conv1D stores W as (in, out)
            acc = acc * lw if sign > 0 else acc / lw
            if bias is not None:
                bias = bias * l.flatten() if sign > 0 else bias / l.flatten()
        return acc, bias

    def combine(self, config, configs, layers, adapters, weights, options):
        """PEFT's weighted sum of the vectors, l = Σ w_i·l_i (``combination_type`` is not read)."""
        config.feedforward_modules = union_modules([c.feedforward_modules for c in configs], "feedforward_modules")
        out = []
        for path, m in layers:
            l = sum(w * m.ia3_l[n].detach() for n, w in zip(adapters, weights) if n in m.adapter_names)  # noqa: E741
            out.append((path, m, dict(l=l.clone())))
        return out

    def check_swap(self, layer, name, new, path, source):
        if new["l"].shape != layer.ia3_l[name].shape:
            raise AdapterConfigError(
                f"{source}: module {path!r}: ia3_l of shape {tuple(new['l'].shape)} does not fit the slot "
                f"{tuple(layer.ia3_l[name].shape)}"
            )

    def swap(self, layer, name, new):
        # IA3 vectors multiply: "no adapter" is a vector of ones.
        slot = layer.adapter_params(name)["ia3_l"]
        slot.copy_(new["l"]) if new is not None else slot.fill_(1.0)


IA3 = Ia3()
