"""``peftcore.mixed_batch``: every row of a batch with its own adapter.

Oracles: each row run alone with its adapter active (``set_adapter``; ``"__base__"`` rows
with adapters disabled), and PEFT's own ``adapter_names`` forward / generate for LoRA
(PEFT ignores per-row adapters for IA3, so there only the row-alone oracle applies). In
forward and in generate (greedy, beam search with num_return_sequences, sampling), for
LoRA / IA3 / AdaLoRA, fp32 and bitsandbytes nf4 / int8 bases; then the refusals."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft  # noqa: E402

import peftcore  # noqa: E402
from tests._models import (  # noqa: E402
    INPUT_IDS, fresh_base, perturb_trainable, quantized_model, rel_err, saved_tiny, tiny_bert,
)

NAMES = ["b", "__base__", "a", "c", "a"]  # three adapters of different ranks, the base, a repeat
IDS = torch.cat([INPUT_IDS, INPUT_IDS.flip(1), INPUT_IDS[:1] % 50 + 3])  # 5 distinct rows of 12 tokens
RTOL = 1e-5  # fp32: the same math with batch-size dependent GEMM blocking (~1e-7 observed)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CONFIGS = {
    "lora": [peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=t, init_lora_weights=False)
             for r, t in ((2, ["q_proj", "v_proj"]), (4, ["q_proj", "fc1", "fc2"]), (8, "all-linear"))],
    "ia3": [peft.IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                           init_ia3_weights=False),
            peft.IA3Config(target_modules=["v_proj", "fc1"], feedforward_modules=["fc1"], init_ia3_weights=False),
            peft.IA3Config(target_modules=["q_proj", "fc1"], feedforward_modules=["fc1"], init_ia3_weights=False)],
    "adalora": [peft.AdaLoraConfig(init_r=r, total_step=10, lora_alpha=a, target_modules=["q_proj", "v_proj", "fc1"])
                for r, a in ((2, 3), (5, 7), (3, 1))],
}


LLAMA_NAMES = {"fc1": "up_proj", "fc2": "down_proj"}  # OPT's MLP names -> Llama's


def _for(arch, cfg):
    """cfg with OPT module names translated for `arch`."""
    cfg = copy.deepcopy(cfg)
    if arch == "llama":
        for f in ("target_modules", "feedforward_modules"):
            v = getattr(cfg, f, None)
            if isinstance(v, (list, set)):
                setattr(cfg, f, [LLAMA_NAMES.get(n, n) for n in v])
    return cfg


def _dirs(tmp_path, base, configs, arch="opt"):
    out = {}
    for i, (name, cfg) in enumerate(zip("abc", configs)):
        # PEFT initialises from the global RNG: seed it, so that the weights (and the
        # greedy decodes compared below) do not depend on which tests ran before.
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), _for(arch, cfg))
        perturb_trainable(pm, seed=10 + i)
        pm.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def _loaded(base, dirs):
    model = copy.deepcopy(base)
    for n, d in dirs.items():
        peftcore.load_adapter(model, d, adapter_name=n)
    return model.eval()


def _peft(base, dirs):
    items = list(dirs.items())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), items[0][1], adapter_name=items[0][0])
    for n, d in items[1:]:
        pm.load_adapter(d, adapter_name=n)
    return pm.eval()


@torch.no_grad()
def _alone(model, names, fn):
    """fn(row index) with row i's adapter active (the base with adapters disabled)."""
    outs = []
    for i, n in enumerate(names):
        if n == "__base__":
            with peftcore.adapters_disabled(model):
                outs.append(fn(i))
        else:
            peftcore.set_adapter(model, n)
            outs.append(fn(i))
    return outs


# OPT flattens its MLP input to [batch * tokens, hidden] (PEFT's adapter_names then fails
# there); Llama keeps [batch, tokens, hidden]. Both work here.
@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_equals_each_row_alone_and_peft(tmp_path, method, arch):
    base, _ = fresh_base(arch)
    dirs = _dirs(tmp_path, base, CONFIGS[method], arch)
    model = _loaded(base, dirs)
    peftcore.set_adapter(model, "c")
    before = model(input_ids=IDS).logits.detach()
    with torch.no_grad(), peftcore.mixed_batch(model, NAMES):
        got = model(input_ids=IDS).logits
    want = torch.cat(_alone(model, NAMES, lambda i: model(input_ids=IDS[i:i + 1]).logits))
    assert rel_err(got, want) < RTOL
    # The rows really differ by adapter: with "a" for every row, row 0 ("b") changes, row 2 not.
    peftcore.set_adapter(model, "a")
    with torch.no_grad():
        all_a = model(input_ids=IDS).logits
    assert rel_err(got[0], all_a[0]) > 1e-3 and rel_err(got[2], all_a[2]) < RTOL
    if method == "lora" and arch == "llama":  # PEFT's mixed batch (it ignores adapter_names for IA3)
        with torch.no_grad():
            assert rel_err(got, _peft(base, dirs)(input_ids=IDS, adapter_names=NAMES).logits) < RTOL
    # After the block the active adapter runs again, unchanged.
    peftcore.set_adapter(model, "c")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)


GEN = {
    "greedy": dict(max_new_tokens=6, do_sample=False),
    "beams_return2": dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", list(GEN))
@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
def test_generate_equals_each_row_alone(tmp_path, method, mode):
    base, _ = fresh_base("llama")
    dirs = _dirs(tmp_path, base, CONFIGS[method], "llama")
    model = _loaded(base, dirs)
    kw = dict(GEN[mode], pad_token_id=1, attention_mask=torch.ones_like(IDS))
    with torch.no_grad(), peftcore.mixed_batch(model, NAMES):
        got = model.generate(IDS, **kw)
    kw1 = dict(kw, attention_mask=torch.ones_like(IDS[:1]))
    want = _alone(model, NAMES, lambda i: model.generate(IDS[i:i + 1], **kw1))
    assert torch.equal(got, torch.cat(want)), (got, want)
    if method == "lora":
        with torch.no_grad():
            assert torch.equal(got, _peft(base, dirs).generate(input_ids=IDS, adapter_names=NAMES, **kw))


def test_sampling_equals_peft(tmp_path):
    """Sampling draws for the whole batch at once: the same seed gives PEFT's tokens."""
    base, _ = fresh_base("llama")
    dirs = _dirs(tmp_path, base, CONFIGS["lora"], "llama")
    model, pm = _loaded(base, dirs), _peft(base, dirs)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=2, pad_token_id=1,
              attention_mask=torch.ones_like(IDS))
    torch.manual_seed(7)
    with torch.no_grad(), peftcore.mixed_batch(model, NAMES):
        got = model.generate(IDS, **kw)
    torch.manual_seed(7)
    with torch.no_grad():
        # PEFT does not expand adapter_names with the batch: give it one name per sequence.
        want = pm.generate(input_ids=IDS, adapter_names=[n for n in NAMES for _ in range(2)], **kw)
    assert got.shape == (2 * len(NAMES), IDS.shape[1] + 6) and torch.equal(got, want)


def test_modules_to_save_rows(tmp_path):
    """A classifier trained in full (modules_to_save) runs per row too, as in PEFT."""
    base = tiny_bert(num_labels=3)
    cfgs = [peft.LoraConfig(r=r, target_modules=["query", "value"], modules_to_save=["classifier"],
                            init_lora_weights=False, task_type="SEQ_CLS") for r in (2, 4)]
    cfgs.append(peft.LoraConfig(r=3, target_modules=["key"], init_lora_weights=False, task_type="SEQ_CLS"))
    dirs = _dirs(tmp_path, base, cfgs)
    model = _loaded(base, dirs)
    with torch.no_grad(), peftcore.mixed_batch(model, NAMES):
        got = model(input_ids=IDS).logits
    want = torch.cat(_alone(model, NAMES, lambda i: model(input_ids=IDS[i:i + 1]).logits))
    assert rel_err(got, want) < RTOL
    with torch.no_grad():
        assert rel_err(got, _peft(base, dirs)(input_ids=IDS, adapter_names=NAMES).logits) < RTOL


QUANT = {"nf4": dict(bits=4), "int8": dict(bits=8)}


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
@pytest.mark.parametrize("q", list(QUANT))
def test_quantized_bases(tmp_path, q, method):
    base = quantized_model(saved_tiny(tmp_path, "llama"), **QUANT[q])
    cfgs = {
        "lora": [peft.LoraConfig(r=r, target_modules=t, init_lora_weights=False)
                 for r, t in ((2, ["q_proj"]), (4, ["q_proj", "down_proj"]), (8, "all-linear"))],
        "ia3": [peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                               init_ia3_weights=False),
                peft.IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=[], init_ia3_weights=False),
                peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)],
        "adalora": [peft.AdaLoraConfig(init_r=r, total_step=10, target_modules=["q_proj", "up_proj"]) for r in (2, 4, 3)],
    }[method]
    dirs = _dirs(tmp_path, base, cfgs)
    model = _loaded(base, dirs)
    with torch.no_grad(), peftcore.mixed_batch(model, NAMES):
        got = model(input_ids=IDS).logits
    want = torch.cat(_alone(model, NAMES, lambda i: model(input_ids=IDS[i:i + 1]).logits))
    # Quantized bases: 1-2 token rows take the fused GEMV, more take the panel kernel; both
    # are fp32 products and accumulation in another order (~1e-6 relative per layer).
    assert rel_err(got, want) < 1e-4
    # The rows really differ by adapter: with "a" for every row, row 0 ("b") changes, row 2 not.
    peftcore.set_adapter(model, "a")
    with torch.no_grad():
        all_a = model(input_ids=IDS).logits
    assert rel_err(got[0], all_a[0]) > 1e-3 and rel_err(got[2], all_a[2]) < 1e-4


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def lora_model(tmp_path):
    base, _ = fresh_base("opt")
    return _loaded(base, _dirs(tmp_path, base, CONFIGS["lora"]))


def test_wrong_batch_size_is_named(lora_model):
    with torch.no_grad(), peftcore.mixed_batch(lora_model, ["a", "b"]):
        # 3 rows of 12 tokens would split evenly into 2 groups of 18 tokens: checked on the batch
        with pytest.raises(peftcore.PeftcoreError, match=r"the batch has 3 rows but 2 adapter names"):
            lora_model(input_ids=IDS[:3])
        with pytest.raises(peftcore.PeftcoreError, match=r"the batch has 1 rows but 2 adapter names"):
            lora_model.generate(IDS[:1], max_new_tokens=2, pad_token_id=1)


def test_refusals_change_nothing(lora_model):
    with torch.no_grad():
        before = lora_model(input_ids=IDS).logits
    with pytest.raises(peftcore.AdapterNameError, match=r"unknown adapter\(s\) \['zz'\].*'__base__'"):
        with peftcore.mixed_batch(lora_model, ["a", "zz"]):
            pass
    with pytest.raises(peftcore.AdapterNameError, match="a list"):
        with peftcore.mixed_batch(lora_model, "a"):
            pass
    with pytest.raises(peftcore.AdapterNameError, match="empty"):
        with peftcore.mixed_batch(lora_model, []):
            pass
    lora_model.train()
    with pytest.raises(peftcore.PeftcoreError, match="inference only"):
        with peftcore.mixed_batch(lora_model, ["a"]):
            pass
    lora_model.eval()
    with peftcore.mixed_batch(lora_model, ["a", "b"]):
        with pytest.raises(peftcore.PeftcoreError, match="already open"):
            with peftcore.mixed_batch(lora_model, ["a"]):
                pass
        with pytest.raises(peftcore.PeftcoreError, match="used by the open peftcore.mixed_batch"):
            peftcore.delete_adapter(lora_model, "b")
    peftcore.merge_adapter(lora_model, ["a"])
    with pytest.raises(peftcore.PeftcoreError, match="merged into .*unmerge_adapter"):
        with peftcore.mixed_batch(lora_model, ["a"]):
            pass
    peftcore.unmerge_adapter(lora_model)
    with torch.no_grad():
        assert rel_err(lora_model(input_ids=IDS).logits, before) < 1e-5  # unmerge: fp32 round trip


def test_peft_style_kwarg_points_to_mixed_batch(lora_model):
    layer = next(m for m in lora_model.modules() if isinstance(m, peftcore.layers.LoraLinear))
    with pytest.raises(peftcore.PeftcoreError, match="mixed_batch"):
        layer(torch.randn(2, layer.in_features), adapter_names=["a", "b"])


def test_lora_embedding_refused(tmp_path):
    base, _ = fresh_base("opt")
    dirs = _dirs(tmp_path, base, [peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                  init_lora_weights=False)])
    model = _loaded(base, dirs)
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"embed_tokens.*embedding"):
        with peftcore.mixed_batch(model, ["a", "__base__"]):
            pass
