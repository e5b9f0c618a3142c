"""transformers ``Trainer`` integration: write each checkpoint's adapters in PEFT's format."""
from __future__ import annotations

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
