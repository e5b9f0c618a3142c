"""The transformers adapter API, run on peftcore: ``peftcore.patch_transformers()``.

After the call, the code of transformers' guide "Load adapters with PEFT" runs on peftcore
unchanged (``model.load_adapter(...)``, ``model.add_adapter(config)``, ``set_adapter``,
``enable_adapters`` / ``disable_adapters``, ``active_adapters``, ``save_pretrained``,
``AutoModelFor*.from_pretrained(adapter_folder)``), with or without PEFT installed.
``unpatch_transformers()`` puts every patched attribute back (the very same objects).

What is patched, and nothing else (``PATCHES`` lists it; the README repeats it):

* ``transformers.integrations.peft.PeftAdapterMixin`` (a base of every ``PreTrainedModel``):
  ``load_adapter``, ``add_adapter``, ``set_adapter``, ``enable_adapters``,
  ``disable_adapters``, ``active_adapters``, ``get_adapter_state_dict``, ``delete_adapter``,
  ``enable_peft_hotswap``; added: ``active_adapter`` (transformers 4's method, the first
  active adapter), and ``_hf_peft_config_loaded`` as a property answered from peftcore's
  state (transformers' Trainer and save paths read it). ``model.peft_config`` ({name:
  peftcore config}) is kept by peftcore's state for both APIs, patched or not.
* ``PreTrainedModel.save_pretrained``: with peftcore adapters loaded it writes them in PEFT's
  layout (atomically, as ``peftcore.save_pretrained``); without, transformers' own runs.
* ``PreTrainedModel.from_pretrained``: the bare ``load_in_8bit`` / ``load_in_4bit`` flags
  (the guide's "Load in 8bit or 4bit", which transformers 5 refuses) become a
  ``BitsAndBytesConfig``; everything else goes to transformers' own.
* ``transformers.Trainer._load_from_checkpoint`` / ``_load_best_model``:
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` on a model with peftcore
  adapters copy the checkpoint's adapters into them (transformers' own handle PEFT's
  ``PeftModel`` only); without peftcore adapters, transformers' own run.
* the ``is_peft_available`` names read by ``transformers.integrations.peft``
  (``maybe_load_adapters``), ``transformers.models.auto.auto_factory`` and
  ``transformers.pipelines``: an adapter folder or repo given to ``from_pretrained`` /
  ``pipeline`` is recognised (base from its ``base_model_name_or_path``, then
  ``model.load_adapter``) even without PEFT installed.

Semantics are transformers 5.24's (its mixin with PEFT), with these choices: configs may be
peftcore's or PEFT's (converted through their dict form); a parameter peftcore cannot
honour raises ``peftcore.PeftcoreError`` naming it; new adapter layers take the training
mode of the module they wrap (PEFT leaves them in training mode, so an eval model would run
LoRA dropout in ``generate``).
"""
from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from typing import Any, Optional

from . import api, switching
from .config import AdapterConfig
from .errors import AdapterNameError, PeftcoreError
from .hotswap import hotswap_adapter
from .state import get_state

_ABSENT = object()
_SAVED: dict[tuple[Any, str], Any] = {}  # (owner, attribute) -> the original (or _ABSENT)

# Download options that reach peftcore's loader; others are refused by name.
_HUB_KEYS = ("revision", "subfolder", "token", "cache_dir", "local_files_only")
# transformers' download options that are fine at their defaults (and refused otherwise).
# (_ABSENT: any value is fine: a progress-bar class, a commit hash already resolved.)
_DEFAULTS = {"force_download": False, "proxies": None, "use_auth_token": None, "user_agent": None,
             "_commit_hash": _ABSENT, "trust_remote_code": _ABSENT, "tqdm_class": _ABSENT}


# ------------------------------------------------------------------ conversions
def as_config(config, *, what: str = "adapter_config") -> AdapterConfig:
    """A peftcore config from a peftcore config, a PEFT config object (through its dict
    form; PEFT is never imported here) or a dict in ``adapter_config.json``'s form."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, dict):
        return AdapterConfig.from_dict(dict(config), source=what)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and type(config).__module__.startswith("peft"):
        d = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in to_dict().items()}
        return AdapterConfig.from_dict(d, source=f"{what} ({type(config).__name__})")
    raise PeftcoreError(
        f"{what} must be a peftcore or PEFT LoraConfig / AdaLoraConfig / IA3Config (or its dict), "
        f"got {type(config).__name__}"
    )


def _refuse(method: str, **given) -> None:
    for name, (value, ok) in given.items():
        if value != ok:
            raise PeftcoreError(f"{method}: {name}={value!r} is not supported by peftcore (only {ok!r})")


def _hub_kwargs(method: str, *sources: Optional[dict]) -> dict:
    """peftcore.load_adapter's download keywords from transformers' option dicts (later ones
    win); anything peftcore cannot honour is refused by name."""
    out: dict = {}
    for src in sources:
        for k, v in (src or {}).items():
            if k in _HUB_KEYS:
                if v not in (None, ""):
                    out[k] = v
            elif k == "autocast_adapter_dtype":
                out[k] = v
            elif k in _DEFAULTS:
                if _DEFAULTS[k] is not _ABSENT and v != _DEFAULTS[k]:
                    raise PeftcoreError(f"{method}: {k}={v!r} is not supported by peftcore")
            else:
                raise PeftcoreError(f"{method}: the option {k}={v!r} is not supported by peftcore")
    if "local_files_only" in out:
        out["local_files_only"] = bool(out["local_files_only"])
    return out


def _loaded(model) -> dict:
    st = get_state(model)
    return dict(st.configs) if st is not None else {}


def _require(model) -> None:
    if not _loaded(model):
        raise PeftcoreError("No adapter loaded. Please load an adapter first.")


def _hf_peft_config_loaded(self) -> bool:
    """transformers' marker of a model with adapters (its Trainer accepts a quantized model
    with one; gradient checkpointing then enables input gradients), answered from peftcore's
    state while patched, for models given adapters by either API."""
    return bool(_loaded(self))


def _loading_info():
    try:
        from transformers.utils.loading_report import LoadStateDictInfo

        return LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                                 conversion_errors={}, skipped_pp_keys=set())
    except Exception:  # pragma: no cover - another transformers layout
        return None


# ------------------------------------------------------------------ the mixin's methods
def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None,
                 low_cpu_mem_usage=False, is_trainable=False, hotswap="auto", local_files_only=False,
                 adapter_kwargs=None, load_config=None, **kwargs):
    """transformers' ``load_adapter`` on peftcore. ``low_cpu_mem_usage`` needs nothing
    (peftcore never builds randomly initialised adapter weights); ``hotswap`` as
    transformers ("auto": when ``enable_peft_hotswap`` was called and the name is loaded)."""
    name = adapter_name or "default"
    base_dl = dict(getattr(load_config, "download_kwargs", None) or {}) if load_config is not None else {}
    device_map = kwargs.pop("device_map", None)
    if device_map not in (None, "cpu", "auto") and not isinstance(device_map, dict):
        raise PeftcoreError(f"load_adapter: device_map={device_map!r} is not supported by peftcore "
                            "(the adapter follows the device of each module it attaches to)")
    opts = _hub_kwargs("load_adapter", base_dl, adapter_kwargs, kwargs)
    if local_files_only:
        opts["local_files_only"] = True
    if peft_model_id is None and load_config is not None:
        peft_model_id = getattr(load_config, "pretrained_model_name_or_path", None)
    loaded = _loaded(self)
    if hotswap == "auto":
        hotswap = bool(self.__dict__.get("_hotswap_enabled")) and name in loaded
    if hotswap:
        if name not in loaded:
            raise PeftcoreError("To hotswap an adapter, there must already be an existing adapter with the same "
                                f"adapter name ({name!r} is not loaded; loaded: {sorted(loaded)})")
        if peft_model_id is None:
            raise PeftcoreError("load_adapter(hotswap=True) needs peft_model_id (a folder or repo)")
        hub = {k: v for k, v in opts.items() if k in _HUB_KEYS}
        hotswap_adapter(self, peft_model_id, name, **hub)
        return _loading_info()
    if name in loaded:
        raise AdapterNameError(f"Adapter with name {name} already exists. Please use a different name.")
    autocast = opts.pop("autocast_adapter_dtype", True)
    if peft_model_id is not None and adapter_state_dict is None:
        if peft_config is not None:
            raise PeftcoreError("load_adapter: pass either peft_model_id or peft_config with adapter_state_dict")
        api.load_adapter(self, peft_model_id, name, is_trainable=is_trainable, autocast_adapter_dtype=autocast, **opts)
    elif adapter_state_dict is not None and peft_config is not None:
        api.load_adapter_state_dict(self, as_config(peft_config, what="peft_config"), adapter_state_dict, name,
                                    is_trainable=is_trainable, autocast_adapter_dtype=autocast)
    else:
        raise PeftcoreError(
            "You should either pass a `peft_model_id` or a `peft_config` and `adapter_state_dict` to load an adapter."
        )
    return _loading_info()


def enable_peft_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
    """transformers' ``enable_peft_hotswap``: later ``load_adapter`` calls onto a loaded name
    swap its weights in place. peftcore needs no preparation for adapters whose ranks are no
    larger than the loaded one's (its scales are tensors, so a compiled model never
    recompiles) and pads nothing: ``target_rank`` is recorded as transformers records it,
    and a swap to a larger rank fails with a named error."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise PeftcoreError(f"check_compiled should be one of 'error', 'warn', or 'ignore', got {check_compiled!r}")
    if _loaded(self) and check_compiled == "error":
        raise PeftcoreError("Call `enable_peft_hotswap` before loading the first adapter.")
    if _loaded(self) and check_compiled == "warn":
        warnings.warn("It is recommended to call `enable_peft_hotswap` before loading the first adapter to avoid "
                      "recompilation.", stacklevel=2)
    self.__dict__["_hotswap_enabled"] = True
    self.__dict__["_prepare_peft_hotswap_kwargs"] = {"target_rank": target_rank, "check_compiled": check_compiled}


def add_adapter(self, adapter_config, adapter_name: Optional[str] = None) -> None:
    """transformers' ``add_adapter``: a fresh trainable adapter, made the only active one;
    ``base_model_name_or_path`` is set to the model's ``name_or_path``."""
    name = adapter_name or "default"
    if name in _loaded(self):
        raise AdapterNameError(f"Adapter with name {name} already exists. Please use a different name.")
    config = dataclasses.replace(as_config(adapter_config), base_model_name_or_path=self.__dict__.get("name_or_path"))
    api.add_adapter(self, config, name)
    switching.set_adapter(self, name)


def set_adapter(self, adapter_name) -> None:
    _require(self)
    switching.set_adapter(self, adapter_name)


def enable_adapters(self) -> None:
    _require(self)
    switching.enable_adapters(self)


def disable_adapters(self) -> None:
    _require(self)
    switching.disable_adapters(self)


def active_adapters(self) -> list[str]:
    _require(self)
    return switching.active_adapters(self)


def active_adapter(self) -> str:
    """The first active adapter (transformers 4's method; PEFT's ``active_adapter``)."""
    return active_adapters(self)[0]


def get_adapter_state_dict(self, adapter_name: Optional[str] = None, state_dict: Optional[dict] = None) -> dict:
    """The adapter's tensors under PEFT's keys without the ``base_model.model.`` prefix (as
    transformers returns them). ``state_dict`` (a model-parallel state dict to read from) is
    not supported."""
    _require(self)
    _refuse("get_adapter_state_dict", state_dict=(state_dict, None))
    name = adapter_name or active_adapters(self)[0]
    prefix = "base_model.model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in api.get_adapter_state_dict(self, name).items()}


def delete_adapter(self, adapter_names) -> None:
    _require(self)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in _loaded(self)]
    if missing:
        raise AdapterNameError(f"The following adapter(s) are not present and cannot be deleted: {', '.join(missing)}")
    for n in names:
        api.delete_adapter(self, n)


# ------------------------------------------------------------------ save / from_pretrained
def _save_pretrained(original):
    def save_pretrained(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, *args,
                        **kwargs):
        """With peftcore adapters: the adapters in PEFT's layout, as transformers writes an
        adapter model (the single active adapter at the root, plus generation_config.json);
        PEFT's ``selected_adapters`` saves those instead, in PEFT's layout ("default" at
        the root, the others in sub-folders, as ``peftcore.save_pretrained``).
        Without adapters: transformers' own save."""
        if not _loaded(self):
            return original(self, save_directory, is_main_process, state_dict, push_to_hub, *args, **kwargs)
        selected = kwargs.pop("selected_adapters", None)
        safe = kwargs.pop("safe_serialization", True)
        kwargs.pop("max_shard_size", None)  # adapters are one file; the limit never applies
        kwargs.pop("save_peft_format", None)  # always PEFT's format
        kwargs.pop("save_original_format", None)
        _refuse("save_pretrained", state_dict=(state_dict, None), push_to_hub=(push_to_hub, False),
                safe_serialization=(safe, True))
        for k, v in kwargs.items():
            if v not in (None, False):
                raise PeftcoreError(f"save_pretrained: {k}={v!r} is not supported by peftcore for an adapter model")
        if args:
            raise PeftcoreError("save_pretrained: pass options by keyword for an adapter model")
        if not is_main_process:
            return
        if selected is None:
            active = switching.active_adapters(self)
            if len(active) != 1:
                raise PeftcoreError(
                    f"save_pretrained: {len(active)} adapters are active ({active}); activate one with "
                    "model.set_adapter(name), or pass selected_adapters=[...]"
                )
            names = active
        else:
            names = [selected] if isinstance(selected, str) else list(selected)
        if selected is None:  # transformers' layout: the active adapter at the root, whatever its name
            api.save_pretrained(self, save_directory, names, root=names[0])
        else:
            api.save_pretrained(self, save_directory, names)
        gen = getattr(self, "generation_config", None)
        if gen is not None and getattr(self, "can_generate", lambda: False)():
            gen.save_pretrained(save_directory)

    save_pretrained.__wrapped__ = original
    return save_pretrained


def _from_pretrained(original):
    func = original.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        api._quantization_kwargs(kwargs)
        return func(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    from_pretrained.__wrapped__ = func
    return classmethod(from_pretrained)


def _copy_checkpoint_adapters(model, folder: str) -> None:
    """A Trainer checkpoint's adapters copied into the model's in place (``hotswap_adapter``:
    the parameters the optimizer holds stay the same objects): the one at the folder's
    root is the active adapter (as save_pretrained wrote it), sub-folders carry names."""
    from .config import CONFIG_NAME

    found = []
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        found.append((switching.active_adapters(model)[0], folder))
    for d in sorted(os.listdir(folder)):
        if d in _loaded(model) and os.path.isfile(os.path.join(folder, d, CONFIG_NAME)):
            found.append((d, os.path.join(folder, d)))
    if not found:
        raise PeftcoreError(f"{folder}: no adapter checkpoint (adapter_config.json) of the model's adapters "
                            f"{sorted(_loaded(model))}")
    for name, path in found:
        hotswap_adapter(model, path, name)


def _trainer_load_from_checkpoint(original):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """``resume_from_checkpoint`` with peftcore adapters: the checkpoint's adapters
        copied into them. transformers' own resume only knows PEFT's PeftModel."""
        m = self.model if model is None else model
        if not _loaded(m) or not os.path.isdir(resume_from_checkpoint):
            return original(self, resume_from_checkpoint, model)
        _copy_checkpoint_adapters(m, resume_from_checkpoint)

    _load_from_checkpoint.__wrapped__ = original
    return _load_from_checkpoint


def _trainer_load_best_model(original):
    def _load_best_model(self):
        """``load_best_model_at_end`` with peftcore adapters: the best checkpoint's adapters."""
        if not _loaded(self.model):
            return original(self)
        _copy_checkpoint_adapters(self.model, self.state.best_model_checkpoint)

    _load_best_model.__wrapped__ = original
    return _load_best_model


# ------------------------------------------------------------------ patch / unpatch
def _targets():
    from transformers import PreTrainedModel, Trainer, pipelines
    from transformers.integrations import peft as hf_peft
    from transformers.integrations.peft import PeftAdapterMixin
    from transformers.models.auto import auto_factory

    mixin = {
        "load_adapter": load_adapter, "enable_peft_hotswap": enable_peft_hotswap, "add_adapter": add_adapter,
        "set_adapter": set_adapter, "enable_adapters": enable_adapters, "disable_adapters": disable_adapters,
        "active_adapters": active_adapters, "active_adapter": active_adapter,
        "get_adapter_state_dict": get_adapter_state_dict, "delete_adapter": delete_adapter,
        "_hf_peft_config_loaded": property(_hf_peft_config_loaded),
    }
    out = [(PeftAdapterMixin, k, v) for k, v in mixin.items()]
    out.append((PreTrainedModel, "save_pretrained", _save_pretrained(vars(PreTrainedModel)["save_pretrained"])))
    out.append((PreTrainedModel, "from_pretrained", _from_pretrained(vars(PreTrainedModel)["from_pretrained"])))
    out.append((Trainer, "_load_from_checkpoint", _trainer_load_from_checkpoint(vars(Trainer)["_load_from_checkpoint"])))
    out.append((Trainer, "_load_best_model", _trainer_load_best_model(vars(Trainer)["_load_best_model"])))
    # transformers asks whether PEFT is installed before it looks for an adapter's config
    # (maybe_load_adapters, the Auto classes, pipeline); peftcore reads that config itself.
    for module in (hf_peft, auto_factory, pipelines):
        out.append((module, "is_peft_available", lambda: True))
    return out


#: (owner, attribute) pairs that ``patch_transformers`` replaces.
PATCHES = (
    "transformers.integrations.peft.PeftAdapterMixin: load_adapter, enable_peft_hotswap, add_adapter, set_adapter, "
    "enable_adapters, disable_adapters, active_adapters, active_adapter (added), get_adapter_state_dict, "
    "delete_adapter, _hf_peft_config_loaded (a property while patched)",
    "transformers.PreTrainedModel: save_pretrained, from_pretrained",
    "transformers.Trainer._load_from_checkpoint, _load_best_model",
    "is_peft_available of transformers.integrations.peft (maybe_load_adapters), transformers.models.auto."
    "auto_factory and transformers.pipelines",
)


def patch_transformers() -> None:
    """Run transformers' adapter API on peftcore (idempotent). See the module's docstring."""
    if _SAVED:
        return
    for owner, attr, value in _targets():
        _SAVED[(owner, attr)] = vars(owner).get(attr, _ABSENT)
        setattr(owner, attr, value)


def unpatch_transformers() -> None:
    """Put back every attribute ``patch_transformers`` replaced (the original objects)."""
    for (owner, attr), original in list(_SAVED.items()):
        if original is _ABSENT:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _SAVED.clear()


def is_patched() -> bool:
    return bool(_SAVED)
