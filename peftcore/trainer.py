"""transformers ``Trainer`` integration: write each checkpoint's adapters in PEFT's format."""
from __future__ import annotations

import contextlib
import os

from transformers import TrainerCallback

from .api import save_pretrained
from .switching import get_state


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
