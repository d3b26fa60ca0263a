"""EM: error-minimizing noise (Huang et al., ICLR 2021), sample-wise or class-wise.

The surrogate trains on ``t(x + delta)`` (no adversarial step) while the noise minimises its loss.
The published code alternates 10 training batches with a 20-step noise pass over all data and
stops when the surrogate's accuracy on the noisy data exceeds 99 %; here the same two phases run
in the shared min-min loop (``noise_steps=20``, ``step_size=0.8/255``) with that stopping rule.
Class-wise noise averages the per-sample updates into one noise per class (sign of the summed
gradient), kept across the whole fit.

>>> import uexamples as ue
>>> ue.EMProtect(noise_type="class-wise").config.noise_type
'class-wise'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..core.additive import project_grey
from ..core.options import option
from ..core.registry import register_method
from .minmin import MinMinConfig, MinMinProtector, patterns_at_size

NOISE_TYPES = ("sample-wise", "class-wise")


@dataclasses.dataclass
class EMConfig(MinMinConfig):
    """EM adds the choice between one noise per image and one per class."""

    noise_type: str = option("sample-wise", "one noise per image (sample-wise) or per class (class-wise)",
                             choices=NOISE_TYPES)  # fmt: skip


PAPER = dict(
    surrogate="resnet18", train_steps=5000, train_batch_size=128, lr=0.1, lr_decay_every=100_000,
    noise_steps=20, eot_draws=1, step_size=0.8 / 255, final_noise_steps=20, final_eot_draws=1,
    stop_at_train_accuracy=0.99,
)
# fit length: 30 epochs, at least 20 steps, at most 150 (SEM's rule; 150 from 640 images up), and never under
# 2.4 epochs (150 steps of 8,000 images, where it was tuned): capped at 150 steps, 20,000 images kept 0.58 of
# clean accuracy, 0.16-0.19 with 375 steps (benchmarks/README.md, "A floor in epochs above the cap")
FAST = dict(
    surrogate="tinycnn", train_steps=150, train_epochs=30, min_train_steps=20, min_train_epochs=2.4, train_batch_size=128, lr=0.1, lr_decay_every=100_000,
    noise_steps=5, eot_draws=1, step_size=2 / 255, final_noise_steps=20, final_eot_draws=1,
    stop_at_train_accuracy=0.99,
)


@register_method
class EMProtect(MinMinProtector):
    """Error-minimizing noise, sample-wise (default) or class-wise."""

    method = "em"
    title = "EM (error-minimizing noise)"
    summary = ("Noise is optimised so that a surrogate model's training loss on the image is already minimal "
               "(Huang et al., ICLR 2021).")  # fmt: skip
    paper = "Huang et al., *Unlearnable Examples*, ICLR 2021"
    citation = (
        "@inproceedings{huang2021unlearnable,\n  title={Unlearnable Examples: Making Personal Data Unexploitable},\n"
        "  author={Huang, Hanxun and Ma, Xingjun and Erfani, Sarah Monazam and Bailey, James and Wang, Yisen},\n"
        "  booktitle={ICLR},\n  year={2021}\n}"
    )
    adversarial_training = False
    config_class = EMConfig
    PRESETS = {"paper": PAPER, "fast": FAST}

    def validate_config(self) -> None:
        super().validate_config()
        if self.class_wise and self.config.persistent_noise:
            raise ValueError("persistent_noise is for sample-wise noise: class-wise noise is kept through the fit already")
        if self.class_wise and self.config.decoy_class:  # its noise is one pattern per class, not a noise phase per image
            raise ValueError("decoy_class is for sample-wise noise")
        if self.class_wise and self.config.noise_start == "class":  # its one noise per class starts from a draw already
            raise ValueError("noise_start='class' is for sample-wise noise: class-wise noise is one pattern per class already")

    @property
    def class_wise(self) -> bool:
        return self.config.noise_type == "class-wise"

    # class-wise: one noise per class, persistent across the fit
    def _prepare_fit(self, x_all, y_all, gen) -> None:
        super()._prepare_fit(x_all, y_all, gen)  # the engine's persistent sample-wise noise, if asked for
        if self.class_wise:
            eps = float(self.config.epsilon)
            shape = (self.num_classes, *x_all.shape[1:])
            self._runtime["class_noise"] = ((torch.rand(shape, generator=gen) * 2 - 1) * eps).to(self.device)

    def _fit_state(self) -> dict[str, torch.Tensor]:
        state = super()._fit_state()
        return {**state, "class_noise": self._runtime["class_noise"].cpu()} if self.class_wise else state

    def _restore_fit_state(self, state: dict[str, torch.Tensor]) -> None:
        super()._restore_fit_state(state)
        if self.class_wise:
            self._runtime["class_noise"] = state["class_noise"].to(self.device)

    def _fit_noise(self, model, x, y, idx, rnd, grey) -> torch.Tensor:
        if not self.class_wise:
            return super()._fit_noise(model, x, y, idx, rnd, grey)
        noise = self._runtime["class_noise"] = self.class_noise_phase(model, x, y, self._runtime["class_noise"], rnd)
        return project_grey((x + noise[y]).clamp(0, 1) - x, grey)

    def perturbation(self, x, batch, grey) -> torch.Tensor:
        if not self.class_wise:
            return super().perturbation(x, batch, grey)
        noise = patterns_at_size(self._runtime["class_noise"].cpu(), x.shape[-2:])  # fitted at another size: resized
        return project_grey((x + noise[self.targets_for(batch)]).clamp(0, 1) - x, grey)

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = super()._fitted_arrays()
        if self.class_wise:
            arrays["class_noise"] = self._runtime["class_noise"].detach().cpu().numpy()
        return arrays

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        class_noise = arrays.pop("class_noise", None)
        super()._load_fitted(meta, arrays)
        if class_noise is not None:
            self._runtime["class_noise"] = torch.from_numpy(np.array(class_noise)).to(self.device)
