"""REM: robust error-minimizing noise (Fu et al., ICLR 2022).

The noise minimises the loss of a surrogate that is itself attacked: each noise step's gradient
flows through x_r = t(x + delta) + r, with r a PGD-10 *ascent* of radius rho_a. Robust to
adversarial training, but about 9x dearer than SEM (561 passes per image and step).

>>> import uexamples as ue
>>> protect = ue.REMProtect(train_steps=1, adv_steps=1, final_noise_steps=1)
>>> protect.passes_per_sample_step()  # 3 noise steps x (1 PGD + 1) + (1 PGD + 1 SGD)
8
"""

from __future__ import annotations

from ..core.registry import register_method
from .minmin import MinMinProtector
from .sem import FAST as SEM_FAST
from .sem import PAPER as SEM_PAPER

PAPER = dict(SEM_PAPER)  # same schedule as SEM; only the inner step differs
FAST = dict(SEM_FAST, train_steps=150, noise_steps=3, final_noise_steps=5)


@register_method
class REMProtect(MinMinProtector):
    """Robust error-minimizing noise (PGD inner maximisation in every noise step)."""

    method = "rem"
    variant = "rem"
    adversarial_training = True
    PRESETS = {"paper": PAPER, "fast": FAST}
