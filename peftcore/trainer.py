"""transformers ``Trainer`` integration: write each checkpoint's adapters in PEFT's format
(``AdapterCheckpointCallback``) and run AdaLoRA's rank allocation (``AdaLoraCallback``)."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from transformers import TrainerCallback

from .adalora import adalora_orthogonal_loss, trainable_adalora, update_and_allocate
from .api import save_pretrained
from .state import get_state


class AdapterCheckpointCallback(TrainerCallback):
    """``Trainer(..., callbacks=[peftcore.trainer.AdapterCheckpointCallback()])``.

    At every checkpoint the Trainer saves, the model's peftcore adapters are also saved
    in PEFT's layout inside ``checkpoint-<step>/`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), so any checkpoint loads with ``peftcore.load_adapter``
    or ``peft.PeftModel.from_pretrained``. At the end of training the same is written to
    ``output_dir``."""

    def _save(self, model, folder: str) -> None:
        if model is not None and get_state(model) is not None:
            save_pretrained(model, folder)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, args.output_dir)


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[peftcore.trainer.AdaLoraCallback()])`` trains an AdaLoRA
    adapter as PEFT's manual loop does (PEFT's Trainer use needs both steps by hand):

    * **Orthogonal regularization.** From ``on_train_begin`` to ``on_train_end`` a forward
      hook on the model adds ``peftcore.adalora.adalora_orthogonal_loss(model)`` to the
      output's ``loss`` when the model is in training mode and computed a tensor ``loss``
      itself (labels passed). As in PEFT, a loss computed outside the model (a custom
      ``compute_loss`` / ``compute_loss_func``, label smoothing) gets no term. Unlike PEFT,
      whose ``forward`` also adds it in eval mode, evaluation losses do not include it.
    * **Rank allocation.** ``on_optimizer_step`` (the Trainer calls it right after
      ``optimizer.step()`` and before ``model.zero_grad()``, so the gradients are still
      there) calls ``peftcore.adalora.update_and_allocate(model, state.global_step)``.
      ``state.global_step`` is incremented only after that hook, so the first optimizer step
      is step 0: PEFT's manual-loop convention (``update_and_allocate(step)`` then
      ``step += 1``). With gradient accumulation it runs once per optimizer step.

    Set the adapter's ``total_step`` to the number of optimizer steps the Trainer will run
    (a warning is given if they differ). The allocation statistics are kept on the model,
    not in Trainer checkpoints (as in PEFT), so a resumed run restarts them."""

    def __init__(self):
        self._handle = None

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @staticmethod
    def _add_orth_loss(module, args, output):
        if not module.training:
            return None
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return None
        output.loss = loss + adalora_orthogonal_loss(module)
        return output

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AdaLoraCallback: the Trainer passed no model")
        name, config, _ = trainable_adalora(model, "AdaLoraCallback")  # clear errors before training
        if state.max_steps and state.max_steps != config.total_step:
            warnings.warn(
                f"AdaLoraCallback: adapter {name!r} has total_step={config.total_step} but the Trainer runs "
                f"{state.max_steps} optimizer steps; the final rank allocation happens at step "
                f"total_step - tfinal = {config.total_step - config.tfinal}"
            )
        self._remove_hook()
        self._handle = model.register_forward_hook(self._add_orth_loss)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        update_and_allocate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._remove_hook()


@contextlib.contextmanager
def quantized_model_ok(model):
    """``with peftcore.trainer.quantized_model_ok(model): trainer = Trainer(model=model, ...)``.

    transformers' Trainer refuses a bitsandbytes-quantized model at construction ("cannot
    perform fine-tuning on purely quantized models") unless transformers' *own* PEFT
    integration flag ``_hf_peft_config_loaded`` is set. peftcore adapters are not seen by
    that check, so this sets the flag while the Trainer is built, only if the model has
    peftcore adapters with trainable parameters, and removes it afterwards (left set, it
    would make ``model.save_pretrained`` call into PEFT)."""
    st = get_state(model)
    if st is None or not any(p.requires_grad for p in model.parameters()):
        raise ValueError("quantized_model_ok: the model has no trainable peftcore adapter; add one first")
    had = "_hf_peft_config_loaded" in model.__dict__
    prev = model.__dict__.get("_hf_peft_config_loaded")
    model.__dict__["_hf_peft_config_loaded"] = True
    try:
        yield model
    finally:
        if had:
            model.__dict__["_hf_peft_config_loaded"] = prev
        else:
            model.__dict__.pop("_hf_peft_config_loaded", None)
