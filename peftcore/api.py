"""The public verbs: load, add, delete, save, from_pretrained, trainable-parameter counts.

Every change to a model goes through two steps: a *plan* that reads and checks everything
(files, keys, shapes, dtypes, names, targets) without touching the model, and a *commit*
that only assigns prepared objects and keeps an undo log. A failed load therefore leaves
the model exactly as it was.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from . import hub, inject, merge, peft_format
from .config import CONFIG_NAME, AdapterConfig
from .errors import AdapterConfigError, AdapterNameError, AdapterWeightsError, PeftcoreError, UnsupportedAdapterError
from .layers import AdapterLayer, Conv1D, ModulesToSaveWrapper
from .methods import method_for
from .methods.base import base_weight
from .state import apply_state, drop_state, get_state
from .switching import after_delete

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_RESERVED = {"__base__"}


def check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"adapter name must be a non-empty string, got {name!r}")
    if not _NAME_RE.fullmatch(name) or name in _RESERVED:
        raise AdapterNameError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' (no '.', '/' or spaces)"
        )
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise AdapterNameError(f"adapter name {name!r} clashes with a torch.nn attribute name")
    st = get_state(model)
    if st is not None and name in st.configs:
        raise AdapterNameError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")


@dataclass
class Entry:
    path: str
    module: nn.Module  # what is at `path` now (a plain module, or an AdapterLayer)
    add_kwargs: dict  # the layer's add(name, **add_kwargs): tensors and per-adapter values
    feedforward: bool = False  # IA3: input scaling (fixed when the layer is created)


@dataclass
class Plan:
    name: str
    config: AdapterConfig
    targets: object
    lora: list[Entry] = field(default_factory=list)
    mts: list[tuple[str, nn.Module, nn.Module]] = field(default_factory=list)  # path, current, new copy
    writes: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # key, param, value


def _adapter_dtype(add_kwargs: dict, module: nn.Module, autocast: bool) -> dict:
    """PEFT's ``autocast_adapter_dtype``. True (its default): adapters of fp16 / bf16 bases are
    float32, as the methods create and bind them. False: they take the base's dtype (half
    the bytes at decode; the kernels still accumulate in float32). Bases whose weight is
    not a float (bitsandbytes) keep float32 adapters either way, as in PEFT."""
    dt = base_weight(module).dtype
    if autocast or dt not in (torch.float16, torch.bfloat16):
        return add_kwargs
    return {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in add_kwargs.items()}


def _prepare_config(model: nn.Module, config: AdapterConfig, found) -> AdapterConfig:
    """PEFT rewrites some fields when it injects: resolved targets (and IA3's feedforward
    modules), and fan_in_fan_out forced to match the layer type (True for Conv1D). The
    rewritten config is what is saved."""
    config = copy.deepcopy(config)
    if config.target_modules is None or (
        isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    ):
        config.target_modules = inject.resolve_target_modules(model, config, method_for(config.peft_type))
    method_for(config.peft_type).prepare_config(model, config)
    conv1d = any(
        bool(Conv1D) and isinstance(m.base_layer if isinstance(m, AdapterLayer) else m, Conv1D) for _, m in found
    )
    config.fan_in_fan_out = conv1d
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return config


def plan_new(model: nn.Module, name: str, config: AdapterConfig, autocast_adapter_dtype: bool = True) -> Plan:
    targets, found = inject.find_targets(model, config, method_for(config.peft_type))
    plan = Plan(name, _prepare_config(model, config, found), targets)
    method = method_for(config.peft_type)
    for path, module in found:
        ff = method.feedforward(plan.config, path, module)
        kw = _adapter_dtype(method.new(plan.config, path, module, ff), module, autocast_adapter_dtype)
        plan.lora.append(Entry(path, module, kw, ff))
    _plan_modules_to_save(model, plan, None, None)
    if config.modules_to_save and not plan.mts:
        raise AdapterConfigError(f"modules_to_save={config.modules_to_save!r} matched no module")
    return plan


def _plan_modules_to_save(model: nn.Module, plan: Plan, remaining: Optional[dict], source: Optional[str]) -> None:
    """A fresh copy of each modules_to_save module; when loading (``remaining``: the file's
    unbound tensors) filled from the file's tensors, which are taken out of ``remaining``."""
    for path, module in inject.find_modules_to_save(model, plan.config.modules_to_save):
        src = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        new = copy.deepcopy(src)
        if remaining is not None:
            want = new.state_dict()
            prefix = path + "."
            got = {k[len(prefix):]: remaining.pop(k) for k in [k for k in remaining if k.startswith(prefix)]}
            if set(got) != set(want):
                raise AdapterWeightsError(
                    f"{source}: modules_to_save module {path!r} needs tensors {sorted(prefix + k for k in want)}, "
                    f"file has {sorted(prefix + k for k in got)}"
                )
            for k, t in got.items():
                if t.shape != want[k].shape:
                    raise AdapterWeightsError(
                        f"{source}: {prefix + k} has shape {tuple(t.shape)}, module expects {tuple(want[k].shape)}"
                    )
            new.load_state_dict({k: t.to(want[k].dtype) for k, t in got.items()})
        plan.mts.append((path, module, new))


def plan_load(model: nn.Module, name: str, config: AdapterConfig, sd: dict, source: str,
              autocast_adapter_dtype: bool = True) -> Plan:
    """Bind every tensor of ``sd`` (prefix already stripped) to the model, or raise."""
    targets, found = inject.find_targets(model, config, method_for(config.peft_type))
    plan = Plan(name, _prepare_config(model, config, found), targets)
    remaining = dict(sd)

    method = method_for(config.peft_type)
    for path, module in found:
        ff = method.feedforward(plan.config, path, module)
        kw = method.bind(plan.config, path, module, ff, remaining, source)
        plan.lora.append(Entry(path, module, _adapter_dtype(kw, module, autocast_adapter_dtype), ff))
    _plan_modules_to_save(model, plan, remaining, source)

    # Remaining keys must be base tensors the config says the adapter carries.
    if remaining:
        canonical = {}
        for k, p in model.named_parameters():
            if ".lora_" in k or ".modules_to_save." in k:
                continue
            canonical[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = p
        target_paths = {p for p, _ in found}
        emb_paths = set()
        if peft_format.embedding_is_targeted(model, plan.config, targets):
            emb_paths = {p for p, m in found if re.match(rf"(.*\.)?({'|'.join(peft_format.EMBEDDING_LAYER_NAMES)})$", p)}
        bias = getattr(config, "bias", "none")
        for k in list(remaining):
            ck = k.replace(".base_layer.", ".")
            owner = ck.rpartition(".")[0]
            allowed = (
                (bias == "all" and ck.endswith(".bias"))
                or (bias == "lora_only" and ck.endswith(".bias") and owner in target_paths)
                or (".base_layer." in k and owner in emb_paths)
            )
            p = canonical.get(ck)
            if not allowed or p is None:
                continue
            t = remaining.pop(k)
            if t.shape != p.shape:
                raise AdapterWeightsError(f"{source}: {k} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            plan.writes.append((k, p, t.to(dtype=p.dtype, device=p.device)))
    if remaining:
        keys = sorted(remaining)
        raise AdapterWeightsError(
            f"{source}: {len(keys)} tensor(s) bind to nothing in {type(model).__name__} "
            f"under this adapter_config (target_modules={plan.config.target_modules!r}, bias={getattr(config, 'bias', 'none')!r}, "
            f"modules_to_save={config.modules_to_save!r}): {[peft_format.PREFIX + k for k in keys[:5]]}"
            + (" ..." if len(keys) > 5 else "")
        )
    return plan


def commit(model: nn.Module, plan: Plan, *, trainable: bool) -> None:
    """Apply a checked plan; on any exception undo every step taken, in reverse."""
    undo: list = []
    st = get_state(model, create=True)
    try:
        for e in plan.lora:
            layer = e.module
            if not isinstance(layer, AdapterLayer):
                layer = inject.new_wrapper(e.module, base_weight(e.module).device,
                                           method_for(plan.config.peft_type), e.feedforward)
                parent, child = inject.get_parent(model, e.path)
                setattr(parent, child, layer)
                undo.append(lambda p=parent, c=child, m=e.module: setattr(p, c, m))
            layer.add(plan.name, **e.add_kwargs)
            undo.append(lambda l=layer: l.remove(plan.name))
        for path, current, new in plan.mts:
            wrapper = current
            if not isinstance(current, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(current)
                parent, child = inject.get_parent(model, path)
                setattr(parent, child, wrapper)
                undo.append(lambda p=parent, c=child, m=current: setattr(p, c, m))
            wrapper.modules_to_save[plan.name] = new
            undo.append(lambda w=wrapper: w.modules_to_save.pop(plan.name))
        with torch.no_grad():
            for _, p, value in plan.writes:
                old = p.detach().clone()
                p.copy_(value)
                undo.append(lambda p=p, old=old: torch.no_grad()(p.copy_)(old))
        changed = _mark_trainable(model, plan.name, plan.config, trainable)
        undo.append(lambda: [p.requires_grad_(not p.requires_grad) for p in changed])
        prev = (dict(st.configs), dict(st.targets), list(st.active))
        # configs restored in place: it is also the model's peft_config (state.get_state)
        undo.append(lambda: (st.configs.clear(), st.configs.update(prev[0]), setattr(st, "targets", prev[1]),
                             setattr(st, "active", prev[2])))
        plan.config.inference_mode = not trainable
        st.configs[plan.name] = plan.config
        st.targets[plan.name] = plan.targets
        st.active = [plan.name]  # transformers' behaviour: the new adapter is the active one
        apply_state(model, st)
    except BaseException:
        for fn in reversed(undo):
            fn()
        if st is not None and not st.configs:
            drop_state(model)
        else:
            apply_state(model, st)
        raise


def _mark_trainable(model: nn.Module, name: str, config: AdapterConfig, trainable: bool) -> list[nn.Parameter]:
    """PEFT's rule on every add / load: the base model is frozen, other adapters keep
    their flags, and when ``trainable`` adapter ``name`` trains: its LoRA factors, its
    modules_to_save copies and the biases ``config.bias`` names. Returns the parameters
    whose flag it flipped (for the undo log)."""
    want: dict[int, bool] = {}
    params: dict[int, nn.Parameter] = {}
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, AdapterLayer)
                   for n in m.adapter_names for p in m.adapter_params(n).values()}
    bias = getattr(config, "bias", "none")
    for k, p in model.named_parameters():
        params[id(p)] = p
        if id(p) not in adapter_ids and ".modules_to_save." not in k:
            want[id(p)] = False
        if trainable and bias == "all" and k.endswith(".bias") and ".original_module." not in k:
            want[id(p)] = True
    if trainable:
        for m in model.modules():
            if isinstance(m, AdapterLayer) and name in m.adapter_names:
                for t in m.adapter_params(name).values():
                    want[id(t)] = True
                if bias == "lora_only" and getattr(m.base_layer, "bias", None) is not None:
                    want[id(m.base_layer.bias)] = True
            elif isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
                for t in m.modules_to_save[name].parameters():
                    want[id(t)] = True
    changed = [params[i] for i, f in want.items() if params[i].requires_grad != f]
    for p in changed:
        p.requires_grad_(not p.requires_grad)
    return changed


def check_not_merged(model: nn.Module, verb: str) -> None:
    merged = sorted(merge.merged_in(model))
    if merged:
        raise PeftcoreError(
            f"{verb}: adapter(s) {merged} are merged into the base weights; call peftcore.unmerge_adapter(model) first"
        )


# ====================================================================== public API
def _check_method(model: nn.Module, config: AdapterConfig, verb: str, trainable: bool) -> None:
    """Adapters on one model share a method (the transformers guide); only one AdaLoRA
    adapter trains at a time (PEFT's rule: rank allocation follows one adapter)."""
    st = get_state(model)
    if st is None or not st.configs:
        return
    other = {n: c.peft_type for n, c in st.configs.items() if c.peft_type != config.peft_type}
    if other:
        raise UnsupportedAdapterError(
            f"{verb}: the model has adapters of another method {other}; adapters on one model share a method, "
            f"so a {config.peft_type} adapter cannot be added (delete those first)"
        )
    method = method_for(config.peft_type)
    if trainable and method.trains_alone:
        busy = sorted({n for m in model.modules() if isinstance(m, AdapterLayer) for n in m.adapter_names
                       if any(p.requires_grad for p in m.adapter_params(n).values())})
        if busy:
            raise AdapterConfigError(
                f"{verb}: {method.label} adapter(s) {busy} are trainable; only one {method.label} adapter can "
                "train at a time "
                "(load this one with is_trainable=False, or delete the other first)"
            )


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *,
                autocast_adapter_dtype: bool = True) -> None:
    """Add a new, trainable adapter (``LoraConfig``, ``AdaLoraConfig`` or ``IA3Config``) with
    PEFT's initialisation and make it the active one.

    LoRA ``init_lora_weights``: True (A Kaiming-uniform, B zero: the model's output is
    unchanged until training), "gaussian" (A ~ N(0, 1/r)), False (random A and B, for
    tests). AdaLoRA: E = 0, A and B ~ N(0, 0.02) (False: all random), rank ``init_r``.
    IA3: vectors of ones (``init_ia3_weights=False``: random). As in PEFT, every parameter
    except this adapter's (and the biases / modules_to_save its config names) is frozen.
    All adapters on one model use one method. Raises (model unchanged) for invalid names
    or configs. The model keeps its training mode (new layers take their base module's).
    ``autocast_adapter_dtype`` (PEFT's): True keeps the adapter in float32 on fp16 / bf16
    bases; False in the base's dtype."""
    if not isinstance(config, AdapterConfig):
        raise AdapterConfigError(
            f"config must be a peftcore.LoraConfig, AdaLoraConfig or IA3Config, got {type(config).__name__}"
        )
    check_name(model, adapter_name)
    check_not_merged(model, "add_adapter")
    config.check_supported(new=True)
    _check_method(model, config, "add_adapter", True)
    plan = plan_new(model, adapter_name, config, autocast_adapter_dtype)
    commit(model, plan, trainable=True)


def load_adapter(
    model: nn.Module,
    path_or_repo_id: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    token=None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
) -> None:
    """Load a PEFT-saved adapter (LoRA, AdaLoRA or IA3) from a folder or a Hub repo id; it
    becomes the active adapter.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (else
    ``adapter_model.bin`` through ``torch.load(weights_only=True)``). Adapter tensors are kept
    in float32 (float64 on a float64 base), as PEFT does; ``autocast_adapter_dtype=False``
    (PEFT's flag) keeps them in the dtype of an fp16 / bf16 base instead. Each module's rank comes from its
    tensors (AdaLoRA: the kept triplets of ``rank_pattern``, possibly none). With
    ``is_trainable`` the adapter's parameters require grad, the rest of the model is frozen
    and the model keeps its training mode; otherwise they are frozen and the model is put
    in eval mode (as PEFT and transformers do), so LoRA dropout is off.

    Every failure raises a ``peftcore.PeftcoreError`` (a ``ValueError``) or
    ``AdapterFileNotFoundError`` (a ``FileNotFoundError``) naming the file, key or module,
    and leaves the model exactly as it was."""
    check_name(model, adapter_name)
    check_not_merged(model, "load_adapter")

    def resolve(filename, required):
        return hub.resolve_file(
            path_or_repo_id, filename, revision=revision, subfolder=subfolder, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only, required=required,
        )

    config_path = resolve(CONFIG_NAME, True)
    config = peft_format.read_config(config_path)
    try:
        config.check_supported()
        _check_method(model, config, "load_adapter", is_trainable)
    except PeftcoreError as e:
        raise type(e)(f"{config_path}: {e}") from None
    try:
        weights_path = peft_format.find_weights(resolve)
    except FileNotFoundError as e:
        raise type(e)(f"{path_or_repo_id}{'/' + subfolder if subfolder else ''}: {e}") from None
    sd = peft_format.strip_prefix(peft_format.read_weights(weights_path))
    try:
        plan = plan_load(model, adapter_name, config, sd, weights_path, autocast_adapter_dtype)
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{config_path}: {e}") from None
    commit(model, plan, trainable=is_trainable)
    if not is_trainable:
        model.eval()  # loaded for inference (PEFT and transformers do the same): no dropout


def load_adapter_state_dict(model: nn.Module, config: AdapterConfig, state_dict: dict, adapter_name: str = "default",
                            *, is_trainable: bool = False, autocast_adapter_dtype: bool = True) -> None:
    """``load_adapter`` from tensors in memory: ``config`` and a state dict under PEFT's keys
    (with or without the ``base_model.model.`` prefix), e.g. transformers'
    ``load_adapter(peft_config=..., adapter_state_dict=...)``. The same checks, errors and
    all-or-nothing commit as a load from files."""
    check_name(model, adapter_name)
    check_not_merged(model, "load_adapter")
    config.check_supported()
    _check_method(model, config, "load_adapter", is_trainable)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterWeightsError("adapter_state_dict must be a dict of tensors")
    sd = peft_format.strip_prefix(dict(state_dict))
    plan = plan_load(model, adapter_name, config, sd, "adapter_state_dict", autocast_adapter_dtype)
    commit(model, plan, trainable=is_trainable)
    if not is_trainable:
        model.eval()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter; modules left with no adapter get their original module back.

    If it was active, the other active adapters stay; if none is left, the alphabetically
    first remaining adapter is activated (PEFT's rule). Biases it wrote stay (as in PEFT)."""
    st = get_state(model)
    if st is None or adapter_name not in st.configs:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; loaded: {sorted(st.configs) if st else []}")
    if st.mixed is not None and adapter_name in st.mixed:
        raise PeftcoreError(f"adapter {adapter_name!r} is used by the open peftcore.mixed_batch; delete it after the block")
    merged_in = merge.merged_in(model).get(adapter_name)
    if merged_in:
        raise PeftcoreError(
            f"adapter {adapter_name!r} is merged into {merged_in[0]!r}" + (f" and {len(merged_in) - 1} more" if len(merged_in) > 1 else "")
            + "; call peftcore.unmerge_adapter(model) before deleting it"
        )
    for path, m in list(model.named_modules()):
        if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names:
            m.remove(adapter_name)
            if not m.adapter_names:
                parent, child = inject.get_parent(model, path)
                setattr(parent, child, m.base_layer)
        elif isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            m.modules_to_save.pop(adapter_name)
            if not len(m.modules_to_save):
                parent, child = inject.get_parent(model, path)
                setattr(parent, child, m.original_module)
    del st.configs[adapter_name]
    del st.targets[adapter_name]
    if not st.configs:
        drop_state(model)
        return
    after_delete(model, st, adapter_name)


def get_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, under PEFT's on-disk keys
    (``base_model.model.<module>.lora_A.weight``, ``...ia3_l``, ...). Tensors are shared
    with the model, except AdaLoRA factors cut down to the ``rank_pattern``'s triplets."""
    st = get_state(model)
    if st is None or adapter_name not in st.configs:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; loaded: {sorted(st.configs) if st else []}")
    return peft_format.adapter_state_dict(model, adapter_name, st.configs[adapter_name], st.targets[adapter_name])


def save_pretrained(
    model: nn.Module, save_directory: Union[str, os.PathLike], adapter_names: Optional[list[str]] = None, *,
    root: str = "default",
) -> None:
    """Save adapters in PEFT's layout: ``root`` ("default") in ``save_directory``, every other
    adapter in ``save_directory/<name>/``, each as adapter_config.json +
    adapter_model.safetensors. Files are written to temporary names and renamed, so an
    interrupted save leaves no half-written adapter."""
    st = get_state(model)
    if st is None or not st.configs:
        raise PeftcoreError(f"{type(model).__name__} has no peftcore adapters to save")
    names = list(st.configs) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    save_directory = os.fspath(save_directory)
    for n in names:
        sd = get_adapter_state_dict(model, n)
        d = save_directory if n == root else os.path.join(save_directory, n)
        peft_format.write_adapter(d, st.configs[n], sd)


_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def from_pretrained(path_or_repo_id, *, model_class=None, adapter_name: str = "default", **base_kwargs):
    """Load the base model an adapter was trained on, then the adapter.

    The base comes from ``base_model_name_or_path`` (at the config's ``revision``) through
    transformers: ``model_class`` if given, else the Auto class for ``task_type``, else the
    class in ``auto_mapping``, else ``AutoModelForCausalLM``. ``base_kwargs`` (``torch_dtype``,
    ``device_map``, ``quantization_config``, ...) go to the base's ``from_pretrained``, where
    ``load_in_8bit=True`` / ``load_in_4bit=True`` become a transformers ``BitsAndBytesConfig``
    (transformers 5 no longer takes them bare; quantized bases must be on CPU, e.g.
    ``device_map="cpu"``); ``revision``, ``subfolder`` and
    ``is_trainable`` and ``autocast_adapter_dtype`` apply to the adapter, ``token``,
    ``cache_dir`` and ``local_files_only`` to both. Returns the model with the adapter active, in eval mode unless ``is_trainable``."""
    import transformers

    hub_kw = {k: base_kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in base_kwargs}
    revision = base_kwargs.pop("revision", None)
    subfolder = base_kwargs.pop("subfolder", None)
    is_trainable = base_kwargs.pop("is_trainable", False)
    autocast = base_kwargs.pop("autocast_adapter_dtype", True)
    config_path = hub.resolve_file(path_or_repo_id, CONFIG_NAME, revision=revision, subfolder=subfolder, **hub_kw)
    config = peft_format.read_config(config_path)
    base_id = config.base_model_name_or_path
    if not base_id:
        raise AdapterConfigError(f"{config_path}: base_model_name_or_path is empty; load the base model yourself and call load_adapter")
    if model_class is None:
        cls_name = _TASK_CLASSES.get(config.task_type)
        if cls_name is None and config.auto_mapping and config.auto_mapping.get("base_model_class"):
            cls_name = config.auto_mapping["base_model_class"]
        model_class = getattr(transformers, cls_name or "AutoModelForCausalLM", None)
        if model_class is None:
            raise AdapterConfigError(f"{config_path}: transformers has no class {cls_name!r}")
    if config.revision is not None:
        base_kwargs.setdefault("revision", config.revision)
    _quantization_kwargs(base_kwargs)
    model = model_class.from_pretrained(base_id, **base_kwargs)
    load_adapter(
        model, path_or_repo_id, adapter_name, revision=revision, subfolder=subfolder, is_trainable=is_trainable,
        autocast_adapter_dtype=autocast, **hub_kw
    )
    return model


def _quantization_kwargs(base_kwargs: dict) -> None:
    """transformers 5 refuses the bare ``load_in_8bit`` / ``load_in_4bit`` kwargs (the
    model's __init__ gets them): turn them into a ``BitsAndBytesConfig``."""
    l8 = bool(base_kwargs.pop("load_in_8bit", False))
    l4 = bool(base_kwargs.pop("load_in_4bit", False))
    if not (l8 or l4):
        return
    if l8 and l4:
        raise PeftcoreError("from_pretrained: pass load_in_8bit=True or load_in_4bit=True, not both")
    if base_kwargs.get("quantization_config") is not None:
        raise PeftcoreError(
            "from_pretrained: pass either quantization_config or load_in_8bit / load_in_4bit, not both"
        )
    from transformers import BitsAndBytesConfig

    base_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=l8, load_in_4bit=l4)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted as PEFT does (every adapter, and both
    the original and the copies of modules_to_save, count in 'all')."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's line)."""
    t, a = get_nb_trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")
