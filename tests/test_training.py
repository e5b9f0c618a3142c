"""Training a peftcore adapter: what is trainable (compared with PEFT's get_peft_model on the
same model and config), that a plain AdamW loop and transformers' Trainer lower the loss
without touching the base, and that the trained adapter reloads in PEFT with the same logits."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftcore
from tests._models import INPUT_IDS, VOCAB, canon_name, logits, peft_model, tiny_llama, tiny_opt

TARGETS = ["q_proj", "v_proj"]


def llama():
    """tiny_llama with larger initial weights: with the default std 0.02 the random model's
    logits are near-uniform and a rank-4 q/v adapter can barely move the loss (in PEFT too)."""
    return tiny_llama(initializer_range=0.2)


def _batch(n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _trainable(model):
    return {canon_name(n): p.numel() for n, p in model.named_parameters() if p.requires_grad}


def _peft_counterpart(base, cfg_kwargs):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_kwargs))
    return pm


def _frozen_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _train(model, steps=30, lr=1e-2, batch=None):
    batch = batch or _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------- what trains
def test_only_adapter_params_trainable_counts_match_peft(capsys):
    model = llama()
    cfg = dict(r=4, target_modules=TARGETS, lora_dropout=0.1)
    peftcore.add_adapter(model, peftcore.LoraConfig(**cfg))
    pm = _peft_counterpart(llama(), cfg)

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names), names
    assert _trainable(model) == _trainable(pm)
    assert peftcore.get_nb_trainable_parameters(model) == pm.get_nb_trainable_parameters()
    assert peftcore.get_nb_trainable_parameters(model)[0] == 896  # 2 layers x (q, v) x (4x32 + out x 4)

    capsys.readouterr()
    pm.print_trainable_parameters()
    want = capsys.readouterr().out
    peftcore.print_trainable_parameters(model)
    assert capsys.readouterr().out == want


def test_adamw_loop_lowers_loss_base_untouched():
    model = llama()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    before_out = logits(model)
    assert torch.equal(before_out, logits(llama())), "a fresh adapter (B = 0) must not change the output"
    frozen = _frozen_params(model)
    losses = _train(model)
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed during training"
    assert len(frozen) == len(list(llama().parameters()))
    assert not torch.allclose(logits(model), before_out, atol=1e-4)
    with peftcore.adapters_disabled(model):
        assert torch.equal(logits(model), logits(llama()))


def test_dropout_only_in_training_mode():
    model = llama()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.5,
                                                    init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        e1, e2 = model(INPUT_IDS).logits, model(INPUT_IDS).logits
        model.train()
        t1, t2 = model(INPUT_IDS).logits, model(INPUT_IDS).logits
        model.eval()
    assert torch.equal(e1, e2)
    assert not torch.equal(t1, t2)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_trainable_matches_peft(bias):
    model = tiny_opt()
    cfg = dict(r=4, target_modules=TARGETS, bias=bias)
    peftcore.add_adapter(model, peftcore.LoraConfig(**cfg))
    pm = _peft_counterpart(tiny_opt(), cfg)
    got, want = _trainable(model), _trainable(pm)
    got_bias = {n for n in got if n.endswith(".bias")}
    assert got_bias == {n for n in want if n.endswith(".bias")}
    assert got == want
    assert peftcore.get_nb_trainable_parameters(model) == pm.get_nb_trainable_parameters()
    if bias == "lora_only":
        assert got_bias == {f"model.decoder.layers.{i}.self_attn.{m}.bias" for i in (0, 1) for m in ("q_proj", "v_proj")}
    else:
        assert "model.decoder.layers.0.fc1.bias" in got_bias and "model.decoder.final_layer_norm.bias" in got_bias
    # the biases really train
    q_bias = model.model.decoder.layers[0].self_attn.q_proj.base_layer.bias.detach().clone()
    _train(model, steps=3)
    assert not torch.equal(model.model.decoder.layers[0].self_attn.q_proj.base_layer.bias, q_bias)


def test_modules_to_save_trains_a_copy():
    model = llama()
    cfg = dict(r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    peftcore.add_adapter(model, peftcore.LoraConfig(**cfg))
    pm = _peft_counterpart(llama(), cfg)
    assert _trainable(model) == _trainable(pm)
    assert "lm_head.copy.weight" in _trainable(model)
    assert peftcore.get_nb_trainable_parameters(model) == pm.get_nb_trainable_parameters()

    original = llama().lm_head.weight.detach().clone()
    losses = _train(model, steps=10)
    assert losses[-1] < losses[0]
    wrapper = model.lm_head
    assert torch.equal(wrapper.original_module.weight, original)
    assert not wrapper.original_module.weight.requires_grad
    assert not torch.equal(wrapper.modules_to_save["default"].weight, original)
    # saved under PEFT's key (no wrapper infix) and equal to the trained copy
    sd = peftcore.get_adapter_state_dict(model)
    assert torch.equal(sd["base_model.model.lm_head.weight"], wrapper.modules_to_save["default"].weight)
    with peftcore.adapters_disabled(model):
        assert torch.equal(logits(model), logits(llama()))


# ---------------------------------------------------------------------- transformers Trainer
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_then_peft_reload(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = llama()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    frozen = _frozen_params(model)
    data = _batch(n=8, length=16, seed=3)
    rows = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=5,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) >= 3, trainer.state.log_history
    # (the default linear schedule decays the lr to 0 over the 20 steps)
    assert all(b < a for a, b in zip(logged, logged[1:])) and logged[-1] < 0.9 * logged[0], logged
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"Trainer changed frozen {n}"

    model.eval()
    trained = logits(model)
    assert not torch.allclose(trained, logits(llama()), atol=1e-4)
    out = tmp_path / "adapter"
    peftcore.save_pretrained(model, out)
    ref = peft_model(llama(), {"default": str(out)})
    torch.testing.assert_close(logits(ref), trained, rtol=0, atol=1e-5)
    # and peftcore reloads its own save identically
    again = llama()
    peftcore.load_adapter(again, out)
    assert torch.equal(logits(again), trained)


def test_trainer_checkpoints_hold_peft_adapters(tmp_path):
    """With peftcore.trainer.AdapterCheckpointCallback every Trainer checkpoint (and the
    output folder at the end) holds the adapter in PEFT's format, loadable by PEFT."""
    from transformers import Trainer, TrainingArguments

    from peftcore.trainer import AdapterCheckpointCallback

    model = llama()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    data = _batch(n=8, length=16, seed=3)
    rows = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(8)]
    run = tmp_path / "run"
    args = TrainingArguments(output_dir=str(run), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(rows), callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    for folder in (run / "checkpoint-2", run / "checkpoint-4", run):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file(), folder
    model.eval()
    ref = peft_model(llama(), {"default": str(run)})
    torch.testing.assert_close(logits(ref), logits(model), rtol=0, atol=1e-5)
    ckpt2 = peft_model(llama(), {"default": str(run / "checkpoint-2")})
    assert not torch.allclose(logits(ckpt2), logits(model), atol=1e-6)  # an earlier state, really saved then
