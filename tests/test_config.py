"""LoraConfig against PEFT's LoraConfig: defaults, unknown fields, JSON form."""
from __future__ import annotations

import dataclasses
import json

import peft
import pytest

import peftcore
from peftcore.config import LoraConfig


def test_defaults_equal_peft():
    """Every field peftcore shares with PEFT's LoraConfig has PEFT's default."""
    ours = {f.name: getattr(LoraConfig(), f.name) for f in dataclasses.fields(LoraConfig) if f.name != "extra_fields"}
    theirs = peft.LoraConfig().to_dict()
    for k, v in ours.items():
        if k in ("peft_version", "loftq_config", "base_model_name_or_path", "revision", "auto_mapping"):
            continue  # filled by PEFT at save time / null-vs-{} variants
        assert k in theirs, f"{k} is not a PEFT LoraConfig field"
        tv = theirs[k]
        assert (v == tv) or (v in ({}, None) and tv in ({}, None)), f"{k}: peftcore {v!r} vs PEFT {tv!r}"


def test_unknown_fields_round_trip_and_peft_reads_ours(tmp_path):
    """A config written by a newer PEFT (unknown keys, runtime_config) loads; the unknown
    keys are written back unchanged and PEFT reads the file peftcore writes."""
    d = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]).to_dict()
    d.update(some_future_field={"a": [1, 2]}, another_new_flag=True, runtime_config={"ephemeral_gpu_offload": False})
    d["peft_type"] = "LORA"
    d["target_modules"] = sorted(d["target_modules"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == 4 and cfg.lora_alpha == 16 and cfg.extra_fields == {"some_future_field": {"a": [1, 2]}, "another_new_flag": True}
    out = tmp_path / "out"
    cfg.save_pretrained(out)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["some_future_field"] == {"a": [1, 2]} and written["another_new_flag"] is True
    assert "runtime_config" not in written and written["inference_mode"] is True
    assert list(written) == sorted(written)  # PEFT's sort_keys=True
    pc = peft.PeftConfig.from_pretrained(out)
    assert pc.r == 4 and pc.lora_alpha == 16 and set(pc.target_modules) == {"q_proj"}


@pytest.mark.parametrize(
    "field,value",
    [("rank_pattern", None), ("alpha_pattern", None), ("loftq_config", None), ("lora_alpha", 12.5),
     ("target_modules", "q_proj|v_proj"), ("layers_to_transform", 1)],
)
def test_tolerated_variants(field, value):
    """null vs {} patterns, a float lora_alpha, a string target, an int layer index."""
    cfg = LoraConfig.from_dict({"peft_type": "LORA", field: value})
    assert getattr(cfg, field) == ({} if value is None and field != "loftq_config" else value)


def test_only_peft_type_required():
    with pytest.raises(peftcore.AdapterConfigError, match="peft_type"):
        LoraConfig.from_dict({"r": 4})
    assert LoraConfig.from_dict({"peft_type": "LORA"}).r == 8
