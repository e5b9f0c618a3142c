"""Training features users turn on, with peftcore adapters: transformers' gradient
checkpointing (re-entrant and not; also through the ``Trainer``) gives the gradients of a
run without it, and
torch.compile compiles a whole training step through the adapter layers (no graph break
inside them) to eager mode's gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftcore
from tests._models import INPUT_IDS, tiny_llama
from tests.helpers import check_compiled_matches_eager


def _lora_llama():
    model = tiny_llama()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    return model


def _grads(model):
    model.zero_grad(set_to_none=True)
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = _lora_llama().train()
    want = _grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    got = _grads(model)
    assert got.keys() == want.keys()
    for n in want:
        # The recomputed forward is the same computation on the same inputs: the gradients
        # are the same numbers (only the order of two accumulations may differ).
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=n)


def test_compiled_training_step_matches_eager():
    # A stack of adapted linears, compiled whole (fullgraph: a graph break inside a
    # peftcore layer fails), forward and backward, against eager mode.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    peftcore.add_adapter(model, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                    init_lora_weights=False))
    x = torch.randn(6, 24, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    check_compiled_matches_eager(model, x, [x, *params])  # its tolerances, with their reasons


def test_compiled_llama_has_no_graph_break_in_adapter_layers():
    model = _lora_llama().train()
    explained = torch._dynamo.explain(model)(input_ids=INPUT_IDS, labels=INPUT_IDS)
    ours = [str(b) for b in explained.break_reasons if "peftcore" in str(b)]
    assert not ours, ours


def test_trainer_with_gradient_checkpointing_trains_as_without(tmp_path):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (8, 16), generator=g)
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]

    def train(checkpointing):
        torch.manual_seed(0)  # the adapter's random init
        model = _lora_llama()
        args = TrainingArguments(output_dir=str(tmp_path / f"run{checkpointing}"), max_steps=6,
                                 per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                                 gradient_checkpointing=checkpointing)
        Trainer(model=model, args=args, train_dataset=rows).train()
        assert model.is_gradient_checkpointing == checkpointing
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    want, got = train(False), train(True)
    assert want.keys() == got.keys()
    for n in want:
        # Six AdamW steps on the same gradients (see the test above), up to summation order.
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
