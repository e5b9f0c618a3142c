"""Adapter configs: ``LoraConfig``, ``AdaLoraConfig`` and ``IA3Config``, with PEFT's field
names and defaults, read from and written to ``adapter_config.json``.

``AdapterConfig.from_dict`` / ``from_json_file`` / ``from_pretrained`` pick the class from
the file's ``peft_type``. Unknown fields are kept in ``extra_fields`` and written back
unchanged, so a config saved by a newer PEFT survives a round trip through peftcore.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import AdapterConfigError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"

# init_lora_weights values that only shape the starting point of training: a loaded
# adapter's weights replace them, so such adapters load as plain LoRA.
_INIT_LOAD_OK = (True, False, "gaussian", "eva", "orthogonal")
# Values that change the *base* weights at load time in PEFT (pissa, olora, corda, loftq,
# lora_ga), or change the math (mica freezes B): refused, never run wrongly.
_INIT_NEW_OK = (True, False, "gaussian")

# field -> value meaning "off"; any other value asks for a feature peftcore lacks.
_UNSUPPORTED_WHEN_SET = {
    "use_dora": False,
    "lora_bias": False,
    "target_parameters": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "velora_config": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "monteclora_config": None,
    "megatron_config": None,
    "ensure_weight_tying": False,
}

TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class AdapterConfig:
    """What every adapter config shares: (de)serialisation in PEFT's JSON form. The
    subclass is chosen by ``peft_type`` (``PEFT_TYPE`` of each class)."""

    PEFT_TYPE = ""

    def _check_peft_type(self) -> None:
        if self.peft_type != self.PEFT_TYPE:
            raise UnsupportedAdapterError(
                f"{type(self).__name__} has peft_type={self.PEFT_TYPE!r}, got peft_type={self.peft_type!r}"
            )

    def _check_lists(self, names) -> None:
        # PEFT turns lists into sets; peftcore keeps sorted lists (stable files).
        for name in names:
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
            elif v is not None and not isinstance(v, (str, list)):
                raise AdapterConfigError(f"{name} must be a string or a list of strings, got {v!r}")

    def _check_task_type(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise AdapterConfigError(f"task_type={self.task_type!r} is not one of {TASK_TYPES}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        # SEQ_CLS / TOKEN_CLS heads are trained and saved in full, as PEFT does.
        if self.task_type in ("SEQ_CLS", "TOKEN_CLS"):
            extra = [m for m in ("classifier", "score") if m not in (self.modules_to_save or [])]
            self.modules_to_save = (self.modules_to_save or []) + extra

    def check_supported(self, *, new: bool = False) -> None:
        """Raise ``UnsupportedAdapterError`` if the config asks for a feature peftcore lacks."""

    # ------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, *, source: str = "<dict>") -> "AdapterConfig":
        """The config of ``d["peft_type"]`` (LORA, ADALORA or IA3); called on a subclass,
        the type must be that subclass's."""
        if not isinstance(d, dict):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "peft_type" not in d:
            raise AdapterConfigError(f"{source}: required field 'peft_type' is missing")
        klass = CONFIG_CLASSES.get(d["peft_type"])
        if klass is None:
            raise UnsupportedAdapterError(
                f"{source}: peft_type={d['peft_type']!r} is not supported (peftcore implements "
                f"{', '.join(CONFIG_CLASSES)})"
            )
        if cls is not AdapterConfig and not issubclass(klass, cls):
            raise UnsupportedAdapterError(
                f"{source}: peft_type={d['peft_type']!r} is not a {cls.__name__} (use peftcore.{klass.__name__})"
            )
        known = {f.name for f in dataclasses.fields(klass)} - {"extra_fields"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "runtime_config"}
        try:
            return klass(**kwargs, extra_fields=extra)
        except (AdapterConfigError, UnsupportedAdapterError) as e:
            raise type(e)(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise AdapterConfigError(f"{source}: invalid config ({e})") from None

    @classmethod
    def from_json_file(cls, path: str) -> "AdapterConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise AdapterConfigError(f"{path}: not UTF-8 text ({e})") from None
        return cls.from_dict(d, source=path)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, subfolder=None, revision=None, token=None, cache_dir=None,
                        local_files_only: bool = False) -> "AdapterConfig":
        """Read ``adapter_config.json`` from a folder or a Hub repo id (see ``hub.resolve_file``)."""
        from .hub import resolve_file

        return cls.from_json_file(resolve_file(
            path_or_repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only,
        ))

    def save_pretrained(self, save_directory) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (PEFT's form, see to_json_string)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra_fields"}
        d.update(self.extra_fields)
        return json.loads(json.dumps(d))  # deep copy, JSON types only

    def to_json_string(self) -> str:
        """PEFT's on-disk form: sorted keys, indent 2, ``inference_mode`` true."""
        d = self.to_dict()
        d["inference_mode"] = True
        return json.dumps(d, indent=2, sort_keys=True)


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of a LoRA adapter, field for field PEFT 0.21's ``LoraConfig``.

    The fields peftcore acts on: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``
    (list: exact name or dot-suffix; str: regex full match; ``"all-linear"``),
    ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, ``rank_pattern`` /
    ``alpha_pattern``, ``fan_in_fan_out``, ``bias`` ("none" / "all" / "lora_only"),
    ``modules_to_save``, ``lora_dropout``, ``init_lora_weights`` (True / False / "gaussian").
    Fields for features peftcore does not implement are kept and written back, and an
    adapter that turns one on is refused when added or loaded (``check_supported``).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = "LORA"
    # Fields peftcore does not implement; kept so that files round-trip.
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    layer_replication: Optional[list] = None
    trainable_token_indices: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    velora_config: Optional[dict] = None
    arrow_config: Optional[dict] = None
    use_bdlora: Optional[dict] = None
    kasa_config: Optional[dict] = None
    monteclora_config: Optional[dict] = None
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    ensure_weight_tying: bool = False
    loftq_config: Optional[dict] = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    extra_fields: dict = field(default_factory=dict, repr=False)

    PEFT_TYPE = "LORA"

    def __post_init__(self):
        self._check_peft_type()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"r must be a positive integer, got r={self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise AdapterConfigError(f"lora_alpha must be a number, got lora_alpha={self.lora_alpha!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(f"bias must be 'none', 'all' or 'lora_only', got bias={self.bias!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self._check_lists(("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"))
        self._check_task_type()
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise AdapterConfigError(
                "layers_to_transform / layers_pattern cannot be used with a regex (string) target_modules"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("layers_pattern needs layers_to_transform")
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self._check_rank_pattern()

    def _check_rank_pattern(self) -> None:
        self.rank_pattern = dict(self.rank_pattern or {})
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise AdapterConfigError(f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")

    # ------------------------------------------------------------ validation
    def check_supported(self, *, new: bool = False) -> None:
        """Raise ``UnsupportedAdapterError`` naming the first field asking for a feature
        peftcore does not implement. ``new=True``: for a freshly initialised adapter."""
        for name, off in _UNSUPPORTED_WHEN_SET.items():
            v = getattr(self, name)
            if v != off and not (off is None and v in ({}, [], "")):
                raise UnsupportedAdapterError(f"{name}={v!r} is not supported by peftcore yet")
        allowed = _INIT_NEW_OK if new else _INIT_LOAD_OK
        if self.init_lora_weights not in allowed:
            raise UnsupportedAdapterError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by peftcore "
                f"(it changes the base weights or the LoRA math); supported: {allowed}"
            )


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter, field for field PEFT 0.21's ``AdaLoraConfig``
    (a ``LoraConfig`` with the fields below; ``r`` is ignored, layers are built with
    ``init_r``).

    The layers compute ``x·Wᵀ + b + α/(ranknum + 1e-5)·((x·Aᵀ) ⊙ Eᵀ)·Bᵀ`` with
    ``ranknum = init_r`` (also after pruning and reloading). ``rank_pattern`` is the mask
    that rank allocation produced: ``{"<module path>.lora_E": [bool] * init_r}``, and a
    saved file holds only the kept triplets. ``total_step`` is required (> 0) and the
    schedule must leave a budgeting phase (``tinit < total_step - tfinal``), as in PEFT,
    also when an adapter is only loaded for inference.
    """

    PEFT_TYPE = "ADALORA"

    peft_type: str = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        if self.use_dora:
            raise UnsupportedAdapterError("AdaLoRA does not support DoRA (use_dora=True)")
        if self.loftq_config:
            raise UnsupportedAdapterError("AdaLoRA does not support LoftQ (loftq_config is set)")
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name in ("init_r", "deltaT") else 0):
                raise AdapterConfigError(f"{name} must be a {'positive' if name in ('init_r', 'deltaT') else 'non-negative'} integer, got {v!r}")
        if self.r != 8:
            warnings.warn("AdaLoraConfig: r is not used by AdaLoRA and is ignored; set init_r for the initial rank")
        if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise AdapterConfigError(f"AdaLoRA needs total_step > 0 (the rank-allocation schedule), got total_step={self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise AdapterConfigError(
                f"the schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leaves no "
                "budgeting phase (need tinit < total_step - tfinal)"
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise AdapterConfigError(f"{name} must be in (0, 1), got {v!r}")
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise AdapterConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")

    def _check_rank_pattern(self) -> None:
        # null (no allocation yet) stays null, as PEFT writes it.
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise AdapterConfigError(f"rank_pattern must be a dict of boolean masks, got {self.rank_pattern!r}")
        for k, v in self.rank_pattern.items():
            if not isinstance(v, list) or not all(isinstance(b, bool) for b in v):
                raise AdapterConfigError(
                    f"rank_pattern[{k!r}] must be a list of booleans (AdaLoRA's kept triplets), got {v!r}"
                )

    def check_supported(self, *, new: bool = False) -> None:
        super().check_supported(new=new)
        if self.init_lora_weights not in (True, False):
            raise UnsupportedAdapterError(
                f"init_lora_weights={self.init_lora_weights!r}: AdaLoRA initialises with True or False only"
            )

    def pattern_mask(self, module_path: str) -> Optional[list[bool]]:
        """The rank-pattern mask of a module, or None (keys: ``<path>.lora_E``; the
        in-memory form ``<path>.lora_E.<adapter>`` of older files is accepted)."""
        for k, v in (self.rank_pattern or {}).items():
            head, sep, _ = k.partition(".lora_E")
            if sep and head == module_path:
                return v
        return None


@dataclass
class IA3Config(AdapterConfig):
    """Configuration of an (IA)³ adapter, field for field PEFT 0.21's ``IA3Config``.

    Each targeted linear layer learns a vector ``l``: modules matching
    ``feedforward_modules`` (list: plain name suffix; str: regex full match) scale their
    *input* features (``l`` of shape (1, in)); the others scale their *output* (shape
    (out, 1)), bias included. ``feedforward_modules`` must be a subset of
    ``target_modules`` when both are lists. Several active IA3 adapters multiply.
    """

    PEFT_TYPE = "IA3"

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = "IA3"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    extra_fields: dict = field(default_factory=dict, repr=False)

    # IA3 has no layer selection by index (PEFT's IA3Config lacks these fields).
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self):
        self._check_peft_type()
        self._check_lists(("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"))
        self._check_task_type()
        if not isinstance(self.init_ia3_weights, bool):
            raise AdapterConfigError(f"init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        tm, ff = self.target_modules, self.feedforward_modules
        if isinstance(tm, list) and isinstance(ff, list) and not set(ff) <= set(tm):
            raise AdapterConfigError(
                f"feedforward_modules must be a subset of target_modules; not in target_modules: {sorted(set(ff) - set(tm))}"
            )


CONFIG_CLASSES = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig, "IA3": IA3Config}
