"""peftcore.patch_transformers(): the code blocks of transformers' guide "Load adapters
with PEFT" (../shared/reference/load-adapters-guide.md), verbatim but for Hub ids that point
to local folders, run on peftcore, against PEFT's PeftModel on the same adapters (fp32:
relative error <= 1e-4; quantized bases: bitsandbytes' own rounding, see the test).
Also: unpatch restores transformers exactly; refused parameters raise naming themselves and
change nothing."""
from __future__ import annotations

import importlib.util
import os

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, OPTForCausalLM, PreTrainedModel

import peftcore
from peftcore import transformers_patch
from tests._models import (
    INPUT_IDS,
    QUANT_SIZES,
    assert_unchanged,
    logits,
    model_snapshot,
    peft_adapter_dir,
    peft_model,
    rel_err,
    tiny_opt,
)

CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], lora_dropout=0.0),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                                  init_ia3_weights=False),
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                          target_modules=["q_proj", "v_proj", "fc1"]),
}


@pytest.fixture
def patched():
    peftcore.patch_transformers()
    yield
    peftcore.unpatch_transformers()


@pytest.fixture
def folders(tmp_path):
    """(model_id, {method: peft_model_id}): a saved tiny OPT (the guide's facebook/opt-350m)
    and PEFT adapters trained on it, whose configs name that folder as their base."""
    model_id = str(tmp_path / "opt")
    tiny_opt(**QUANT_SIZES["opt"]).save_pretrained(model_id)
    base = AutoModelForCausalLM.from_pretrained(model_id)  # name_or_path = the folder
    ids = {m: peft_adapter_dir(tmp_path, base, cfg(), name=f"adapter_{m}") for m, cfg in CONFIGS.items()}
    return model_id, ids


def _peft_logits(model_id, adapter_dir):
    return logits(peft_model(AutoModelForCausalLM.from_pretrained(model_id), {"default": adapter_dir}))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_load_a_peft_adapter_with_an_auto_class(patched, folders, method):
    model_id, ids = folders
    peft_model_id = ids[method]
    model = AutoModelForCausalLM.from_pretrained(peft_model_id)
    assert peftcore.active_adapters(model) == ["default"] and model.active_adapters() == ["default"]
    assert rel_err(logits(model), _peft_logits(model_id, peft_model_id)) <= 1e-4
    # ... or with the base model class
    model = OPTForCausalLM.from_pretrained(peft_model_id)
    assert rel_err(logits(model), _peft_logits(model_id, peft_model_id)) <= 1e-4


@pytest.mark.parametrize("method", list(CONFIGS))
def test_load_adapter_method(patched, folders, method):
    model_id, ids = folders
    peft_model_id = ids[method]

    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.load_adapter(peft_model_id)

    assert not model.training  # loaded for inference, as transformers does
    want = _peft_logits(model_id, peft_model_id)
    assert rel_err(logits(model), want) <= 1e-4
    assert model._hf_peft_config_loaded and set(model.peft_config) == {"default"}
    # low_cpu_mem_usage asks for what a peftcore load always does: the same adapter
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.load_adapter(peft_model_id, low_cpu_mem_usage=True)
    assert rel_err(logits(model), want) <= 1e-4


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_load_in_8bit_or_4bit(patched, folders, flag, method):
    pytest.importorskip("bitsandbytes")
    model_id, ids = folders
    peft_model_id = ids[method]
    model = AutoModelForCausalLM.from_pretrained(peft_model_id, device_map="auto", **{flag: True})
    assert any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(**{flag: True})
    theirs = peft_model(AutoModelForCausalLM.from_pretrained(model_id, device_map="auto", quantization_config=qc),
                        {"default": peft_model_id})
    # Both over the same quantized weights; bitsandbytes' own matmul (PEFT) rounds x to its
    # compute dtype / int8 where peftcore computes with the exact dequantized weight.
    assert rel_err(logits(model), logits(theirs)) <= 2e-2


def test_add_a_new_adapter_and_set_adapter(patched, folders, tmp_path):
    model_id, _ = folders
    model = AutoModelForCausalLM.from_pretrained(model_id)
    lora_config = peft.LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    model.add_adapter(lora_config, adapter_name="adapter_1")
    model.add_adapter(lora_config, adapter_name="adapter_2")
    assert model.active_adapters() == ["adapter_2"]  # transformers: the new one alone

    inputs = {"input_ids": INPUT_IDS[:1, :4], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    outs = {}
    for name in ("adapter_1", "adapter_2"):
        model.set_adapter(name)
        assert model.active_adapter() == name
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)
        outs[name] = logits(model)
    assert not torch.equal(outs["adapter_1"], outs["adapter_2"])
    # Each equals PEFT running the very same adapter, saved by peftcore in PEFT's layout.
    save_dir = tmp_path / "saved"
    model.save_pretrained(save_dir, selected_adapters=["adapter_1", "adapter_2"])
    for name in ("adapter_1", "adapter_2"):
        d = os.path.join(save_dir, name)
        assert rel_err(outs[name], _peft_logits(model_id, d)) <= 1e-4


def test_enable_and_disable_adapters_with_a_peft_config_object(patched, folders):
    model_id, ids = folders
    adapter_model_id = ids["lora"]
    model = AutoModelForCausalLM.from_pretrained(model_id)
    bare = logits(model)
    peft_config = peft.PeftConfig.from_pretrained(adapter_model_id)
    peft_config.init_lora_weights = False
    model.add_adapter(peft_config)
    model.enable_adapters()
    enabled = logits(model)
    model.disable_adapters()
    assert torch.equal(logits(model), bare) and not torch.equal(enabled, bare)


def test_save_and_load_back(patched, folders, tmp_path):
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.add_adapter(peftcore.LoraConfig(lora_alpha=16, lora_dropout=0.1, r=8, bias="none", task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    want = logits(model)
    save_dir = str(tmp_path / "save_dir")
    model.save_pretrained(save_dir)
    assert sorted(os.listdir(save_dir)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "generation_config.json"]
    model = AutoModelForCausalLM.from_pretrained(save_dir)
    assert torch.equal(logits(model), want)
    assert rel_err(_peft_logits(model_id, save_dir), want) <= 1e-4  # PEFT reads it too


def test_get_adapter_state_dict_and_delete(patched, folders):
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(ids["lora"])
    sd = model.get_adapter_state_dict()
    assert sd and all(not k.startswith("base_model.model.") for k in sd)
    assert set(sd) == {k[len("base_model.model."):] for k in peftcore.get_adapter_state_dict(model)}
    model.delete_adapter("default")
    assert not model._hf_peft_config_loaded and not hasattr(model, "peft_config")
    with pytest.raises(ValueError, match="No adapter loaded"):
        model.active_adapters()


def test_load_adapter_from_a_state_dict(patched, folders):
    model_id, ids = folders
    src = AutoModelForCausalLM.from_pretrained(ids["lora"])
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.load_adapter(peft_config=src.peft_config["default"].to_dict(), adapter_state_dict=src.get_adapter_state_dict())
    assert torch.equal(logits(model), logits(src))


def test_unpatch_restores_transformers_exactly():
    from transformers import pipelines
    from transformers.integrations import peft as hf_peft
    from transformers.integrations.peft import PeftAdapterMixin
    from transformers.models.auto import auto_factory

    from transformers import Trainer

    owners = (PeftAdapterMixin, PreTrainedModel, Trainer, hf_peft, auto_factory, pipelines)
    before = [dict(vars(o)) for o in owners]
    try:
        peftcore.patch_transformers()
        peftcore.patch_transformers()  # idempotent
        assert transformers_patch.is_patched()
        assert PeftAdapterMixin.load_adapter is transformers_patch.load_adapter
    finally:
        peftcore.unpatch_transformers()
    assert not transformers_patch.is_patched()
    after = [dict(vars(o)) for o in owners]
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(b[k] is a[k] for k in b)


@pytest.mark.parametrize("call,name", [
    (lambda m, d: m.load_adapter(d, device_map="cuda:0"), "device_map"),
    (lambda m, d: m.load_adapter(d, adapter_kwargs={"proxies": {"https": "x"}}), "proxies"),
    (lambda m, d: m.load_adapter(d, weights_only=False), "weights_only"),
    (lambda m, d: m.load_adapter(d, adapter_name="default") or m.load_adapter(d), "already exists"),
])
def test_refused_parameters_are_named_and_change_nothing(patched, folders, call, name):
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(model_id)
    if name == "already exists":
        model.load_adapter(ids["lora"])
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match=name):
        call(model, ids["lora"])
    assert_unchanged(model, snap)


def test_refused_save_options(patched, folders, tmp_path):
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(ids["lora"])
    for kw, name in (({"push_to_hub": True}, "push_to_hub"), ({"state_dict": {}}, "state_dict"),
                     ({"safe_serialization": False}, "safe_serialization")):
        with pytest.raises(ValueError, match=name):
            model.save_pretrained(tmp_path / "x", **kw)
    with pytest.raises(ValueError, match="state_dict"):
        model.get_adapter_state_dict(state_dict={})


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, length=16):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 100, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("base", ["fp32", "nf4", "int8"])
def test_train_with_the_trainer_and_resume(patched, folders, tmp_path, base):
    """The guide's "Train a PEFT adapter": add_adapter, then Trainer(model=model) with no
    callback; checkpoints are PEFT-format adapters; resume_from_checkpoint continues with
    the losses of an uninterrupted run; the final save loads back."""
    from transformers import BitsAndBytesConfig, Trainer, TrainingArguments

    model_id, _ = folders
    if base != "fp32":
        pytest.importorskip("bitsandbytes")
    flag = {"nf4": {"load_in_4bit": True}, "int8": {"load_in_8bit": True}}.get(base)
    qc = {"quantization_config": BitsAndBytesConfig(**flag), "device_map": "cpu"} if flag else {}

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_id, **qc)
        peft_config = peft.LoraConfig(lora_alpha=16, lora_dropout=0.0, r=8, bias="none", task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model.add_adapter(peft_config)
        args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                 save_strategy="steps", save_steps=2, logging_steps=1, seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_Rows())
        trainer.train(resume_from_checkpoint=resume)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        return model, losses

    whole, losses = run(tmp_path / "whole", 4)
    ckpt = tmp_path / "whole" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the adapter only, not the base
    resumed, resumed_losses = run(tmp_path / "whole", 4, resume=str(ckpt))
    assert {3, 4} <= set(resumed_losses)  # (steps 1-2 come from the checkpoint's trainer state)
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5), (step, losses, resumed_losses)
    final = tmp_path / "final"
    resumed.save_pretrained(final)
    again = AutoModelForCausalLM.from_pretrained(str(final), **qc)
    assert torch.equal(logits(again), logits(resumed))


HIDDEN_PEFT = r'''
import importlib.util, json, sys


class _Hide:  # PEFT made invisible: find_spec says "not installed", import fails
    def __init__(self, f):
        self.f = f

    def find_spec(self, name, path=None, target=None):
        if name == "peft" or name.startswith("peft."):
            return None
        return self.f.find_spec(name, path, target)

    def __getattr__(self, a):
        return getattr(self.f, a)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
assert importlib.util.find_spec("peft") is None
import torch
from transformers import AutoModelForCausalLM

import peftcore

model_id, cases, out = sys.argv[1:4]
peftcore.patch_transformers()
ids = torch.arange(24).reshape(2, 12) * 7 % 99 + 1


def logits(m):
    m.eval()
    with torch.no_grad():
        return m(ids).logits


for case in json.load(open(cases)):
    adapter, want, kw = case["adapter"], torch.load(case["want"]), case["kwargs"]
    model = AutoModelForCausalLM.from_pretrained(adapter, **kw)  # the base from the adapter's config
    assert torch.allclose(logits(model), want, rtol=0, atol=1e-5), case
    if not kw:
        model = AutoModelForCausalLM.from_pretrained(model_id)
        model.load_adapter(adapter)
        assert torch.allclose(logits(model), want, rtol=0, atol=1e-5), case
model = AutoModelForCausalLM.from_pretrained(model_id)
model.add_adapter(peftcore.LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False),
                  adapter_name="adapter_1")
model.set_adapter("adapter_1")
mine = logits(model)
model.save_pretrained(out)
again = AutoModelForCausalLM.from_pretrained(out)
assert torch.equal(logits(again), mine)
assert "peft" not in sys.modules
print("ok")
'''


def test_the_guide_runs_without_peft_installed(folders, tmp_path):
    """The same blocks in a process where PEFT cannot be imported, with peftcore's configs:
    every method from its folder (expected: PEFT's outputs, computed here), and LoRA / IA3
    on 8-bit and 4-bit bases (expected: this process's patched peftcore, bit for bit)."""
    import json
    import subprocess
    import sys

    model_id, ids = folders
    cases = []
    for m, d in ids.items():
        cases.append({"adapter": d, "want": str(tmp_path / f"want_{m}.pt"), "kwargs": {}})
        torch.save(_peft_logits(model_id, d), cases[-1]["want"])
    if importlib.util.find_spec("bitsandbytes") is not None:
        peftcore.patch_transformers()
        try:
            for m in ("lora", "ia3"):
                for flag in ("load_in_8bit", "load_in_4bit"):
                    kw = {"device_map": "auto", flag: True}
                    cases.append({"adapter": ids[m], "want": str(tmp_path / f"want_{m}_{flag}.pt"), "kwargs": kw})
                    torch.save(logits(AutoModelForCausalLM.from_pretrained(ids[m], **kw)), cases[-1]["want"])
        finally:
            peftcore.unpatch_transformers()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "hidden.py"
    script.write_text(HIDDEN_PEFT)
    r = subprocess.run([sys.executable, str(script), model_id, str(tmp_path / "cases.json"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_pipeline_with_an_adapter_folder(patched, folders):
    """pipeline("text-generation", model=adapter_folder): the base from the adapter's
    config (with its tokenizer: a tiny word-level one saved here), then the adapter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    model_id, ids = folders
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2").save_pretrained(model_id)
    pipe = pipeline("text-generation", model=ids["lora"])
    assert peftcore.active_adapters(pipe.model) == ["default"]
    assert rel_err(logits(pipe.model), _peft_logits(model_id, ids["lora"])) <= 1e-4
    out = pipe("w5 w6 w7", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w6 w7")


def test_trainer_load_best_model_at_end(patched, folders, tmp_path):
    """load_best_model_at_end: the model ends with the best checkpoint's adapter."""
    from transformers import Trainer, TrainingArguments

    model_id, _ = folders
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.add_adapter(peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      lora_dropout=0.0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="steps", save_steps=1,
                             eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=False, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), eval_dataset=_Rows(n=4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    want = logits(AutoModelForCausalLM.from_pretrained(best))
    assert torch.equal(logits(model), want)
    # The best checkpoint may be the last one: move the adapter away and load it again.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(0.5)
    assert not torch.equal(logits(model), want)
    trainer._load_best_model()
    assert torch.equal(logits(model), want)


def test_functional_api_sets_what_transformers_reads(folders):
    """A model given adapters by the functional API carries peft_config (the live {name:
    config}); transformers' _hf_peft_config_loaded answers True only while patched (unpatched
    transformers would hand such a model to PEFT); a failed load leaves nothing behind."""
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(model_id)
    snap = model_snapshot(model)
    with pytest.raises(peftcore.PeftcoreError):
        peftcore.load_adapter(model, ids["lora"], adapter_name="bad name")
    assert_unchanged(model, snap)
    assert "peft_config" not in vars(model)
    peftcore.load_adapter(model, ids["lora"])
    peftcore.load_adapter(model, ids["lora"], adapter_name="second")
    assert list(model.peft_config) == ["default", "second"] and not model._hf_peft_config_loaded
    peftcore.patch_transformers()
    try:
        assert model._hf_peft_config_loaded and model.active_adapters() == ["second"]
        model.delete_adapter(["second", "default"])
        assert "peft_config" not in vars(model) and not model._hf_peft_config_loaded
    finally:
        peftcore.unpatch_transformers()


def test_hotswap_through_load_adapter(patched, folders, tmp_path):
    """enable_peft_hotswap, then load_adapter onto a loaded name swaps the weights in place
    (hotswap="auto"), as does hotswap=True; enable_peft_hotswap after a load is refused."""
    model_id, ids = folders
    base = AutoModelForCausalLM.from_pretrained(model_id)
    other = peft_adapter_dir(tmp_path, base, CONFIGS["lora"](), name="other", seed=7)
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model.enable_peft_hotswap(target_rank=8)
    model.load_adapter(ids["lora"])
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    model.load_adapter(other, adapter_name="default")  # "auto": a swap, not a second adapter
    assert model.active_adapters() == ["default"] and list(model.peft_config) == ["default"]
    assert all(p is params[n] for n, p in model.named_parameters() if ".lora_" in n)  # in place
    assert rel_err(logits(model), _peft_logits(model_id, other)) <= 1e-4
    model.load_adapter(ids["lora"], adapter_name="default", hotswap=True)
    assert rel_err(logits(model), _peft_logits(model_id, ids["lora"])) <= 1e-4
    with pytest.raises(ValueError, match="before loading"):
        model.enable_peft_hotswap()
    with pytest.raises(ValueError, match="existing adapter"):
        model.load_adapter(other, adapter_name="nope", hotswap=True)
    bigger = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "fc1"]),
                              name="bigger")
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match="rank 8 .* rank 4"):
        model.load_adapter(bigger, adapter_name="default")
    assert_unchanged(model, snap)


def test_a_folder_holding_a_full_model_and_an_adapter(patched, folders, tmp_path):
    """transformers' rule: a folder with both config.json and adapter_config.json loads the
    model in that folder (not the adapter config's base_model_name_or_path), then the adapter."""
    import shutil

    model_id, ids = folders
    both = tmp_path / "both"
    shutil.copytree(model_id, both)
    for f in os.listdir(ids["lora"]):
        shutil.copy(os.path.join(ids["lora"], f), both)
    cfg = os.path.join(both, "adapter_config.json")
    with open(cfg) as f:
        text = f.read().replace(model_id, "/nonexistent/base")  # must not be used
    with open(cfg, "w") as f:
        f.write(text)
    model = AutoModelForCausalLM.from_pretrained(str(both))
    assert model.active_adapters() == ["default"]
    assert rel_err(logits(model), _peft_logits(model_id, ids["lora"])) <= 1e-4


def test_from_pretrained_adapter_with_dtype(patched, folders):
    """from_pretrained(adapter, dtype=bf16): a bf16 base with float32 adapter factors (PEFT's
    autocast_adapter_dtype), outputs as PEFT's on the same bf16 base within bf16 rounding."""
    model_id, ids = folders
    model = AutoModelForCausalLM.from_pretrained(ids["lora"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    factors = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    theirs = logits(peft_model(AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16),
                               {"default": ids["lora"]}))
    # Both round the base in bf16 and add float32 adapter terms; they round in different
    # places (PEFT rounds the base and the LoRA output separately), a few bf16 ulps apart.
    assert rel_err(logits(model), theirs) <= 2**-6
