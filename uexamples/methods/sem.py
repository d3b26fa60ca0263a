"""SEM: stable error-minimizing noise (Liu et al., AAAI 2024).

REM's robustness against adversarial training at a fraction of its cost: the inner error-maximising
PGD is replaced by one uniform random offset ``u ~ U(-rho_a, rho_a)``, so a fit step costs
K*J + adv_steps + 1 = 61 passes per image instead of REM's 561.

>>> import uexamples as ue
>>> ds = ue.load_sample_dataset()                                           # 500 CIFAR-10 images
>>> protect = ue.SEMProtect(seed=0, train_steps=2, final_noise_steps=1).fit(ds, progress=False)
>>> protected = ds.map(protect, batched=True)
>>> protected[0]["image"].size
(32, 32)
"""

from __future__ import annotations

import torch

from ..core.registry import register_method
from .minmin import MinMinProtector, uniform_per_copy

PAPER = dict(
    surrogate="resnet18", train_steps=5000, train_batch_size=128, lr=0.1, lr_decay_every=2000,
    noise_steps=10, eot_draws=5, step_size=1.6 / 255, adv_radius=4 / 255, adv_steps=10,
    adv_step_size=0.8 / 255, final_noise_steps=10, final_eot_draws=5,
)
# CPU-sized (measured on 2 cores, benchmarks/README.md): the tiny convnet surrogate, one EOT draw in the
# fit, a lighter adversary (rho_a = 2/255, 2 PGD steps) so that the small surrogate still learns the
# noise in 400 steps, and a 20-step final pass. rho_a = 4/255 with 150-300 steps left victims at 31-35 %.
# A 40-step final pass was tried for the generalisation issue: 0.29 of clean against 0.32 on 28 px grey
# CIFAR-10, but 0.37 on cifar10-10k (0.33 measured with 20 steps on 2 threads): inside the spread that the
# thread count alone gives, for 40 s more per 8,000 images, so not adopted (benchmarks/README.md).
# The fit length follows the data (the generalisation issue): 30 epochs, at least 20 steps, at most 400,
# so 2,000 images and more fit the 400 steps the preset was measured with, and the 500 embedded images
# 118 (about 30 s instead of 100 on 2 cores; benchmarks/README.md, "Fit length that follows the data").
# Each fit image keeps its noise from one visit to the next (persistent_noise, as the published EM loop
# keeps noise[index]; SEM's own code restarts every batch from a uniform draw, kept in `paper`): at the
# same cost, victims on cifar10-10k fell from 0.29 to 0.22 of clean and on dark grey 28 px images from
# 0.27 to 0.19; grey 28 px unchanged (0.33 against 0.32). Chosen on the tune suite; measured afterwards it
# is mixed: better on the dark grey confirm set (0.30 -> 0.25 over two fits) and BreastMNIST, worse on the
# RGB confirm photos (0.25 -> 0.29) and, over three fits, on RetinaMNIST (27.7 % balanced against 25.5):
# benchmarks/README.md, "Protection on data nobody tuned on" and "Medical images: SALM".
# The surrogate also learns to answer uniformly on the clean fit images (clean_uniform_weight=1, 2026-12-07),
# so that only the noise can carry the class and the noise must carry all of it: victims fell from 0.22 / 0.29
# of clean to 0.16 / 0.21 on two tune windows, and on the RGB confirm photos from 0.28 / 0.31 (preset, over
# fits) to 0.16 / 0.21 (convnet; resnet20 0.16), for one more pass per fit step (benchmarks/README.md,
# "A surrogate blind to the clean images").
# A decoy class (2026-12-08): one class, drawn from the seed, keeps uniform random noise and the surrogate learns that
# class on the clean images (clean_target="one-class", decoy_class=True). A protected victim then learns "no
# shortcut: that class" and gives real images to it: on the tune cells 0.14 (cifar10-10k) and 0.17 (dark grey, three
# fits), on the confirm cells dark grey 0.16 / 0.16 (convnet / resnet20) and RGB photos 0.14 over three fits each,
# where the blind surrogate alone kept 0.285 and 0.254 (benchmarks/README.md, "A decoy class").
FAST = dict(  # fit length: 30 epochs within [20, 400] steps, never under 2.4 epochs (EM's finding; minmin.py)
    surrogate="tinycnn", train_steps=400, train_epochs=30, min_train_steps=20, min_train_epochs=2.4, train_batch_size=128, lr=0.1, lr_decay_every=100_000,
    persistent_noise=True, clean_uniform_weight=1.0, clean_target="one-class", decoy_class=True,
    noise_steps=5, eot_draws=1, step_size=2 / 255, adv_radius=2 / 255, adv_steps=2,
    adv_step_size=1 / 255, final_noise_steps=20, final_eot_draws=1,
)


@register_method
class SEMProtect(MinMinProtector):
    """Stable error-minimizing noise; robust to adversarial training (the toolkit's main method)."""

    method = "sem"
    title = "SEM (stable error-minimizing noise)"
    summary = ("A surrogate model is trained against random perturbations while error-minimising noise is "
               "optimised for each image (Liu et al., AAAI 2024).")  # fmt: skip
    paper = "Liu et al., *Stable Unlearnable Example*, AAAI 2024"
    citation = (
        "@inproceedings{liu2024stable,\n  title={Stable Unlearnable Example: Enhancing the Robustness of Unlearnable "
        "Examples via Stable Error-Minimizing Noise},\n  author={Liu, Yixin and Xu, Kaidi and Chen, Xun and Sun, Lichao},\n"
        "  booktitle={AAAI},\n  year={2024}\n}"
    )
    adversarial_training = True
    PRESETS = {"paper": PAPER, "fast": FAST}

    def robust_inputs(self, model, xt: torch.Tensor, targets, rnd, draws: int) -> torch.Tensor:
        """x_r = t(x + delta) + u, u ~ U(-rho_a, rho_a): one random draw per copy (REM's PGD, at no cost)."""
        return xt + uniform_per_copy(rnd, xt, draws, float(self.config.adv_radius))
