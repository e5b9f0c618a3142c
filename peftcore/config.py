"""``LoraConfig``: PEFT's field names and defaults, read from and written to ``adapter_config.json``.

Unknown fields are kept in ``extra_fields`` and written back unchanged, so a config
saved by a newer PEFT survives a round trip through peftcore.
"""
from __future__ import annotations

import dataclasses
import json
import os
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


@dataclass
class LoraConfig:
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

    def __post_init__(self):
        if self.peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"peft_type={self.peft_type!r}: peftcore implements LORA only (IA3 and ADALORA are planned)"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"r must be a positive integer, got r={self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise AdapterConfigError(f"lora_alpha must be a number, got lora_alpha={self.lora_alpha!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(f"bias must be 'none', 'all' or 'lora_only', got bias={self.bias!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.task_type not in TASK_TYPES:
            raise AdapterConfigError(f"task_type={self.task_type!r} is not one of {TASK_TYPES}")
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
            elif v is not None and not isinstance(v, (str, list)):
                raise AdapterConfigError(f"{name} must be a string or a list of strings, got {v!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise AdapterConfigError(
                "layers_to_transform / layers_pattern cannot be used with a regex (string) target_modules"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("layers_pattern needs layers_to_transform")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise AdapterConfigError(f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        # SEQ_CLS / TOKEN_CLS heads are trained and saved in full, as PEFT does.
        if self.task_type in ("SEQ_CLS", "TOKEN_CLS"):
            extra = [m for m in ("classifier", "score") if m not in (self.modules_to_save or [])]
            self.modules_to_save = (self.modules_to_save or []) + extra

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

    # ------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, *, source: str = "<dict>") -> "LoraConfig":
        if not isinstance(d, dict):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "peft_type" not in d:
            raise AdapterConfigError(f"{source}: required field 'peft_type' is missing")
        if d["peft_type"] != "LORA":
            raise UnsupportedAdapterError(
                f"{source}: peft_type={d['peft_type']!r} is not supported (peftcore implements LORA)"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "runtime_config"}
        try:
            return cls(**kwargs, extra_fields=extra)
        except (AdapterConfigError, UnsupportedAdapterError) as e:
            raise type(e)(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise AdapterConfigError(f"{source}: invalid config ({e})") from None

    @classmethod
    def from_json_file(cls, path: str) -> "LoraConfig":
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
                        local_files_only: bool = False) -> "LoraConfig":
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
