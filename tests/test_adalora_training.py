"""AdaLoRA training: ``peftcore.adalora.update_and_allocate`` / ``adalora_orthogonal_loss``
and ``peftcore.trainer.AdaLoraCallback`` against PEFT's ``AdaLoraModel`` (the oracle).

The same tiny Llama, the same initial adapter weights (PEFT's random init copied into
peftcore's parameters by name), the same data and optimizer: the losses, the rank pattern
after every step (budgeting phase, the final mask at ``total_step - tfinal`` and the
re-masking after it) and the final weights must agree.

Note on the oracle: PEFT adds the orthogonal term inside ``AdaLoraModel.forward``, which a
``PeftModel`` only calls when it was built with a ``task_type`` (a plain ``PeftModel``
calls the transformers model directly and silently drops the term), so the PEFT models
here use ``task_type="CAUSAL_LM"``.
"""
from __future__ import annotations

import copy
import itertools
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftcore
from peftcore import adalora_orthogonal_loss, update_and_allocate
from peftcore.errors import PeftcoreError
from peftcore.state import get_state
from tests._models import VOCAB, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=30)
KW = dict(SCHEDULE, lora_alpha=16, lora_dropout=0.0, orth_reg_weight=0.5, target_modules=TARGETS)
STEPS = 30

# Tolerances. peftcore's fused lora_linear kernel (with lora_E) computes the same products as PEFT's
# ``x @ (A*E).T @ B.T * scaling / ranknum`` but may accumulate in a different order, so
# gradients (and with them losses and weights) can differ in the last bits; everything
# else (the importance EMAs, the scores, the threshold, the masking) is the same sequence
# of torch ops in the same parameter order. Observed: losses equal to <= 1 ulp (rel ~1e-7)
# over 30 steps. rtol 1e-5 on losses leaves two orders of magnitude for other CPUs / SIMD
# paths while still catching any real schedule difference (a missing orthogonal term is
# ~0.2 relative, a differently masked triplet changes the loss at ~1e-3 within steps).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _data(seed=1, steps=STEPS, n=4, length=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n, length), generator=g) for _ in range(steps)]


def _strip(pattern, name="default"):
    """PEFT's in-training rank_pattern keys carry the adapter name; the saved / peftcore form not."""
    return None if pattern is None else {k.replace(f".lora_E.{name}", ".lora_E"): v for k, v in pattern.items()}


def _pair(**overrides):
    """(PEFT model, peftcore model) on the same tiny Llama with identical initial adapters."""
    kw = dict(KW, **overrides)
    base = tiny_llama()
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))
    cm = copy.deepcopy(base)
    peftcore.add_adapter(cm, peftcore.AdaLoraConfig(**kw), "default")
    theirs = dict(pm.named_parameters())
    ours = [n for n, p in cm.named_parameters() if p.requires_grad]
    assert ours == [n[len("base_model.model."):] for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n in ours:
            cm.get_parameter(n).copy_(theirs["base_model.model." + n])
    return pm, cm


def _optimizer(kind, params):
    params = [p for p in params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _train_pair(kind):
    pm, cm = _pair()
    pm.train()
    cm.train()
    opt_p, opt_c = _optimizer(kind, pm.parameters()), _optimizer(kind, cm.parameters())
    cfg_p, cfg_c = pm.peft_config["default"], get_state(cm).configs["default"]
    history = []
    for step, x in enumerate(_data()):
        loss_p = pm(input_ids=x, labels=x).loss  # PEFT adds the orthogonal term in its forward
        loss_c = cm(input_ids=x, labels=x).loss + adalora_orthogonal_loss(cm)
        loss_p.backward()
        loss_c.backward()
        opt_p.step()
        opt_c.step()
        pm.base_model.update_and_allocate(step)
        update_and_allocate(cm, step)
        opt_p.zero_grad()
        opt_c.zero_grad()
        history.append((step, loss_p.item(), loss_c.item(), copy.deepcopy(_strip(cfg_p.rank_pattern)),
                        copy.deepcopy(cfg_c.rank_pattern), _emas(pm, cm)))
    return pm, cm, history


def _emas(pm, cm):
    """The largest relative difference between PEFT's importance EMAs (Ī, Ū) and peftcore's,
    and how many tensors were compared (0 after the final allocation resets them)."""
    ra = pm.base_model.rankallocator
    ours = cm.__dict__["_peftcore_adalora"]["default"]
    assert set(ra.exp_avg_ipt) == set(ours.exp_avg_ipt)
    worst = 0.0
    for theirs_d, ours_d in ((ra.exp_avg_ipt, ours.exp_avg_ipt), (ra.exp_avg_unc, ours.exp_avg_unc)):
        for n, t in theirs_d.items():
            worst = max(worst, ((ours_d[n] - t).abs().max() / t.abs().max().clamp_min(1e-30)).item())
    return worst, len(ra.exp_avg_ipt)


@pytest.fixture(scope="module")
def adamw_run():
    return _train_pair("adamw")


# ---------------------------------------------------------------------- trajectory vs PEFT
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_trajectory_matches_peft(kind, adamw_run):
    pm, cm, history = adamw_run if kind == "adamw" else _train_pair(kind)
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    kept = []
    for step, loss_p, loss_c, pat_p, pat_c, (ema_diff, n_ema) in history:
        assert loss_c == pytest.approx(loss_p, rel=LOSS_RTOL), (step, loss_p, loss_c)
        # the importance statistics themselves (relative to each tensor's largest entry)
        assert n_ema == (3 * 2 * len(TARGETS) if step < final else 0), step
        assert ema_diff < 1e-4, (step, ema_diff)  # observed <= 2e-6 (ulp-level gradient differences)
        assert pat_c == pat_p, f"rank pattern differs after step {step}"
        kept.append(None if pat_c is None else sum(map(sum, pat_c.values())))
    n_mats = 2 * len(TARGETS)
    # No mask during warm-up (steps <= tinit), then masks at the deltaT steps with a budget
    # shrinking to target_r per matrix at total_step - tfinal, and kept afterwards.
    assert kept[: SCHEDULE["tinit"] + 2] == [None] * (SCHEDULE["tinit"] + 2)
    assert kept[final] == SCHEDULE["target_r"] * n_mats and kept[-1] == kept[final]
    masked = [k for k in kept if k is not None]
    assert masked[0] < SCHEDULE["init_r"] * n_mats and len(set(masked)) >= 4, kept
    assert all(a >= b for a, b in itertools.pairwise(masked)), kept
    # The final weights: pruned singular values are exactly 0 in both, the rest agree.
    theirs = dict(pm.named_parameters())
    pattern = history[-1][4]
    for n, p in cm.named_parameters():
        if not p.requires_grad:
            continue
        q = theirs["base_model.model." + n]
        torch.testing.assert_close(p, q, rtol=0, atol=WEIGHT_ATOL, msg=n)
        if ".lora_E." in n:
            keep = torch.tensor(pattern[n.rsplit(".", 1)[0]])
            assert torch.equal(p.detach()[~keep] == 0, q.detach()[~keep] == 0) and bool((p[~keep] == 0).all()), n
            assert torch.equal(p.detach() != 0, q.detach() != 0), n


def test_trained_adapter_saves_like_peft(adamw_run, tmp_path):
    """The rank pattern in peftcore's form is what PEFT writes: the saved config and the
    pruned tensors (some modules may be pruned to rank 0) agree with PEFT's files."""
    pm, cm, _ = adamw_run
    pm.save_pretrained(tmp_path / "peft")
    peftcore.save_pretrained(cm, tmp_path / "ours")
    cfg_p = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg_c = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg_c["rank_pattern"] == cfg_p["rank_pattern"]
    sd_p = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    sd_c = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sd_c.keys() == sd_p.keys()
    for k in sd_p:
        assert sd_c[k].shape == sd_p[k].shape, k
        torch.testing.assert_close(sd_c[k], sd_p[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_orthogonal_loss_matches_peft():
    pm, cm = _pair()
    pm.train()
    cm.train()
    x = _data(steps=1)[0]
    plain = pm.get_base_model()(input_ids=x, labels=x).loss  # the inner model: no orthogonal term
    term = adalora_orthogonal_loss(cm)
    assert term.dim() == 0 and term.requires_grad
    torch.testing.assert_close(pm(input_ids=x, labels=x).loss, plain + term, rtol=1e-6, atol=0)
    # at init (A, B ~ N(0, 0.02)) every ‖PPᵀ − I‖_F is ≈ √init_r
    assert term.item() == pytest.approx(0.5 * SCHEDULE["init_r"] ** 0.5, rel=0.05)
    # orth_reg_weight scales it
    get_state(cm).configs["default"].orth_reg_weight = 0.0
    assert adalora_orthogonal_loss(cm).item() == 0.0


# ---------------------------------------------------------------------- other behaviour
def test_state_is_kept_on_the_model_not_in_the_state_dict():
    _, cm = _pair()
    keys = set(cm.state_dict())
    x = _data(steps=1)[0]
    cm.train()
    cm(input_ids=x, labels=x).loss.backward()
    update_and_allocate(cm, 0)
    assert set(cm.state_dict()) == keys
    assert "default" in cm.__dict__["_peftcore_adalora"]
    assert get_state(cm).configs["default"].rank_pattern is None  # warm-up: no mask yet


def test_other_adapters_are_left_alone():
    """A second, frozen AdaLoRA adapter on the same layers (its name starting with the
    trainable one's) is neither scored, masked nor given a rank pattern."""
    base = tiny_llama()
    torch.manual_seed(0)
    kw = dict(KW, total_step=6, tinit=0, tfinal=1, deltaT=1)
    # (peftcore, like PEFT, lets only one AdaLoRA adapter train: freeze 'ada2' before adding 'ada')
    peftcore.add_adapter(base, peftcore.AdaLoraConfig(**dict(kw, init_r=4)), "ada2")
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith(".ada2"):
                p.normal_()
                p.requires_grad_(False)
    peftcore.add_adapter(base, peftcore.AdaLoraConfig(**kw), "ada")
    other = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith(".ada2")}
    assert other and not any(base.get_parameter(n).requires_grad for n in other)
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-2)
    base.train()
    for step, x in enumerate(_data(steps=8)):
        (base(input_ids=x, labels=x).loss + adalora_orthogonal_loss(base)).backward()
        opt.step()
        update_and_allocate(base, step)
        opt.zero_grad()
    configs = get_state(base).configs
    pattern = configs["ada"].rank_pattern
    assert set(pattern) == {f"model.layers.{i}.self_attn.{t}.lora_E" for i in range(2) for t in TARGETS}
    assert all(len(v) == SCHEDULE["init_r"] for v in pattern.values())
    assert sum(map(sum, pattern.values())) == SCHEDULE["target_r"] * 8
    assert configs["ada2"].rank_pattern is None
    for n, v in other.items():
        assert torch.equal(base.get_parameter(n), v), n


def test_target_rank_not_below_init_rank_prunes_nothing():
    """Divergence from PEFT, deliberately: with target_r >= init_r the budget never drops
    below the number of triplets, and PEFT's kthvalue(k=0) raises; peftcore keeps all."""
    _, cm = _pair(target_r=SCHEDULE["init_r"])
    cm.train()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    for step, x in enumerate(_data(steps=8)):
        cm(input_ids=x, labels=x).loss.backward()
        opt.step()
        update_and_allocate(cm, step)
        opt.zero_grad()
    pattern = get_state(cm).configs["default"].rank_pattern
    assert pattern and all(all(v) for v in pattern.values())


# ---------------------------------------------------------------------- errors
def test_error_without_adalora_adapter():
    model = tiny_llama()
    with pytest.raises(PeftcoreError, match="no AdaLoRA adapter.*no peftcore adapters"):
        update_and_allocate(model, 0)
    peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["q_proj"]), "mylora")
    with pytest.raises(PeftcoreError, match=r"no AdaLoRA adapter.*'mylora'"):
        update_and_allocate(model, 0)
    with pytest.raises(PeftcoreError, match="no AdaLoRA adapter"):
        adalora_orthogonal_loss(model)


def test_error_before_backward_or_after_zero_grad():
    _, cm = _pair()
    with pytest.raises(PeftcoreError, match=r"no gradient.*after loss\.backward\(\) and optimizer\.step\(\), before zero_grad\(\)"):
        update_and_allocate(cm, 0)
    x = _data(steps=1)[0]
    cm.train()
    cm(input_ids=x, labels=x).loss.backward()
    update_and_allocate(cm, 0)
    cm.zero_grad(set_to_none=True)
    with pytest.raises(PeftcoreError, match="no gradient"):
        update_and_allocate(cm, 1)


def test_error_unless_exactly_one_trainable_adalora_adapter():
    _, cm = _pair()
    for n, p in cm.named_parameters():  # (peftcore's add_adapter refuses a second trainable AdaLoRA)
        if n.endswith(".default"):
            p.requires_grad_(False)
    peftcore.add_adapter(cm, peftcore.AdaLoraConfig(**KW), "second")
    peftcore.set_adapter(cm, ["default", "second"])
    x = _data(steps=1)[0]
    cm.train()
    cm(input_ids=x, labels=x).loss.backward()
    update_and_allocate(cm, 0)  # 'second' is the trainable one
    assert get_state(cm).configs["default"].rank_pattern is None
    for n, p in cm.named_parameters():
        if n.endswith(".default") and "ranknum" not in n:
            p.requires_grad_(True)
    with pytest.raises(PeftcoreError, match=r"several AdaLoRA adapters are trainable: \['default', 'second'\]"):
        update_and_allocate(cm, 1)
    for p in cm.parameters():
        p.requires_grad_(False)
    with pytest.raises(PeftcoreError, match=r"none of the AdaLoRA adapters \['default', 'second'\] is trainable"):
        adalora_orthogonal_loss(cm)


def test_error_bad_step_and_missing_final_mask():
    _, cm = _pair()
    with pytest.raises(PeftcoreError, match="global_step must be"):
        update_and_allocate(cm, -1)
    with pytest.raises(PeftcoreError, match="global_step must be an integer"):
        update_and_allocate(cm, 1.5)
    # past total_step - tfinal without the final allocation having happened
    with pytest.raises(PeftcoreError, match="no rank_pattern to re-apply"):
        update_and_allocate(cm, SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1)
    get_state(cm).configs["default"].beta1 = 1.0
    with pytest.raises(PeftcoreError, match=r"beta1=1\.0; it must be in \(0, 1\)"):
        update_and_allocate(cm, 0)


# ---------------------------------------------------------------------- transformers Trainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=10, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _trainer_run(model, tmp_path, callbacks, steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=callbacks)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_callback_matches_peft(tmp_path):
    """Trainer + AdaLoraCallback on peftcore == Trainer + a callback calling PEFT's
    update_and_allocate(state.global_step) on PEFT's model: same logged losses (so the
    orthogonal term is added, as PEFT's forward does) and the same rank pattern after every
    optimizer step; update_and_allocate sees steps 0, 1, ..., max_steps - 1."""
    from transformers import TrainerCallback

    from peftcore.trainer import AdaLoraCallback

    steps = 12
    sched = dict(total_step=steps, tinit=2, tfinal=3, deltaT=2)

    class PeftAllocate(TrainerCallback):
        def __init__(self):
            self.steps, self.patterns = [], []

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps.append(state.global_step)
            model.base_model.update_and_allocate(state.global_step)
            self.patterns.append(copy.deepcopy(_strip(model.peft_config["default"].rank_pattern)))

    class Record(TrainerCallback):  # runs after AdaLoraCallback (callbacks are called in order)
        def __init__(self):
            self.patterns = []

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.patterns.append(copy.deepcopy(get_state(model).configs["default"].rank_pattern))

    pm, cm = _pair(**sched)
    ref = PeftAllocate()
    losses_p = _trainer_run(pm, tmp_path / "peft", [ref], steps)
    rec = Record()
    losses_c = _trainer_run(cm, tmp_path / "ours", [AdaLoraCallback(), rec], steps)

    assert ref.steps == list(range(steps))
    assert losses_c == pytest.approx(losses_p, rel=LOSS_RTOL)
    assert rec.patterns == ref.patterns
    assert rec.patterns[-1] is not None and sum(map(sum, rec.patterns[-1].values())) == 3 * 2 * len(TARGETS)
    assert len({json.dumps(p, sort_keys=True) for p in rec.patterns if p}) >= 3  # the pattern changed
    assert not cm._forward_hooks  # the hook is removed at the end of training


def test_callback_hook_adds_orthogonal_term_only_in_training():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from peftcore.trainer import AdaLoraCallback

    _, cm = _pair()
    x = _data(steps=1)[0]
    with torch.no_grad():
        cm.eval()
        plain = cm(input_ids=x, labels=x).loss
        term = adalora_orthogonal_loss(cm)
    cb = AdaLoraCallback()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    state = TrainerState(max_steps=SCHEDULE["total_step"])
    cb.on_train_begin(args, state, TrainerControl(), model=cm)
    cb.on_train_begin(args, state, TrainerControl(), model=cm)  # registering twice keeps one hook
    assert len(cm._forward_hooks) == 1
    with torch.no_grad():
        cm.train()
        torch.testing.assert_close(cm(input_ids=x, labels=x).loss, plain + term, rtol=1e-6, atol=0)
        assert cm(input_ids=x).loss is None
        cm.eval()
        assert torch.equal(cm(input_ids=x, labels=x).loss, plain)
    cb.on_train_end(args, state, TrainerControl(), model=cm)
    assert not cm._forward_hooks


def test_callback_warns_on_total_step_mismatch_and_needs_adalora():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from peftcore.trainer import AdaLoraCallback

    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    _, cm = _pair()
    cb = AdaLoraCallback()
    with pytest.warns(UserWarning, match="total_step=30 but the Trainer runs 7 optimizer steps"):
        cb.on_train_begin(args, TrainerState(max_steps=7), TrainerControl(), model=cm)
    cb.on_train_end(args, TrainerState(), TrainerControl(), model=cm)
    with pytest.raises(PeftcoreError, match="no AdaLoRA adapter"):
        cb.on_train_begin(args, TrainerState(max_steps=7), TrainerControl(), model=tiny_llama())
