"""LoRA on bitsandbytes-quantized bases (Linear4bit nf4/fp4, Linear8bitLt), on CPU.

Two oracles for every forward:

* exact: the same model with each bitsandbytes layer replaced by an nn.Linear holding
  bitsandbytes' own dequantization of its weight (``dequantized_copy``), plus PEFT's LoRA.
  peftcore's quantized kernels are specified against exactly that weight, so fp32 logits
  agree to fp32 summation order (EXACT_RTOL).
* PEFT on the quantized model itself (bitsandbytes' kernels). Those are not exact on CPU:
  Linear4bit in eval mode repacks its weight and computes with x and absmax rounded to
  bfloat16 (relative error <= 2**-9 each, so <= 2**-8 per product); Linear8bitLt casts x to
  float16 and quantizes it row-wise to int8 (relative error <= 1/254 of the row's absmax,
  plus the outlier split at threshold 6). To first order these errors add up over the
  quantized matmuls the logits pass through (N_QLINEAR of them), which gives BNB4_RTOL and
  BNB8_RTOL.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peftcore  # noqa: E402
from peftcore.layers import LoraLinear4bit, LoraLinear8bit  # noqa: E402
from tests._models import (  # noqa: E402
    INPUT_IDS,
    assert_unchanged,
    bnb_dense_weight,
    dequantized_copy,
    fresh_base,
    logits,
    model_snapshot,
    peft_adapter_dir,
    peft_model,
    quantized_model,
    rel_err,
    saved_tiny,
    tiny_llama,
)
from tests.helpers import largest_allocation  # noqa: E402

EXACT_RTOL = 1e-4
N_QLINEAR = 2 * 7  # tiny llama: 2 layers x (q, k, v, o, gate, up, down); OPT has fewer
BNB4_RTOL = N_QLINEAR * 2**-8
BNB8_RTOL = N_QLINEAR / 254

# Every quantized layer is targeted, so the exact oracle covers the whole model (layers
# left to bitsandbytes would carry its CPU rounding).
TARGETS = {"llama": "all-linear", "opt": "all-linear"}

Q4 = {
    "nf4-dq-b64-fp32": dict(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32),
    "nf4-b128-bf16": dict(quant_type="nf4", double_quant=False, blocksize=128, compute_dtype=torch.bfloat16),
    "fp4-dq-b128-fp32": dict(quant_type="fp4", double_quant=True, blocksize=128, compute_dtype=torch.float32),
    "fp4-b64-bf16": dict(quant_type="fp4", double_quant=False, blocksize=64, compute_dtype=torch.bfloat16),
    # packed bytes stored as bfloat16 (FSDP-style quant_storage)
    "nf4-dq-b64-fp32-storage-bf16": dict(quant_type="nf4", double_quant=True, blocksize=64,
                                         compute_dtype=torch.float32, quant_storage=torch.bfloat16),
}
CASES = [("llama", 4, k, v) for k, v in Q4.items()] + [
    ("opt", 4, "nf4-dq-b64-fp32", Q4["nf4-dq-b64-fp32"]),
    ("llama", 8, "int8", {}),
    ("opt", 8, "int8", {}),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quant")


def _qmodel(root, arch="llama", bits=4, **kw):
    return quantized_model(saved_tiny(root, arch), bits, **kw)


def _lora_layers(model, cls=(LoraLinear4bit, LoraLinear8bit)):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


# ---------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("arch,bits,cid,kw", CASES, ids=[f"{a}-{c}" for a, _, c, _ in CASES])
def test_peft_adapter_parity_and_round_trip(root, tmp_path, arch, bits, cid, kw, monkeypatch):
    model = _qmodel(root, arch, bits, **kw)
    oracle = dequantized_copy(model)  # before any bitsandbytes forward (standard layout)
    pristine = copy.deepcopy(model)
    # A PEFT adapter made on the quantized model (PEFT's bnb LoRA layers), non-zero B.
    ad = peft_adapter_dir(tmp_path, model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    want_bnb = logits(peft_model(model, {"default": ad}))
    want_exact = logits(peft_model(oracle, {"default": ad}))

    peftcore.load_adapter(model, ad)
    layers = _lora_layers(model)
    assert layers and all(isinstance(m, LoraLinear4bit if bits == 4 else LoraLinear8bit) for _, m in layers)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    # The default: float32 x rounded to bf16 for the base products (on AVX512_BF16 CPUs,
    # as bitsandbytes' packed CPU kernel rounds it), held to bitsandbytes' own tolerance.
    assert rel_err(logits(model), want_bnb) <= (BNB4_RTOL if bits == 4 else BNB8_RTOL)
    # Exact float32 products (the opt-in) give the exact model. With a bf16 compute dtype
    # both sides round x to bf16 before the base product: fp32 summation-order differences
    # upstream can flip such a rounding (one bf16 ulp, 2**-8 relative), so the exact
    # comparison allows that much there.
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    got = logits(model)
    assert rel_err(got, want_exact) <= (2**-8 if kw.get("compute_dtype") == torch.bfloat16 else EXACT_RTOL)
    assert rel_err(got, want_bnb) <= (BNB4_RTOL if bits == 4 else BNB8_RTOL)

    # peftcore -> PEFT: same keys, shapes and values as PEFT's file; PEFT loads it.
    ours = tmp_path / "ours"
    peftcore.save_pretrained(model, ours)
    a, b = load_file(ours / "adapter_model.safetensors"), load_file(os.path.join(ad, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("q_proj.lora_A.weight") for k in a)
    assert torch.equal(logits(peft_model(pristine, {"default": str(ours)})), want_bnb)


def test_bf16_model_4bit(root, tmp_path):
    """A bfloat16 model (torch_dtype) with a 4-bit base and fp32 compute dtype."""
    model = _qmodel(root, "llama", 4, torch_dtype=torch.bfloat16, **Q4["nf4-dq-b64-fp32"])
    oracle = dequantized_copy(model)
    ad = peft_adapter_dir(tmp_path, model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    want_bnb = logits(peft_model(model, {"default": ad})).float()
    want_exact = logits(peft_model(oracle, {"default": ad})).float()
    peftcore.load_adapter(model, ad)
    got = logits(model)
    assert got.dtype == torch.bfloat16
    # bf16 activations: the oracle rounds W to bf16 inside its bf16 nn.Linear, peftcore
    # reads it exactly (fp32); PEFT adds base and LoRA after rounding each to bf16.
    assert rel_err(got.float(), want_exact) <= N_QLINEAR * 2**-8
    # Against bitsandbytes' own kernels: their CPU rounding of x and absmax (BNB4_RTOL,
    # module docstring) plus, in a bf16 model, one more bf16 rounding per quantized
    # matmul where PEFT rounds base and LoRA separately (N_QLINEAR * 2**-8 = BNB4_RTOL).
    assert rel_err(got.float(), want_bnb) <= 2 * BNB4_RTOL


def test_peftcore_runs_without_bitsandbytes():
    """bitsandbytes is optional: with it blocked, peftcore imports, adapts and merges fp models."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import peftcore\n"
        "from tests._models import tiny_opt, logits\n"
        "m = tiny_opt(); peftcore.add_adapter(m, peftcore.LoraConfig(r=2, target_modules=['q_proj'], init_lora_weights=False))\n"
        "a = logits(m); peftcore.merge_and_unload(m)\n"
        "assert (logits(m) - a).abs().max() < 1e-5 and sys.modules['bitsandbytes'] is None\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------- packed CPU layout
def test_packed_cpu_layout_converted_back_exactly(root, tmp_path):
    model = _qmodel(root, "llama", 4, **Q4["nf4-dq-b64-fp32"])
    before = logits(model)  # bitsandbytes' first eval forward packs every Linear4bit
    q4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q4 and all(m.weight.quant_state.packing_format_for_cpu for m in q4)
    packed = {id(m): (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in q4}
    ad = peft_adapter_dir(tmp_path, tiny_llama(0, hidden_size=128, intermediate_size=256),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    want = logits(peft_model(model, {"default": ad}))  # PEFT on the packed model

    peftcore.load_adapter(model, ad)
    layers = _lora_layers(model)
    assert len(layers) == 6
    for _, layer in layers:
        w = layer.base_layer.weight
        qs = w.quant_state
        assert not qs.packing_format_for_cpu and not qs.nested and qs.dtype == torch.float32
        assert tuple(w.shape) == (layer.in_features * layer.out_features // 2, 1) and w.dtype == torch.uint8
        assert qs.absmax.dtype == torch.float32 and qs.absmax.shape == (layer.in_features * layer.out_features // 64,)
        # bitsandbytes' own packing of the converted layer gives back the same bytes: exact.
        data, state = bnb.functional._convert_weight_packed_for_cpu(w.data.clone(), copy.deepcopy(qs))
        d0, a0 = packed[id(layer.base_layer)]
        assert torch.equal(data, d0) and torch.equal(state.absmax, a0)
    with peftcore.adapters_disabled(model):
        assert rel_err(logits(model), before) <= BNB4_RTOL
    assert rel_err(logits(model), want) <= BNB4_RTOL
    # bitsandbytes still runs the converted layers (it re-packs them on its next forward).
    peftcore.unload(model)
    assert rel_err(logits(model), before) <= 1e-6


# ---------------------------------------------------------------------- switching
def test_switch_disable_delete(root, tmp_path, monkeypatch):
    # Whole-model logits against PEFT's to float32 tolerances: exact float32 products (the
    # opt-in; the default path is held to bitsandbytes' tolerance above and to its bounds
    # op by op in tests/ops/test_quantized_ops.py).
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    model = _qmodel(root, "llama", 4, **Q4["fp4-dq-b128-fp32"])
    oracle = dequantized_copy(model)
    base_exact = logits(oracle)
    fp = tiny_llama(0, hidden_size=128, intermediate_size=256)
    dirs = {
        "a": peft_adapter_dir(tmp_path, fp, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=1),
        "b": peft_adapter_dir(tmp_path, fp, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed=2),
    }
    pm = peft_model(oracle, dirs)
    for n, d in dirs.items():
        peftcore.load_adapter(model, d, n)
    for active in (["a"], ["b"], ["a", "b"]):
        peftcore.set_adapter(model, active)
        pm.base_model.set_adapter(active)
        assert rel_err(logits(model), logits(pm)) <= EXACT_RTOL, active
    with peftcore.adapters_disabled(model):
        assert rel_err(logits(model), base_exact) <= EXACT_RTOL
    peftcore.delete_adapter(model, "b")
    peftcore.delete_adapter(model, "a")
    assert not _lora_layers(model)
    assert all(type(m) is bnb.nn.Linear4bit for n, m in model.named_modules() if n.endswith("proj"))
    assert rel_err(logits(model), base_exact) <= BNB4_RTOL  # bitsandbytes' own forward again


def test_from_pretrained_load_in_kbit(root, tmp_path):
    base_dir = saved_tiny(root, "llama")
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(base_dir)
    ad = peft_adapter_dir(tmp_path, fp, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    m4 = peftcore.from_pretrained(ad, load_in_4bit=True, device_map="cpu")
    layer = m4.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear4bit) and layer.base_layer.weight.quant_state.quant_type == "fp4"
    m8 = peftcore.from_pretrained(ad, load_in_8bit=True, device_map="cpu")
    assert isinstance(m8.model.layers[1].self_attn.v_proj, LoraLinear8bit)
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    m = peftcore.from_pretrained(ad, quantization_config=qc, device_map="cpu")
    assert m.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    with pytest.raises(peftcore.PeftcoreError, match="not both"):
        peftcore.from_pretrained(ad, load_in_4bit=True, load_in_8bit=True)


# ---------------------------------------------------------------------- refused input
def _fp16_weights_int8_model():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    layer = bnb.nn.Linear8bitLt(q.in_features, q.out_features, bias=False, has_fp16_weights=True)
    layer.weight = bnb.nn.Int8Params(q.weight.detach().clone(), requires_grad=False, has_fp16_weights=True)
    model.model.layers[0].self_attn.q_proj = layer
    return model.eval()


def test_refuses_has_fp16_weights(tmp_path):
    model = _fp16_weights_int8_model()
    snap = model_snapshot(model)
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*has_fp16_weights"):
        peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bits", [4, 8])
def test_refuses_quantized_layer_off_cpu(root, tmp_path, monkeypatch, bits):
    """A quantized layer on a device this build has no kernel for (here: a CPU-only build,
    CUDA faked) is refused, naming module and device, model unchanged."""
    model = _qmodel(root, "llama", bits)
    # A first adapter on every quantized layer, so "unchanged" covers adapter state too; it
    # also keeps bitsandbytes from ever running (and packing) a layer: bitsandbytes'
    # state_dict() of a packed layer re-quantizes its absmax each call (not reproducible).
    peftcore.load_adapter(model, peft_adapter_dir(tmp_path, tiny_llama(0, hidden_size=128, intermediate_size=256),
                                                  peft.LoraConfig(r=2, target_modules="all-linear")), "ok")
    snap = model_snapshot(model)
    from peftcore import inject

    real = inject.quantized_device
    monkeypatch.setattr(inject, "quantized_device",
                        lambda b: torch.device("cuda", 0) if b.out_features == 256 else real(b))
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"model\.layers\.0\.mlp\.gate_proj.*cuda:0"):
        peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules="all-linear"), "x")
    with pytest.raises(peftcore.UnsupportedAdapterError, match="cuda:0"):
        peftcore.load_adapter(model, peft_adapter_dir(tmp_path, tiny_llama(0, hidden_size=128, intermediate_size=256),
                                                      peft.LoraConfig(r=2, target_modules=["up_proj"])), "y")
    assert_unchanged(model, snap)


def test_refuses_bad_4bit_settings(root):
    model = _qmodel(root, "llama", 4)
    cfg = peftcore.LoraConfig(r=2, target_modules=["q_proj"])
    q = model.model.layers[0].self_attn.q_proj
    q.weight.quant_state.quant_type = "int4"
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"layers\.0\.self_attn\.q_proj.*quant_type 'int4'"):
        peftcore.add_adapter(model, cfg)
    q.weight.quant_state.quant_type = "nf4"
    # A Params4bit that was never quantized (bitsandbytes quantizes on .to(device)).
    model.model.layers[1].self_attn.q_proj = bnb.nn.Linear4bit(128, 128, bias=False, quant_type="nf4")
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"layers\.1\.self_attn\.q_proj.*not quantized"):
        peftcore.add_adapter(model, cfg)
    assert not _lora_layers(model) and peftcore.active_adapters(model) == []


def test_refuses_quantized_embedding():
    model = tiny_llama()
    emb = model.model.embed_tokens
    q = bnb.nn.Embedding4bit(emb.num_embeddings, emb.embedding_dim)
    model.model.embed_tokens = q
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"model\.embed_tokens.*Embedding4bit"):
        peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert model.model.embed_tokens is q and not _lora_layers(model, peftcore.layers.LoraLayer)


# ---------------------------------------------------------------------- merge: fp bases
# (llama for the embedding: its lm_head is untied; merging into OPT's tied embedding also
# changes its lm_head)
@pytest.mark.parametrize("arch,targets", [("opt", ["q_proj", "fc1"]), ("llama", ["q_proj", "embed_tokens", "down_proj"]),
                                          ("gpt2", ["c_attn", "c_fc"])])
def test_merge_fp_matches_peft(tmp_path, arch, targets):
    base, _ = fresh_base(arch)
    ad = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    pm = peft_model(fresh_base(arch)[0], {"default": ad})
    model, _ = fresh_base(arch)
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    peftcore.load_adapter(model, ad)
    unmerged = logits(model)
    pm.merge_adapter()
    peftcore.merge_adapter(model)
    assert all(float(m.lora_scales.abs().sum()) == 0 for _, m in _lora_layers(model, peftcore.layers.LoraLayer))
    assert rel_err(logits(model), logits(pm)) <= EXACT_RTOL
    assert rel_err(logits(model), unmerged) <= EXACT_RTOL
    ours = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    theirs = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in pm.state_dict().items() if "lora_" not in k}
    for k in orig:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6), k
    peftcore.unmerge_adapter(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.allclose(v, orig[k.replace(".base_layer", "")], rtol=0, atol=1e-6), k
    assert rel_err(logits(model), unmerged) <= EXACT_RTOL
    out = peftcore.merge_and_unload(model)
    assert out is model and not _lora_layers(model, peftcore.layers.LoraLayer)
    assert peftcore.active_adapters(model) == []
    assert rel_err(logits(model), unmerged) <= EXACT_RTOL


def test_merge_state_rules_and_safe_merge(tmp_path):
    base, _ = fresh_base("opt")
    ad = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model, _ = fresh_base("opt")
    peftcore.load_adapter(model, ad, "a")
    peftcore.load_adapter(model, ad, "b")
    peftcore.set_adapter(model, "a")
    with_a = logits(model)
    peftcore.merge_adapter(model)
    with pytest.raises(peftcore.PeftcoreError, match="merged"):
        peftcore.delete_adapter(model, "a")
    with pytest.raises(peftcore.PeftcoreError, match="unmerge_adapter"):
        peftcore.load_adapter(model, ad, "c")
    with pytest.warns(UserWarning, match="unmerging"):
        peftcore.set_adapter(model, "b")  # PEFT: switching unmerges first
    assert all(not m.merged_adapters for _, m in _lora_layers(model, peftcore.layers.LoraLayer))
    peftcore.set_adapter(model, "a")
    assert rel_err(logits(model), with_a) <= EXACT_RTOL
    # safe_merge refuses to write non-finite weights, naming the module; nothing changes.
    # (the broken adapter "b" is inactive, so the snapshot's logits stay finite)
    with torch.no_grad():
        model.model.decoder.layers[1].self_attn.v_proj.lora_B["b"][0, 0] = float("inf")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.PeftcoreError, match=r"layers\.1\.self_attn\.v_proj"):
        peftcore.merge_adapter(model, ["a", "b"], safe_merge=True)
    assert_unchanged(model, snap)
    # unload: the original modules back, no adapters
    peftcore.unload(model)
    assert type(model.model.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert rel_err(logits(model), logits(fresh_base("opt")[0])) <= EXACT_RTOL  # (merge + unmerge rounded W once each)


# ---------------------------------------------------------------------- merge: quantized bases
def _max_gap(code):
    """Largest gap between neighbouring values of a 4-bit code table (in [-1, 1]):
    0.304 for nf4, 0.333 for fp4."""
    c = torch.sort(code.float()).values
    return float((c[1:] - c[:-1]).max())


def _step_bound(layer, want):
    """Bound on |stored - want| after one quantization of the dense ``want`` into the
    bitsandbytes ``layer`` (its state as it is now).

    4-bit: codes are picked against the block's true absmax a (error <= a·g/2), then the
    block scale is stored as a_s (exact, or 8-bit with double quantization), which moves
    each element by |code|·|a - a_s| <= |a - a_s|. int8: round-to-nearest on the row
    scale SCB/127 (error <= SCB/254) of the float16-rounded row (<= |w|·2**-11)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        qs = layer.weight.quant_state
        bs, g = qs.blocksize, _max_gap(qs.code)
        a = want.reshape(-1, bs).abs().amax(1, keepdim=True)
        if qs.nested:
            a_s = (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float().reshape(-1, 1)
        else:
            a_s = qs.absmax.float().reshape(-1, 1)
        return (a * g / 2 + (a - a_s).abs() + 1e-7).expand(-1, bs).reshape(want.shape)
    row = want.to(torch.float16).float().abs().amax(1, keepdim=True)
    return (row / 254 + want.abs() * 2**-11 + 1e-7).expand(want.shape)


@pytest.mark.parametrize("bits,kw", [(4, Q4["nf4-dq-b64-fp32"]), (4, Q4["fp4-b64-bf16"]), (8, {})],
                         ids=["nf4-dq", "fp4", "int8"])
def test_merge_quantized(root, tmp_path, bits, kw, monkeypatch):
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")  # float32 tolerances: see test_switch_disable_delete
    from safetensors.torch import save_file

    model = _qmodel(root, "opt", bits, **kw)
    pristine = copy.deepcopy(model)
    # Every quantized layer targeted (none is left to bitsandbytes' forward, which would
    # repack it), with a smaller adapter (|delta| ~ 1/10 of |W|, as trained adapters are).
    ad = peft_adapter_dir(tmp_path, model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    path = os.path.join(ad, "adapter_model.safetensors")
    save_file({k: v * 0.3 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})

    # PEFT's merge on the same quantized base: bitsandbytes' dequant -> add -> requant.
    pm = peft_model(pristine, {"default": ad})
    pm.merge_adapter()

    peftcore.load_adapter(model, ad)
    unmerged_logits = logits(model)
    layers = dict(_lora_layers(model))
    dense0 = {n: bnb_dense_weight(m.base_layer) for n, m in layers.items()}
    deltas = {n: peftcore.merge.delta_weight(m, "default") for n, m in layers.items()}
    others = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n and not n.endswith(".weight")}
    peftcore.merge_adapter(model)
    assert all(float(m.lora_scales.abs().sum()) == 0 and m.merged_adapters == ["default"] for m in layers.values())
    e1 = {}
    for n, m in layers.items():
        merged = bnb_dense_weight(m.base_layer)
        # identical to PEFT's merge (same dequantizer, same delta, same quantizer)
        assert torch.equal(merged, bnb_dense_weight(pm.base_model.model.get_submodule(n).base_layer)), n
        want = dense0[n] + deltas[n]
        e1[n] = _step_bound(m.base_layer, want)
        assert ((merged - want).abs() <= e1[n]).all(), n
    # The merged model (kernel scale 0) runs exactly its new quantized weights...
    merged_logits = logits(model)
    tmp = copy.deepcopy(model)
    peftcore.merge_and_unload(tmp)
    exact_tol = 2**-8 if kw.get("compute_dtype") == torch.bfloat16 else EXACT_RTOL  # (see the parity test)
    assert rel_err(merged_logits, logits(dequantized_copy(tmp))) <= exact_tol
    # ...which differ from the unmerged model by the re-quantization only.
    print(f"merged vs unmerged logits, rel: {rel_err(merged_logits, unmerged_logits):.3g}")

    # PEFT-style unmerge: dequantize, subtract, re-quantize: W_after - W_before = e1 + e2,
    # one quantization error per direction.
    peftcore.unmerge_adapter(model)
    worst = 0.0
    for n, m in layers.items():
        after = bnb_dense_weight(m.base_layer)
        bound = e1[n] + _step_bound(m.base_layer, dense0[n] + (bnb_dense_weight(tmp.get_submodule(n)) - dense0[n] - deltas[n]))
        err = (after - dense0[n]).abs()
        assert (err <= bound).all(), (n, float((err / bound).max()))
        worst = max(worst, float(err.max() / dense0[n].abs().max()))
        if bits == 4 and not m.base_layer.weight.quant_state.nested:
            # the closed form in peftcore.merge's docstring (no double quantization)
            qs = m.base_layer.weight.quant_state
            g, bs = _max_gap(qs.code), qs.blocksize
            a = dense0[n].reshape(-1, bs).abs().amax(1, keepdim=True)
            d = deltas[n].reshape(-1, bs).abs().amax(1, keepdim=True)
            assert (err.reshape(-1, bs) <= g * (a + d) * (1 + g / 4) + 1e-6).all(), n
        if bits == 8:  # the int8 closed form (row scale steps + float16 rounding, both ways)
            a = dense0[n].abs().amax(1, keepdim=True)
            d = deltas[n].abs().amax(1, keepdim=True)
            assert (err <= (a + d) * (1 / 127 + 2**-10) * 1.001 + 1e-6).all(), n
    print(f"merge+unmerge: max |W_after - W_before| / max |W| = {worst:.3g}")
    assert worst > 0  # lossy, as documented
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n  # biases, norms untouched

    out = peftcore.merge_and_unload(model)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert {type(out.get_submodule(n)) for n in layers} == {kind}
    assert torch.isfinite(logits(out)).all()  # bitsandbytes runs the re-quantized layers


# ---------------------------------------------------------------------- QLoRA training
def _lm_batch():
    ids = INPUT_IDS
    return {"input_ids": ids, "labels": ids}


def test_qlora_optimizer_steps(root):
    model = _qmodel(root, "llama", 4, **Q4["nf4-dq-b64-fp32"])
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    q4 = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
          for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    torch.manual_seed(0)
    for step in range(6):
        out = model(**_lm_batch())
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.data, q4[n][0]) and torch.equal(m.weight.quant_state.absmax, q4[n][1]), n


def test_qlora_trainer(root, tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftcore.trainer import quantized_model_ok

    model = _qmodel(root, "llama", 4, **Q4["nf4-b128-bf16"])
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q4 = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rows = [{"input_ids": INPUT_IDS[i % 2], "labels": INPUT_IDS[i % 2]} for i in range(8)]

    class _Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=_Rows())  # transformers' own check
    with quantized_model_ok(model):
        trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    assert "_hf_peft_config_loaded" not in model.__dict__
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) >= 3 and logged[-1] < logged[0], logged
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.data, q4[n]), n
    # the trained adapter loads in PEFT on the same quantized base
    peftcore.save_pretrained(model, tmp_path / "trained")
    model.eval()
    fresh = _qmodel(root, "llama", 4, **Q4["nf4-b128-bf16"])
    oracle = dequantized_copy(fresh)
    # bf16 compute dtype: one bf16 flip of x (see the parity test)
    assert rel_err(logits(model), logits(peft_model(oracle, {"default": str(tmp_path / "trained")}))) <= 2**-8


# ---------------------------------------------------------------------- the README's claims
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_forward_builds_no_dense_weight(bits):
    """README: on the CPU the quantized forward builds no full-precision copy of W (at
    any token count, fp32 or bf16 x): it reads the packed bytes, or (4-bit, from 12 bf16 /
    128 fp32 token rows) decodes W in tiles of ~2 MB into a GEMM. A dense copy would be
    one allocation of >= 2·N·K bytes (bf16, 8 MB here); the probe sees one in dequantize
    itself."""
    from tests.op_db import quantize_4bit, quantize_int8

    N = K = 2048
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) / K**0.5
    A, B, s = [torch.randn(16, K) * 0.01], [torch.randn(N, 16) * 0.01], torch.ones(1)
    if bits == 4:
        q = quantize_4bit(w, 64, "nf4", True)
        wargs = (q["qweight"], q["absmax"], q["code"], q["blocksize"], q["nested_absmax"], q["nested_code"],
                 q["nested_offset"], q["nested_blocksize"], N)

        def fwd(x):
            return torch.ops.peftcore.lora_linear_4bit(x, *wargs, None, A, B, None, s, None)

        def dense():
            return torch.ops.peftcore.dequantize_4bit(*wargs, K, torch.bfloat16)
    else:
        CB, SCB = quantize_int8(w)

        def fwd(x):
            return torch.ops.peftcore.lora_linear_int8(x, CB, SCB, None, A, B, None, s, None)

        def dense():
            return torch.ops.peftcore.dequantize_int8(CB, SCB, torch.bfloat16)

    assert largest_allocation(dense) >= 2 * N * K  # the probe sees a dense copy
    for dtype in (torch.float32, torch.bfloat16):
        for T in (1, 2, 16, 128):
            x = torch.randn(T, K, dtype=dtype)
            with torch.no_grad():
                biggest = largest_allocation(lambda: fwd(x))
            assert biggest < N * K, f"{bits}-bit forward, {dtype}, {T} tokens: an allocation of {biggest} bytes"


@pytest.mark.parametrize("bits", [4, 8])
def test_adapted_layers_never_run_bitsandbytes_forward(root, tmp_path, monkeypatch, bits):
    """README: adapted quantized layers run peftcore's ops on the stored weight, never
    bitsandbytes' forward (every linear adapted here, so none may call it)."""
    model = _qmodel(root, "llama", bits)
    ad = peft_adapter_dir(tmp_path, model, peft.LoraConfig(r=4, target_modules="all-linear"))
    peftcore.load_adapter(model, ad)

    def refuse(self, *a, **k):
        raise AssertionError(f"bitsandbytes' {type(self).__name__}.forward ran")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", refuse)
    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", refuse)
    with torch.no_grad():
        assert torch.isfinite(model(INPUT_IDS).logits).all()
    peftcore.disable_adapters(model)  # the base alone goes through the same ops
    with torch.no_grad():
        model(INPUT_IDS)
