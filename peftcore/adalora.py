"""AdaLoRA training: rank allocation (``update_and_allocate``) and the orthogonal
regularization term (``adalora_orthogonal_loss``), with PEFT 0.21's schedule and numerics.

AdaLoRA trains ``init_r`` singular triplets (row ``i`` of ``lora_A``, entry ``i`` of
``lora_E``, column ``i`` of ``lora_B``) per adapted matrix and prunes them down to an
average of ``target_r`` by zeroing entries of ``lora_E``. A manual training loop::

    for step, batch in enumerate(loader):           # step counts from 0
        loss = model(**batch).loss                  # the model computes the loss (labels given)
        loss = loss + adalora_orthogonal_loss(model)
        loss.backward()
        optimizer.step()
        update_and_allocate(model, step)            # grads must still be there
        optimizer.zero_grad()

(with the transformers ``Trainer``, ``peftcore.trainer.AdaLoraCallback`` does both).

The schedule, per call with ``global_step = t`` and ``T = total_step - tfinal``:

* ``t < T``: update the importance statistics of every ``lora_A`` / ``lora_B`` /
  ``lora_E`` element of the trainable AdaLoRA adapter (``ipt = |p · grad|``, an EMA ``Ī``
  with ``beta1`` and an EMA ``Ū`` of ``|ipt - Ī|`` with ``beta2``; element score
  ``Ī · Ū``). For ``t <= tinit`` nothing is masked. Otherwise, when ``t % deltaT == 0``,
  the budget is ``int((init_bgt - target_bgt) · (1 - (t - tinit) / (T - tinit))³ +
  target_bgt)`` and the ``init_bgt - budget`` triplets with the lowest scores
  (``score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)``; every triplet whose score
  is <= the threshold, ties included) get ``E_i = 0``; the kept/pruned mask goes to the
  adapter's ``config.rank_pattern``.
* ``t == T``: a final mask at budget ``target_bgt`` from the statistics so far (not
  updated at this step), stored in ``config.rank_pattern``; the statistics are dropped.
* ``t > T``: the stored ``rank_pattern`` is applied again (the optimizer may have moved
  pruned entries of E away from 0).

``init_bgt`` is the number of triplets the adapter has (``Σ init_r``) and ``target_bgt``
is ``target_r`` times the number of adapted matrices. ``rank_pattern`` keys are the
module path relative to the model plus ``.lora_E`` (the form PEFT writes to disk), the
values one bool per triplet (True = kept). Layers are not resized during training; a
saved adapter holds only the kept triplets.

The statistics live in ``model.__dict__`` (not a module, not saved with the model; as in
PEFT, they are not part of a checkpoint either).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import AdaLoraConfig
from .errors import PeftcoreError
from .state import get_state

__all__ = ["adalora_orthogonal_loss", "update_and_allocate"]

_ALLOC_ATTR = "_peftcore_adalora"
_KINDS = ("lora_A", "lora_B", "lora_E")


@dataclass
class _Allocator:
    """Rank-allocation state of one AdaLoRA adapter (PEFT's ``RankAllocator``)."""

    config: AdaLoraConfig
    init_bgt: int
    target_bgt: int
    exp_avg_ipt: dict = field(default_factory=dict)  # parameter name -> tensor like the parameter
    exp_avg_unc: dict = field(default_factory=dict)
    budget: int | None = None  # the budget of the last call (for inspection)

    def reset(self) -> None:
        self.exp_avg_ipt = {}
        self.exp_avg_unc = {}


def _adapter_params(model: nn.Module, name: str) -> list[tuple[str, str, str, nn.Parameter]]:
    """``(param name, module path, kind, param)`` for every lora_A / lora_B / lora_E of
    adapter ``name``, in ``model.named_parameters()`` order (PEFT's summation order)."""
    out = []
    for n, p in model.named_parameters():
        parts = n.rsplit(".", 2)
        if len(parts) == 3 and parts[2] == name and parts[1] in _KINDS:
            out.append((n, parts[0], parts[1], p))
    return out


def trainable_adalora(model: nn.Module, caller: str) -> tuple[str, AdaLoraConfig, list]:
    """The one AdaLoRA adapter of ``model`` whose parameters require grad (PEFT trains
    exactly one AdaLoRA adapter at a time)."""
    st = get_state(model)
    configs = st.configs if st is not None else {}
    ada = [n for n, c in configs.items() if isinstance(c, AdaLoraConfig)]
    if not ada:
        loaded = f"its adapters: {sorted(configs)}" if configs else "it has no peftcore adapters"
        raise PeftcoreError(
            f"{caller}: {type(model).__name__} has no AdaLoRA adapter ({loaded}); "
            "add one with peftcore.add_adapter(model, peftcore.AdaLoraConfig(...))"
        )
    trainable = []
    params = {}
    for n in ada:
        ps = _adapter_params(model, n)
        params[n] = ps
        if any(p.requires_grad for *_, p in ps):
            trainable.append(n)
    if len(trainable) != 1:
        if not trainable:
            why = f"none of the AdaLoRA adapters {sorted(ada)} is trainable (their parameters do not require grad)"
        else:
            why = (f"several AdaLoRA adapters are trainable: {sorted(trainable)}; AdaLoRA allocates ranks "
                   "for exactly one (freeze the others)")
        raise PeftcoreError(f"{caller}: {why}")
    name = trainable[0]
    return name, configs[name], params[name]


def _check_hyper(config: AdaLoraConfig, name: str, caller: str) -> None:
    for h in ("beta1", "beta2"):
        v = getattr(config, h)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
            raise PeftcoreError(f"{caller}: adapter {name!r} has {h}={v!r}; it must be in (0, 1)")
    ts = config.total_step
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        raise PeftcoreError(f"{caller}: adapter {name!r} needs total_step > 0, got {ts!r}")
    if config.tinit >= ts - config.tfinal:
        raise PeftcoreError(
            f"{caller}: adapter {name!r}: tinit={config.tinit}, tfinal={config.tfinal}, total_step={ts} "
            "leave no budgeting phase (need tinit < total_step - tfinal)"
        )


def _allocator(model: nn.Module, name: str, config: AdaLoraConfig, params: list) -> _Allocator:
    store = model.__dict__.setdefault(_ALLOC_ATTR, {})
    alloc = store.get(name)
    # A new allocator when the adapter was (re)created under this name.
    if alloc is None or alloc.config is not config:
        init_bgt = sum(p.shape[0] for _, _, kind, p in params if kind == "lora_A")
        n_mats = len({path for _, path, kind, _ in params if kind == "lora_A"})
        alloc = _Allocator(config=config, init_bgt=init_bgt, target_bgt=config.target_r * n_mats)
        store[name] = alloc
    return alloc


def _budget_schedule(alloc: _Allocator, step: int) -> tuple[int, bool]:
    c = alloc.config
    tinit, tfinal, total = c.tinit, c.tfinal, c.total_step
    if step <= tinit:
        return alloc.init_bgt, False
    if step > total - tfinal:
        return alloc.target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((alloc.init_bgt - alloc.target_bgt) * (mul_coeff**3) + alloc.target_bgt)
    return budget, step % c.deltaT == 0


@torch.no_grad()
def _update_ipt(alloc: _Allocator, params: list) -> None:
    b1, b2 = alloc.config.beta1, alloc.config.beta2
    for n, _, _, p in params:
        if n not in alloc.exp_avg_ipt:
            alloc.exp_avg_ipt[n] = torch.zeros_like(p)
            alloc.exp_avg_unc[n] = torch.zeros_like(p)
        ipt = (p * p.grad).abs().detach()
        avg = b1 * alloc.exp_avg_ipt[n] + (1 - b1) * ipt
        alloc.exp_avg_ipt[n] = avg
        alloc.exp_avg_unc[n] = b2 * alloc.exp_avg_unc[n] + (1 - b2) * (ipt - avg).abs()


@torch.no_grad()
def _mask_to_budget(alloc: _Allocator, params: list, budget: int) -> dict:
    """Zero the E entries of the lowest-scoring triplets; return the rank pattern."""
    parts: dict[str, dict[str, torch.Tensor]] = {}  # module path -> {kind: score}, first-seen order
    for n, path, kind, _ in params:
        if n not in alloc.exp_avg_ipt:
            raise PeftcoreError(
                f"update_and_allocate: no importance statistics for {n} (the allocation state was reset or "
                "the step numbers are out of order)"
            )
        score = alloc.exp_avg_ipt[n] * alloc.exp_avg_unc[n]
        if kind == "lora_A":
            score = torch.mean(score, dim=1, keepdim=True)
        elif kind == "lora_B":
            score = torch.mean(score, dim=0, keepdim=False).view(-1, 1)
        parts.setdefault(path, {})[kind] = score
    triplet = {}
    for path, s in parts.items():
        ab = torch.cat([s["lora_A"], s["lora_B"]], dim=1).sum(dim=1, keepdim=False)
        triplet[path] = (s["lora_E"].view(-1) + ab.view(-1)).view(-1, 1)
    k = alloc.init_bgt - budget
    if k >= 1:
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=k)[0].item()
    else:
        # budget >= the number of triplets (target_r >= init_r): nothing to prune.
        # (PEFT's kthvalue fails here with k <= 0.)
        threshold = float("-inf")
    pattern = {}
    for n, path, kind, p in params:
        if kind == "lora_E":
            pruned = triplet[path] <= threshold
            p.masked_fill_(pruned, 0.0)
            pattern[f"{path}.lora_E"] = (~pruned).view(-1).tolist()
    return pattern


@torch.no_grad()
def _apply_pattern(name: str, config: AdaLoraConfig, params: list) -> None:
    pattern = config.rank_pattern
    if not pattern:
        raise PeftcoreError(
            f"update_and_allocate: adapter {name!r} has no rank_pattern to re-apply after step "
            f"total_step - tfinal = {config.total_step - config.tfinal}; the final allocation happens when "
            "update_and_allocate is called with exactly that step (call it at every step from 0)"
        )
    for n, path, kind, p in params:
        if kind != "lora_E":
            continue
        key = f"{path}.lora_E"
        mask = pattern.get(key, pattern.get(f"{path}.lora_E.{name}"))
        if mask is None:
            raise PeftcoreError(f"update_and_allocate: adapter {name!r}: rank_pattern has no entry {key!r}")
        if len(mask) != p.shape[0]:
            if sum(bool(b) for b in mask) == p.shape[0]:
                continue  # the layer already holds only the kept triplets (a pruned, reloaded adapter)
            raise PeftcoreError(
                f"update_and_allocate: adapter {name!r}: rank_pattern[{key!r}] has {len(mask)} entries but "
                f"{n} has {p.shape[0]} rows"
            )
        keep = torch.tensor(mask, dtype=torch.bool, device=p.device).unsqueeze(-1)
        p.masked_fill_(~keep, 0.0)


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """One step of AdaLoRA rank allocation for the model's trainable AdaLoRA adapter
    (PEFT's ``AdaLoraModel.update_and_allocate``; see the module docstring for the schedule).

    Call it at every training step, after ``loss.backward()`` and ``optimizer.step()`` and
    before ``optimizer.zero_grad()``, with ``global_step`` counting optimizer steps from 0.
    The mask is written into ``lora_E`` and into the adapter config's ``rank_pattern``
    (which ``peftcore.save_pretrained`` uses to write only the kept triplets)."""
    caller = "update_and_allocate"
    try:
        if isinstance(global_step, bool):
            raise TypeError
        global_step = operator.index(global_step)
    except TypeError:
        raise PeftcoreError(f"{caller}: global_step must be an integer, got {global_step!r}") from None
    if global_step < 0:
        raise PeftcoreError(f"{caller}: global_step must be >= 0, got {global_step}")
    name, config, params = trainable_adalora(model, caller)
    _check_hyper(config, name, caller)
    alloc = _allocator(model, name, config, params)
    final = config.total_step - config.tfinal

    if global_step < final:
        missing = [n for n, *_, p in params if p.grad is None]
        if missing:
            raise PeftcoreError(
                f"{caller}: {len(missing)} parameter(s) of AdaLoRA adapter {name!r} have no gradient (e.g. "
                f"{missing[0]}); call it after loss.backward() and optimizer.step(), before zero_grad()"
            )
        _update_ipt(alloc, params)
        budget, mask_ind = _budget_schedule(alloc, global_step)
        alloc.budget = budget
        if mask_ind:
            config.rank_pattern = _mask_to_budget(alloc, params, budget)
    elif global_step == final:
        budget, _ = _budget_schedule(alloc, global_step)
        alloc.budget = budget
        config.rank_pattern = _mask_to_budget(alloc, params, budget)
        alloc.reset()
    else:
        alloc.budget = alloc.target_bgt
        _apply_pattern(name, config, params)


def adalora_orthogonal_loss(model: nn.Module) -> torch.Tensor:
    """``orth_reg_weight · mean_P ‖P·Pᵀ − I‖_F`` over the trainable AdaLoRA adapter's
    ``lora_A`` (``P·Pᵀ``) and ``lora_B`` (``Pᵀ·P``) parameters: the term PEFT adds to the
    loss the model computed (``AdaLoraModel.forward``). A 0-d tensor (zero if the adapter
    has no such parameters); add it to the loss before ``backward()``."""
    caller = "adalora_orthogonal_loss"
    name, config, params = trainable_adalora(model, caller)
    w = config.orth_reg_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise PeftcoreError(f"{caller}: adapter {name!r} has orth_reg_weight={w!r}; it must be >= 0")
    total = None
    count = 0
    for _, _, kind, p in params:
        if kind == "lora_E":
            continue
        cov = p @ p.T if kind == "lora_A" else p.T @ p
        eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
        term = torch.norm(cov - eye, p="fro")
        total = term if total is None else total + term
        count += 1
    if count == 0:
        ref = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32, device=ref.device if ref is not None else None)
    return w * (total / count)
