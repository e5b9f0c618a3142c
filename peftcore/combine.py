"""``add_weighted_adapter``: a new adapter made from weighted existing ones (PEFT's verb).

LoRA (per layer, over the source adapters that layer carries; ``s_i`` their scales):

* ``"cat"``: A = [w_1·s_1·A_1; w_2·s_2·A_2; ...], B = [B_1, B_2, ...]: exactly
  Σ w_i·s_i·B_i·A_i, at rank Σ r_i (a layer missing an adapter keeps zero rows there);
* ``"linear"``: A = Σ sign(w_i s_i)·√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i (equal ranks only):
  PEFT's cheap approximation, not the weighted sum of the deltas;
* ``"svd"``: the rank-``svd_rank`` (default: the largest source rank) truncated SVD of
  Σ w_i·s_i·B_i·A_i, B = U·S, A = Vᴴ, optionally clamped at the ``svd_clamp`` quantile.

The new adapter's scale is exactly 1: its config has ``lora_alpha = r`` and
``use_rslora = False``. (PEFT copies ``use_rslora`` from the first source, which scales the
combined adapter by √r instead of 1 under rsLoRA.) IA3: ``l = Σ w_i·l_i``, PEFT's weighted
sum. AdaLoRA adapters cannot be combined (as in PEFT).

The new adapter is frozen (as in PEFT) and becomes the active adapter (peftcore's rule for
every added adapter). Nothing is changed unless every check passes.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .api import Entry, Plan, check_name, check_not_merged, commit
from .config import IA3Config
from .errors import AdapterConfigError, AdapterNameError, UnsupportedAdapterError
from .layers import AdapterLayer, LoraLayer
from .state import require_state

COMBINATIONS = ("svd", "linear", "cat")


def _union(values: list, what: str):
    """PEFT's union of target (or feedforward) modules: sets joined, regexes OR-ed."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1:
        raise AdapterConfigError(f"add_weighted_adapter: the adapters' {what} mix lists and regex strings: {values}")
    if kinds == {str}:
        return "|".join(f"({v})" for v in values)
    return sorted({m for v in values if v for m in v})


def _lora_factors(layer: LoraLayer, present: list[tuple[str, float]], combination: str, rank: int,
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


def add_weighted_adapter(
    model: torch.nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
) -> None:
    """Add adapter ``adapter_name`` = the weighted combination of ``adapters`` (see the module
    docstring). ``combination_type``: "svd" (default, as PEFT), "linear" or "cat" for LoRA;
    ignored for IA3 (weighted sum). Raises (model unchanged) for unknown names, mixed
    methods, unequal ranks with "linear", or modules_to_save in the sources."""
    st = require_state(model)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise AdapterConfigError(
            f"add_weighted_adapter: give one weight per adapter (got {len(adapters)} adapters, {len(weights)} weights)"
        )
    unknown = [n for n in adapters if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"add_weighted_adapter: unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    check_name(model, adapter_name)
    check_not_merged(model, "add_weighted_adapter")
    configs = [st.configs[n] for n in adapters]
    kind = configs[0].peft_type
    if kind == "ADALORA":
        raise UnsupportedAdapterError("add_weighted_adapter: AdaLoRA adapters cannot be combined (as in PEFT)")
    with_mts = [n for n, c in zip(adapters, configs) if c.modules_to_save]
    if with_mts:
        raise UnsupportedAdapterError(
            f"add_weighted_adapter: adapter(s) {with_mts} have modules_to_save, which peftcore does not combine yet"
        )
    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, AdapterLayer) and any(n in m.adapter_names for n in adapters)]
    config = copy.deepcopy(configs[0])
    config.target_modules = _union([c.target_modules for c in configs], "target_modules")
    plan = Plan(adapter_name, config, config.target_modules)

    if isinstance(config, IA3Config):
        config.feedforward_modules = _union([c.feedforward_modules for c in configs], "feedforward_modules")
        for path, m in layers:
            l = sum(w * m.ia3_l[n].detach() for n, w in zip(adapters, weights) if n in m.adapter_names)  # noqa: E741
            plan.lora.append(Entry(path, m, dict(l=l.clone())))
    else:
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
            rank = svd_rank or max(ranks.values())
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False  # scale exactly 1
        config.rank_pattern, config.alpha_pattern = {}, {}
        for path, m in layers:
            present = [(n, w) for n, w in zip(adapters, weights) if n in m.adapter_names]
            A, B = _lora_factors(m, present, combination_type, rank, svd_clamp, svd_full_matrices, svd_driver)
            dt = m.adapter_weights(present[0][0])[0].dtype
            plan.lora.append(Entry(path, m, dict(A=A.to(dt).contiguous(), B=B.to(dt).contiguous(), scaling=1.0,
                                                  dropout_p=config.lora_dropout)))
    commit(model, plan, trainable=False)
