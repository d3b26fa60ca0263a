"""The min-min engine shared by EM, REM and SEM.

Bilevel training of a surrogate ``f`` and noise ``delta`` (``|delta| <= rho_u``)::

    for step in 1..S:
        noise phase (f frozen, eval mode): delta ~ U(-rho_u, rho_u); K times:
            g = grad_delta of CE(f(x_r), y), x_r built from J random crops/flips t(x + delta), batched:
                EM : x_r = t(x + delta)
                REM: x_r = t(x + delta) + r, r = PGD ascent of radius rho_a (error-*maximising* inner step)
                SEM: x_r = t(x + delta) + u, u ~ U(-rho_a, rho_a) (one draw: the cheap stand-in for REM's PGD)
            delta <- clip(delta - alpha_u * sign(g), -rho_u, rho_u), with x + delta kept in [0, 1]
        model phase (train mode): one SGD step on CE(f(x_adv), y), x_adv = PGD around t(x + delta)
                                  (EM: plain training on t(x + delta))
    map: the noise phase again, for every image, against the final f (per-image seeded randomness).

With ``persistent_noise`` a fit image's noise phase starts from where its last visit left it (the
published EM loop keeps ``noise[index]`` for the whole dataset), not from a fresh uniform draw: the
pattern of each image then builds up over the fit, and a surrogate learns it as a shortcut far sooner
(RetinaMNIST, SEM fast: 0.96 accuracy on the noisy fit data after 254 steps, against 0.76 with fresh
starts; benchmarks/README.md, fit_diagnosis.py). Off in the config's default and in the ``paper``
presets of EM/REM/SEM (their published batch loops start from a uniform draw); on in SEM's ``fast``
preset and in SALM's and MEM's presets, where it was measured to help. EM/REM ``fast`` keep the
settings they were measured with.

The J transformation draws are one batch of J*B images, never a Python loop over images.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.additive import NATIVE, AdditiveConfig, AdditiveProtector, project_grey
from ..core.augment import BatchRandom, SampleRandom, random_crop_flip
from ..core.batch import ProtectBatch
from ..core.checkpoint import FitCheckpoint
from ..core.columns import Columns
from ..core.distributed import DataParallel
from ..core.loading import image_sizes, load_split, one_small_size
from ..core.options import check_int, check_non_negative, option
from ..core.progress import progress_bar
from ..surrogates import Surrogate, spec_as_config, to_fast_layout
from ..surrogates.layer import check_surrogate_width

GREY_STEPS = ("channels", "summed")  # how a grey image's shared noise steps (MinMinConfig.grey_step)
NOISE_STARTS = ("uniform", "class")  # where an image's noise phase starts (MinMinConfig.noise_start)
CLEAN_TARGETS = ("uniform", "one-class")  # what the surrogate learns on the clean fit images (MinMinConfig.clean_target)


@dataclasses.dataclass
class MinMinConfig(AdditiveConfig):
    """Hyper-parameters of the min-min engine (names follow the papers: rho_u = epsilon)."""

    surrogate: Any = option("smallcnn", "surrogate classifier: built-in name (tinycnn, smallcnn, convnet, resnet18, "
                            "resnet20, resnet56), transformers Hub id or folder, or a torch.nn.Module")  # fmt: skip
    surrogate_width: int | None = option(None, "channels of the first stage of a built-in conv surrogate (tinycnn, "
                                         "smallcnn, convnet; later stages double them); None: the net's own (16, 16, 32)")  # fmt: skip
    trust_remote_code: bool = option(False, "allow a Hub surrogate's own modelling code to run")
    train_steps: int = option(5000, "surrogate fit steps (S); with train_epochs set, the most steps a fit may take "
                                  "(setting train_steps alone fixes the fit at exactly that many steps)")
    train_epochs: float | None = option(None, "fit length that follows the data: ceil(train_epochs * images / "
                                        "train_batch_size) steps, at least min_train_steps, at most train_steps "
                                        "(raised to min_train_epochs where that is more)")  # fmt: skip
    min_train_steps: int = option(20, "the fewest fit steps the train_epochs rule gives (a tiny set still fits)")
    min_train_epochs: float | None = option(None, "with train_epochs set, the train_steps cap is raised to at least "
                                            "this many epochs (a cap in steps is under one epoch of a large set, "
                                            "and the surrogate never learns the noise)")  # fmt: skip
    train_batch_size: int = option(128, "images per fit step")
    lr: float = option(0.1, "surrogate SGD learning rate")
    momentum: float = option(0.9, "surrogate SGD momentum")
    weight_decay: float = option(5e-4, "surrogate SGD weight decay")
    lr_decay_every: int = option(2000, "multiply the learning rate by lr_decay every this many steps")
    lr_decay: float = option(0.1, "learning-rate decay factor")
    noise_steps: int = option(10, "signed-gradient noise steps per fit step (K)")
    eot_draws: int = option(5, "random crop/flip draws averaged per noise step (J)")
    step_size: float = option(1.6 / 255, "noise step size (alpha_u)")
    adv_radius: float = option(4 / 255, "adversarial radius of REM/SEM and of the model phase (rho_a)")
    adv_steps: int = option(10, "PGD steps of the model phase (and of REM's inner ascent)")
    adv_step_size: float = option(0.8 / 255, "PGD step size")
    final_noise_steps: int = option(10, "noise steps of the final pass run by map against the fitted surrogate")
    final_eot_draws: int = option(5, "crop/flip draws per step of the final pass")
    stop_at_train_accuracy: float | None = option(None, "stop the fit once the surrogate's running accuracy on noisy data exceeds this")
    persistent_noise: bool = option(False, "keep each fit image's noise from one visit to the next (the published EM loop's "
                                    "noise[index]) instead of a fresh uniform start per fit step; costs images x pixels x "
                                    "4 bytes of memory during the fit")  # fmt: skip
    final_from_fit_noise: bool = option(False, "with persistent_noise: the final pass of a fit image starts from the noise "
                                        "the fit built for it (the published EM loop outputs that noise) instead of "
                                        "a uniform draw; the fitted protector then keeps that noise (1 byte per fit "
                                        "image pixel and channel of the working grid, saved with it)")  # fmt: skip
    noise_start: str = option("uniform", "where each image's noise phase starts: 'uniform' (a fresh draw in the bound, "
                              "as the papers do) or 'class' (one seeded pattern per class, uniform in the bound, the "
                              "same start for every image of the class; the noise steps then make it per image)",
                              choices=NOISE_STARTS)  # fmt: skip
    class_start_epochs: float = option(0.0, "with noise_start='class': epochs of class-wise min-min steps that open the fit "
                                       "(ceil(epochs * images / train_batch_size) steps before the per-image ones; one noise "
                                       "per class, stepped on the sign of its images' summed gradient, as class-wise EM), so "
                                       "that every image starts from an *optimised* class pattern, at fit and at map (the "
                                       "patterns are saved with the protector). 0: the seeded random patterns")  # fmt: skip
    clean_uniform_weight: float = option(0.0, "weight of a second loss of the surrogate's model phase: answer "
                                         "uniformly (cross-entropy to the uniform distribution) on the clean fit "
                                         "images, so that only the noise can carry the class (a contrastive "
                                         "surrogate: the caption); 0: off (the papers)")  # fmt: skip
    clean_target: str = option("uniform", "with clean_uniform_weight > 0, what the surrogate learns to answer on the clean "
                               "fit images: 'uniform' (every class alike) or 'one-class' (one class, drawn from the "
                               "seed, for every clean image, so that the noise of every other class must lead away "
                               "from it and a victim should fall back on that one class for images without a "
                               "shortcut; measured: 5 fits of 6 did, benchmarks/README.md)", choices=CLEAN_TARGETS)  # fmt: skip
    decoy_class: bool = option(False, "the images of one class (drawn from the seed, the class clean_target='one-class' "
                               "uses) get uniform random noise in the bound, never optimised, at fit and at map; every "
                               "other class gets the method's noise. A victim then learns 'no shortcut: that class' "
                               "and sends images without one (real data) there (benchmarks/README.md, 'A decoy class')")  # fmt: skip
    grey_step: str = option("channels", "how a noise step moves a grey image's noise (one value per pixel, shared by R, G "
                            "and B): 'channels' (each channel steps on its own gradient's sign, then the three are "
                            "averaged: a third of a step where their signs disagree) or 'summed' (the sign of the shared "
                            "noise's own gradient, the channels' sum: always a full step)", choices=GREY_STEPS)  # fmt: skip
    max_fit_samples: int | None = option(None, "fit on at most this many images (a seeded random subset)")
    fit_shards: int = option(1, "batch-norm shards per fit batch; the same value gives the same surrogate on any "
                             "number of processes (core.distributed)")  # fmt: skip
    native_up_to: int = option(32, "with resolution unset and a surrogate that takes any size (the built-in nets): "
                               "fit images that all share one size of at most this many pixels a side are worked at "
                               "that size, unresized (resizing 28 px images to the 32 px grid and back cost SEM a "
                               "third of its effect); others on the 32 px grid. 0: always the grid")  # fmt: skip


def patterns_at_size(patterns: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Per-class noise patterns (classes x C x H x W) for images of ``size`` (H, W): as they are, or resized
    bilinearly when they were fitted at another working size (natively on images of one size)."""
    if tuple(patterns.shape[-2:]) == tuple(size):
        return patterns
    return F.interpolate(patterns.float(), size=tuple(size), mode="bilinear", align_corners=False)


def pgd_ascent(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, step: float, steps: int, init: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:  # fmt: skip
    """PGD that *maximises* ``loss_fn`` within an L-inf ball of ``radius``; returns the offset r (detached)."""
    r = init.clone()
    for _ in range(steps):
        r.requires_grad_(True)
        loss = loss_fn(model((x + r).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, r)
        r = (r.detach() + step * g.sign()).clamp(-radius, radius)
    return r.detach()


def uniform_per_copy(rnd, xt: torch.Tensor, draws: int, radius: float) -> torch.Tensor:
    """U(-radius, radius), one draw per sample and augmented copy, laid out like ``xt`` (the J copies
    stacked draw-major, as ``repeat`` makes them): SEM's random offset, REM's PGD start."""
    u = (rnd.rand(draws, *xt.shape[1:]).to(xt.device) * 2 - 1) * radius
    return u.transpose(0, 1).reshape_as(xt)


@dataclasses.dataclass
class FitState:
    """Everything the bilevel loop carries from one step to the next; a checkpoint is its state_dict."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    order: torch.Tensor
    pos: int = 0
    step: int = 0  # steps done
    acc_ema: float | None = None
    acc_curve: list = dataclasses.field(default_factory=list)  # acc_ema every 10 steps: did the noise become a shortcut?
    passes: int = 0
    method_state: dict = dataclasses.field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "order": self.order, "pos": self.pos, "acc_ema": self.acc_ema,
            "acc_curve": list(self.acc_curve),
            "passes": self.passes, "method_state": self.method_state,
        }  # fmt: skip

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.order, self.pos, self.acc_ema = saved["order"], int(saved["pos"]), saved["acc_ema"]
        self.acc_curve = list(saved.get("acc_curve", []))
        self.step, self.passes, self.method_state = int(saved["step"]), int(saved["passes"]), saved["method_state"]


class MinMinProtector(AdditiveProtector):
    """The shared engine. A method is a subclass that sets its presets and, where it differs, a hook:

    - :meth:`robust_inputs`: what the noise gradient flows through (EM: the augmented image; SEM: plus
      a uniform offset; REM: plus a PGD ascent);
    - :meth:`objective`: the loss the noise minimises and the surrogate trains on (cross-entropy on
      class labels; a contrastive method overrides it);
    - :meth:`noise_step` and :meth:`project`: one update of the noise and its projection onto the
      allowed set (an L-inf sign step and a clamp; a sparse-mask method overrides ``project``);
    - :meth:`_fit_noise`, :meth:`_prepare_fit`, :meth:`_fit_state`: method state over the fit (class-wise EM);
    - :meth:`_build_surrogate`, :meth:`_load_training_tensors`, :meth:`targets_for`, :meth:`batch_correct`:
      what is trained and what its targets are (class labels; a contrastive method: a CLIP and captions).
    """

    config_class = MinMinConfig
    needs_fit = True
    needs_labels = True
    adversarial_training = True  # model phase on PGD examples (REM, SEM); EM trains on t(x + delta)
    surrogate_class: Any = Surrogate  # what _load_fitted rebuilds (a contrastive method: ContrastiveSurrogate)

    MODULE_FIELD = "surrogate"
    _module_as_config = staticmethod(spec_as_config)

    def __init__(self, preset: str = "fast", **kwargs: Any) -> None:
        if "train_steps" in kwargs and "train_epochs" not in kwargs:
            kwargs["train_epochs"] = None  # an explicit number of steps is the fit's exact length, whatever the preset's rule
        if "clean_uniform_weight" in kwargs and not kwargs["clean_uniform_weight"] and "clean_target" not in kwargs:
            kwargs["clean_target"] = "uniform"  # switching the clean loss off switches off what it teaches (SEM's preset: one class)
        super().__init__(preset=preset, **kwargs)

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.config
        for name in ("train_steps", "train_batch_size", "noise_steps", "eot_draws", "final_noise_steps",
                     "final_eot_draws", "fit_shards", "lr_decay_every"):  # fmt: skip
            check_int(cfg, name)  # 0 steps would fit nothing and "protect" with untrained noise
        check_int(cfg, "adv_steps", minimum=0)
        check_int(cfg, "max_fit_samples", optional=True)
        check_int(cfg, "min_train_steps")
        check_int(cfg, "native_up_to", minimum=0)
        for name in ("train_epochs", "min_train_epochs"):
            value = getattr(cfg, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"{name} must be None or > 0, got {value!r}")
        for name in ("lr", "step_size"):
            if not float(getattr(cfg, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
        check_non_negative(cfg, "momentum", "weight_decay", "adv_radius", "adv_step_size", "lr_decay", "class_start_epochs",
                           "clean_uniform_weight")  # fmt: skip
        if float(cfg.class_start_epochs) > 0 and cfg.noise_start != "class":
            raise ValueError("class_start_epochs optimises the class patterns every image starts from: it needs noise_start='class'")
        if cfg.noise_start == "class" and not self.needs_labels:  # MEM's targets are captions, not classes
            raise ValueError(f"noise_start='class' needs class labels; {self.method} has none to start from")
        if cfg.clean_target != "uniform" and not float(cfg.clean_uniform_weight) > 0:
            raise ValueError(f"clean_target={cfg.clean_target!r} is what the clean images are taught with clean_uniform_weight > 0")
        if cfg.clean_target == "one-class" and not self.needs_labels:
            raise ValueError(f"clean_target='one-class' needs class labels; {self.method} has none")
        if cfg.decoy_class and not self.needs_labels:
            raise ValueError(f"decoy_class needs class labels; {self.method} has none")
        check_surrogate_width(cfg.surrogate, cfg.surrogate_width)
        if cfg.final_from_fit_noise and not cfg.persistent_noise:
            raise ValueError("final_from_fit_noise starts the final pass from the noise a fit kept for each image: "
                             "it needs persistent_noise=True")  # fmt: skip
        acc = cfg.stop_at_train_accuracy
        if acc is not None and not 0 < float(acc) <= 1:
            raise ValueError(f"stop_at_train_accuracy must be None or in (0, 1], got {acc!r}")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self.passes = 0  # forward+backward passes, in images (for the speed benchmark)

    def planned_train_steps(self, images: int) -> int:
        """Fit steps for ``images`` training images: ``train_steps``, or with ``train_epochs`` set the rule
        ceil(train_epochs * images / train_batch_size) clipped to [min_train_steps, cap], so that a fit on
        500 images costs a fraction of one on 50,000. The cap is ``train_steps``, raised to
        ``min_train_epochs`` worth of steps where that is more (EM's 150-step cap is under one epoch of
        20,000 images: victims kept 0.58 of clean accuracy, against 0.16-0.19 with 2.4 epochs).

        >>> from uexamples.methods.em import EMProtect
        >>> p = EMProtect(train_epochs=10, train_steps=400, min_train_steps=20, min_train_epochs=None, train_batch_size=128)
        >>> p.planned_train_steps(500), p.planned_train_steps(50), p.planned_train_steps(50_000)
        (40, 20, 400)
        >>> EMProtect().planned_train_steps(8_000), EMProtect().planned_train_steps(50_000)  # 2.4 epochs: 938 > 150
        (150, 938)
        """
        return self._fit_length(images)[0]

    def _fit_length(self, images: int) -> tuple[int, int]:
        """(fit steps, the cap they were clipped to) for ``images`` images; see ``planned_train_steps``."""
        cfg = self.config
        if cfg.train_epochs is None:
            return int(cfg.train_steps), int(cfg.train_steps)
        cap = int(cfg.train_steps)
        if cfg.min_train_epochs is not None:
            cap = max(cap, self._steps_for_epochs(cfg.min_train_epochs, images))
        return int(min(cap, max(int(cfg.min_train_steps), self._steps_for_epochs(cfg.train_epochs, images)))), cap

    def _steps_for_epochs(self, epochs: float, images: int) -> int:
        """Fit steps of ``train_batch_size`` (at most the whole set) that make ``epochs`` passes over ``images``."""
        bs = min(int(self.config.train_batch_size), max(1, images))
        return math.ceil(float(epochs) * images / bs - 1e-9)  # the 1e-9 keeps 2.4 epochs of 8,000 at 150 steps, not 151

    # ------------------------------------------------------------------ state
    def native_limit(self) -> int | None:
        # the preset's rule chose native on fit images of one small size: a photo met at map time would cost
        # a surrogate pass over all its pixels per noise step (130 s and 11 GB for a 12 Mpx photo, measured),
        # so images above native_up_to go to the grid, as they would have at fit
        if self.config.resolution == NATIVE:
            return None
        return int(self.config.native_up_to)

    def working_resolution(self) -> int | None:
        res = self.config.resolution
        if res == NATIVE:
            return None
        if res:
            return int(res)
        fitted = self._runtime.get("resolution")  # what the resolution rule chose at fit (or the saved protector)
        if fitted == NATIVE:
            return None
        if fitted:
            return int(fitted)
        surrogate = self._runtime.get("surrogate")
        if surrogate is not None and surrogate.input_size:
            return surrogate.input_size
        return self.default_resolution

    def _model(self) -> nn.Module:
        surrogate = self._runtime.get("surrogate")
        if surrogate is None:
            raise RuntimeError("surrogate not built")
        return surrogate.model

    def _fitted_meta(self) -> dict[str, Any]:
        res = self.working_resolution()
        meta = {"surrogate": self._runtime["surrogate"].desc, "resolution": NATIVE if res is None else res, "rules": self.rules}
        if self._runtime.get("clean_class") is not None:  # drawn among the fit images' classes (clean_class)
            meta["clean_class"] = int(self._runtime["clean_class"])
        return meta

    def _choose_resolution(self, dataset: datasets.Dataset, image_column: str, indices: np.ndarray) -> None:
        """The resolution rule of the presets, decided on the fit images (recorded in :attr:`rules`).

        An explicit ``resolution`` or a surrogate made for one input size wins. Otherwise images that
        all share one size of at most ``native_up_to`` pixels a side are worked at that size: no
        resizing to the grid and back, which smears per-pixel noise (on 28 px grey CIFAR-10, SEM's
        victim: 38 % of clean through the 32 px grid, 32 % native; benchmarks/README.md). Larger or
        mixed sizes go to the grid, whose cost does not grow with the image.
        """
        cfg = self.config
        surrogate = self._runtime["surrogate"]
        if cfg.resolution is not None:
            res = self.working_resolution()
            self._set_rule("resolution", f"{cfg.resolution} (set explicitly)" if res else "native (set explicitly)")
            return
        if surrogate.input_size:
            self._set_rule("resolution", f"{surrogate.input_size} px grid (the surrogate's input size)")
            return
        size, why = one_small_size(image_sizes(dataset, image_column, indices), cfg.native_up_to)
        if size is not None:
            self._runtime["resolution"] = NATIVE
            self._set_rule("resolution", f"native {size[0]}x{size[1]} ({why}; larger images: the "
                                         f"{self.default_resolution} px grid)")  # fmt: skip
        else:
            self._runtime["resolution"] = self.default_resolution
            self._set_rule("resolution", f"{self.default_resolution} px grid ({why})")


    # the fit images' sample keys (saved when a method needs to find a fit image again in the map: MEM's triggers,
    # ``final_from_fit_noise``); the names before 2026-12-06 are still read
    FIT_KEYS, FIT_KEYS_BEFORE = "fit_keys", ("map_start.keys", "mem.fit_keys")
    MAP_START_NOISE = "map_start.noise"
    CLASS_START = "class_start.noise"  # the optimised class patterns (class_start_epochs)

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._runtime.get("arrays_cache") or {})
        if not arrays:
            arrays = self._runtime["surrogate"].state_arrays()
            self._runtime["arrays_cache"] = arrays
        extra = {}
        if self._runtime.get("fit_keys") is not None:
            extra[self.FIT_KEYS] = self._runtime["fit_keys"].numpy()
        if self._runtime.get("map_start") is not None:
            extra[self.MAP_START_NOISE] = self._runtime["map_start"].numpy()
        if self._runtime.get("class_start_fitted") is not None:
            extra[self.CLASS_START] = self._runtime["class_start_fitted"].cpu().numpy()
        return {**arrays, **extra}

    def _build_surrogate(self, spec: Any, dataset: datasets.Dataset, columns: Columns) -> Surrogate:
        """The surrogate a fit trains: a classifier over the dataset's classes (a contrastive method overrides it)."""
        # (a width that followed the class count, 2 x classes within [4, 16], was measured on the medical sets
        # and rejected: benchmarks/README.md, "A surrogate width that follows the class count")
        return Surrogate.build(spec, self.num_classes, trust_remote_code=self.config.trust_remote_code,
                               width=self.config.surrogate_width)  # fmt: skip

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        saved_keys = [arrays.pop(name) for name in (self.FIT_KEYS, *self.FIT_KEYS_BEFORE) if name in arrays]
        levels = arrays.pop(self.MAP_START_NOISE, None)
        class_start = arrays.pop(self.CLASS_START, None)
        surrogate = self.surrogate_class.rebuild(meta["surrogate"], arrays, self._module).to(self.device)
        surrogate.model.eval()
        self._runtime.update(surrogate=surrogate, arrays_cache=dict(arrays), resolution=meta.get("resolution"),
                             rules=dict(meta.get("rules") or {}), clean_class=meta.get("clean_class"))  # fmt: skip
        if saved_keys:
            self._runtime["fit_keys"] = torch.from_numpy(np.array(saved_keys[0]))
        if levels is not None:
            self._runtime["map_start"] = torch.from_numpy(np.array(levels))
        if class_start is not None:
            self._runtime["class_start_fitted"] = torch.from_numpy(np.array(class_start))

    # ------------------------------------------------------------------ hooks
    def objective(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """The loss the noise minimises and the surrogate trains on: cross-entropy on class labels."""
        return F.cross_entropy(outputs, targets, reduction=reduction)

    def uninformative_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``clean_uniform_weight``'s loss on the clean images' outputs: cross-entropy to the uniform
        distribution over the classes (mean over rows), the surrogate telling nothing from the clean picture;
        with ``clean_target='one-class'`` cross-entropy to :meth:`clean_class` for every row."""
        if self.config.clean_target == "one-class":
            return F.cross_entropy(outputs, torch.full_like(targets, self.clean_class()))
        return -outputs.log_softmax(-1).mean()

    @classmethod
    def card_notes(cls, config: dict[str, Any]) -> list[str]:
        return list(super().card_notes(config)) + (
            ["One class (the decoy class, named in the rules below) carries uniform random noise within the same bound "
             "instead of optimised noise: a model trained on this set learns that an image without a shortcut belongs "
             "to that class, and gives real images to it."] if config.get("decoy_class") else [])  # fmt: skip

    def clean_class(self) -> int:
        """The class ``clean_target='one-class'`` teaches the surrogate for every clean image, and the decoy class
        (``decoy_class``): drawn from the seed alone (its own stream), so a fit, its resumption, every process and a
        reloaded protector agree. A fit draws it among the classes its images hold (saved with the protector), so
        a set that uses some of its label's classes never gets a decoy class without images."""
        drawn = self._runtime.get("clean_class")
        return int(drawn) if drawn is not None else self._draw_clean_class(range(self.num_classes))

    def _draw_clean_class(self, classes: Sequence[int]) -> int:
        classes = list(classes)
        gen = torch.Generator().manual_seed(int(self.config.seed) + 0xC1EA)
        return int(classes[int(torch.randint(len(classes), (1,), generator=gen))])

    def batch_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> int:
        """How many rows of a fit batch the surrogate gets right (its running accuracy; top-1 class)."""
        return int((outputs.argmax(1) == targets).sum())

    def _mean_objective(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.objective(outputs, targets, reduction="mean")

    def robust_inputs(self, model: nn.Module, xt: torch.Tensor, targets: torch.Tensor, rnd, draws: int) -> torch.Tensor:
        """What the noise gradient flows through, from the J augmented copies ``xt``; EM: ``xt`` itself."""
        return xt

    def noise_step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One update that *minimises* the objective: a signed-gradient step."""
        return delta.detach() - float(self.config.step_size) * grad.sign()

    def project(self, delta: torch.Tensor, x: torch.Tensor, grey: torch.Tensor | None) -> torch.Tensor:
        """Back onto the allowed set: |delta| <= epsilon, x + delta a valid image, grey images grey."""
        eps = float(self.config.epsilon)
        delta = delta.clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        return project_grey(delta, grey) if grey is not None else delta

    def initial_noise(self, x: torch.Tensor, rnd, grey: torch.Tensor | None) -> torch.Tensor:
        """Where the noise phase starts: uniform in the allowed set."""
        eps = float(self.config.epsilon)
        return self.project((rnd.rand(*x.shape[1:]).to(x.device) * 2 - 1) * eps, x, grey)

    def start_noise(self, x: torch.Tensor, y: torch.Tensor, rnd, grey: torch.Tensor | None) -> torch.Tensor:
        """The first noise of a phase for images ``x`` of classes ``y``: ``initial_noise``, or with
        ``noise_start='class'`` each class's seeded pattern (projected for each image)."""
        if self.config.noise_start != "class":
            return self.initial_noise(x, rnd, grey)
        patterns = self.class_start_patterns(tuple(x.shape[1:]))
        return self.project(patterns[y.to(patterns.device)].to(x.device), x, grey)

    def class_start_patterns(self, shape: tuple[int, ...]) -> torch.Tensor:
        """One pattern per class: the ones the fit's class-wise steps optimised (``class_start_epochs``; resized
        bilinearly for images of another working size), else uniform in the bound from the seed alone (so the
        fit and a reloaded protector's map start a class from the same pattern, on any process)."""
        fitted = self._runtime.get("class_start_fitted")
        if fitted is not None:
            return patterns_at_size(fitted, shape[-2:])
        cache = self._runtime.setdefault("class_start", {})
        if shape not in cache:
            gen = torch.Generator().manual_seed(int(self.config.seed) + 0x5EED)  # not the fit's own stream
            eps = float(self.config.epsilon)
            cache[shape] = (torch.rand((self.num_classes, *shape), generator=gen) * 2 - 1) * eps
        return cache[shape]

    def targets_for(self, batch: ProtectBatch) -> torch.Tensor:
        """What the objective compares the surrogate's output with, for a map batch: the labels."""
        return torch.tensor(batch.labels, dtype=torch.long)

    # ------------------------------------------------------------------ the noise phase
    def noise_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, rnd, draws: int
    ) -> torch.Tensor:
        """Gradient of the objective with respect to ``delta``, summed over J transformation draws (one batch)."""
        y_rep = y.repeat(draws, *([1] * (y.dim() - 1)))  # J copies of the targets, like the images (any shape)
        delta = delta.detach().requires_grad_(True)
        xt = random_crop_flip((x + delta).clamp(0, 1).repeat(draws, 1, 1, 1), rnd)
        xt = self.robust_inputs(model, xt, y_rep, rnd, draws)
        loss = self.objective(model(xt.clamp(0, 1)), y_rep)
        (g,) = torch.autograd.grad(loss, delta)
        self.passes += xt.shape[0]
        return g

    def noise_phase(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        delta: torch.Tensor,
        rnd,
        steps: int,
        draws: int,
        grey: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """K noise steps, each on the gradient averaged over J transformation draws, each projected."""
        summed = grey is not None and self.config.grey_step == "summed"
        start = delta
        for _ in range(steps):
            g = self.noise_gradient(model, x, y, delta, rnd, draws)
            # the shared value's gradient is the channels' sum; their mean (project_grey) has its sign
            g = project_grey(g, grey) if summed else g
            delta = self.project(self.noise_step(delta, g), x, grey)
        if self.config.decoy_class:  # the decoy class keeps its random start: no shortcut to learn there
            held = (y == self.clean_class()).view(-1, *([1] * (delta.dim() - 1)))
            delta = torch.where(held, start, delta)
        return delta.detach()

    def class_noise_phase(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, rnd) -> torch.Tensor:
        """K steps of class-wise noise (one pattern per class, ``noise[c]``): each class moves by the sign of
        its images' summed gradient, over the global batch of a data-parallel fit (class-wise EM)."""
        cfg = self.config
        eps, alpha = float(cfg.epsilon), float(cfg.step_size)
        for _ in range(cfg.noise_steps):
            g = self.noise_gradient(model, x, y, noise[y], rnd, cfg.eot_draws)
            per_class = self._sum_over_processes(torch.zeros_like(noise).index_add_(0, y, g))
            noise = (noise - alpha * per_class.sign()).clamp(-eps, eps)
        return noise

    # ------------------------------------------------------------------ map
    def perturbation(self, x: torch.Tensor, batch: ProtectBatch, grey: torch.Tensor) -> torch.Tensor:
        model = self._model().eval()
        dev = self.device
        x, y = x.to(dev), self.targets_for(batch).to(dev)
        rnd = SampleRandom(batch.keys)
        delta = self._map_start_noise(batch, x, self.start_noise(x, y, rnd, grey), grey)
        cfg = self.config
        return self.noise_phase(model, x, y, delta, rnd, cfg.final_noise_steps, cfg.final_eot_draws, grey).cpu()

    # ------------------------------------------------------------------ fit
    def _fit_rows(self, n: int) -> np.ndarray:
        """The rows a fit trains on: all, or a seeded random subset of ``max_fit_samples``."""
        limit = self.config.max_fit_samples
        if limit and n > limit:
            return np.sort(np.random.default_rng(self.config.seed).choice(n, size=limit, replace=False))
        return np.arange(n)

    def _load_fit_split(self, dataset: datasets.Dataset, image_column: str, label_column: str | None, progress: bool):
        """The fit rows' images at the working resolution (chosen here), their labels if a column is named, and,
        when the map must find a fit image again, their sample keys (kept as ``fit_keys``); returns (split, rows)."""
        indices = self._fit_rows(len(dataset))
        self._choose_resolution(dataset, image_column, indices)
        split = load_split(dataset, image_column, self.working_resolution(), label_column, indices, progress,
                           keys_seed=self._fit_keys_seed())  # fmt: skip
        if split.keys is not None:
            self._runtime["fit_keys"] = split.keys
        return split, indices

    def _load_training_tensors(self, dataset: datasets.Dataset, columns: Columns, progress: bool):
        split, indices = self._load_fit_split(dataset, columns.image, columns.label, progress)
        self._check_labels(split.labels.tolist(), indices.tolist())
        return split.images, split.grey, split.labels

    def _fit(self, dataset: datasets.Dataset, columns: Columns, progress: bool) -> None:
        cfg = self.config
        dp = DataParallel(self._accelerator, int(cfg.fit_shards))
        torch.manual_seed(cfg.seed)  # weight initialisation (the same on every process)
        spec = self._module if self._module is not None else cfg.surrogate
        surrogate = self._build_surrogate(spec, dataset, columns)
        self._runtime = {"surrogate": surrogate, "dp": dp}
        x_all, grey_all, y_all = self._load_training_tensors(dataset, columns, progress and dp.rank == 0)
        dev = self.device
        model = surrogate.to(dev).model
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = self.make_optimizer(model)
        train_model, opt, model = dp.prepare(model, opt)
        surrogate.model = model
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.lr_decay_every), gamma=cfg.lr_decay)
        self._prepare_fit(x_all, y_all, gen)
        n = x_all.shape[0]
        bs = min(cfg.train_batch_size, n)
        bs -= bs % dp.shards  # equal shards
        rows = dp.local_rows(bs)
        total, cap = self._fit_length(n)
        if cfg.train_epochs is not None:
            raised = f"; cap {cfg.train_steps} raised to min_train_epochs={cfg.min_train_epochs:g}" if cap > cfg.train_steps else ""
            self._set_rule("fit_steps", f"{total} (train_epochs={cfg.train_epochs:g} over {n} images in batches of "
                                        f"{min(int(cfg.train_batch_size), n)}, within [{cfg.min_train_steps}, {cap}]{raised})")  # fmt: skip
        if cfg.decoy_class or cfg.clean_target == "one-class":  # among the classes the fit images hold
            present = torch.unique(y_all).tolist()
            if cfg.decoy_class and len(present) < 2:
                raise ValueError(f"decoy_class needs images of at least two classes; the fit images hold {len(present)}")
            self._runtime["clean_class"] = self._draw_clean_class(present)
        if cfg.decoy_class:
            self._set_rule("decoy_class", f"the images of class index {self.clean_class()} (drawn from the seed) get "
                                          f"uniform random noise in the bound, not optimised")  # fmt: skip
        if cfg.clean_target == "one-class":
            self._set_rule("clean_target", f"the surrogate learns class index {self.clean_class()} (drawn from the seed) "
                                           f"for every clean fit image")  # fmt: skip
        class_steps = self._runtime["class_start_steps"] = self._class_start_length(n)
        if class_steps:
            self._set_rule("class_start", f"{class_steps} class-wise steps open the fit (class_start_epochs="
                                          f"{float(cfg.class_start_epochs):g} over {n} images in batches of {bs})")  # fmt: skip
            total += class_steps
        state = FitState(model, opt, sched, gen, order=torch.randperm(n, generator=gen))
        started, ckpt = time.time(), None
        if self._checkpoint is not None:
            # not the number of processes: with the same fit_shards the state is the same on any number
            identity = {"config": self.public_config(), "rows": n, "num_classes": self.num_classes}
            ckpt = FitCheckpoint(self._checkpoint[0], self._checkpoint[1], identity, dp.rank)
            saved = ckpt.load()
            if saved is not None:  # go on from the last checkpoint: same state, same random numbers
                state.load_state_dict(saved)
                self.passes = state.passes
                self._restore_fit_state(state.method_state)
        first = state.step
        bar = progress_bar(range(first, total), desc=f"Fitting {self.method.upper()} surrogate",
                           progress=progress and dp.rank == 0, initial=first, total=total)  # fmt: skip
        for step in bar:
            if state.pos + bs > n:
                state.order, state.pos = torch.randperm(n, generator=gen), 0
            idx = state.order[state.pos : state.pos + bs][rows]  # this process's rows of the global batch
            state.pos += bs
            x, y, grey = x_all[idx].to(dev), y_all[idx].to(dev), grey_all[idx]
            rnd = BatchRandom(gen, bs, rows)
            self._runtime["fit_step"] = (step, total)  # for methods whose noise phase changes over the fit (MEM's triggers)
            model.eval()
            delta = self._fit_noise(model, x, y, idx, rnd, grey)
            y = self.model_targets(y, idx)
            correct = self._model_phase(model, train_model, opt, x, y, delta, rnd)
            acc = float(dp.sum(torch.tensor(float(correct)))) / bs
            sched.step()
            state.acc_ema = acc if state.acc_ema is None else 0.9 * state.acc_ema + 0.1 * acc
            state.step = step + 1
            if step % 10 == 0:
                bar.set_postfix(train_acc=f"{state.acc_ema:.3f}")
                state.acc_curve.append(round(state.acc_ema, 4))
            if (cfg.stop_at_train_accuracy is not None and step >= 20 + class_steps
                    and state.acc_ema >= cfg.stop_at_train_accuracy):  # fmt: skip
                break
            if ckpt is not None and ckpt.due(state.step, total):
                state.passes, state.method_state = self.passes, self._fit_state()
                ckpt.save(state.state_dict())
        bar.close()
        self.fit_stats = {"steps": state.step, "planned_steps": total, "train_accuracy": state.acc_ema,
                          "train_accuracy_every_10_steps": state.acc_curve, "seconds": time.time() - started,
                          "processes": dp.world, "resumed_at_step": first}  # fmt: skip
        model.eval()
        self._runtime.pop("dp", None)
        self._runtime.pop("fit_step", None)
        self._keep_fit_noise_for_map()
        if self._runtime.get("class_start_fitted") is not None:  # kept for the map (and save_pretrained), on the CPU
            self._runtime["class_start_fitted"] = self._runtime["class_start_fitted"].cpu()
        self._runtime.pop("fit_labels", None)
        self._finish_fit(model, x_all, y_all, grey_all, gen)
        if ckpt is not None:
            ckpt.remove()

    def _fit_keys_seed(self) -> int | None:
        """The seed of the fit images' sample keys when the map must find a fit image again (``final_from_fit_noise``;
        MEM's text triggers too), else None (no keys computed)."""
        return int(self.config.seed) if self.config.final_from_fit_noise else None

    def _keep_fit_noise_for_map(self) -> None:
        """After the fit: drop the persistent noise, or with ``final_from_fit_noise`` keep it, indexed by each fit
        image's sample key, as where the map's final pass starts for that image."""
        store, keys = self._runtime.pop("fit_noise", None), self._runtime.get("fit_keys")
        if store is None or keys is None or not self.config.final_from_fit_noise:
            return
        # kept as int8 steps of epsilon / 127 (a quarter of the memory, and what save_pretrained writes, so a
        # reloaded protector starts from exactly the same noise)
        scale = 127 / float(self.config.epsilon)
        self._runtime["map_start"] = (store * scale).round().clamp(-127, 127).to(torch.int8)  # rows as fit_keys

    def _fit_rows_of(self, keys: Sequence[int]) -> list[int | None]:
        """Each sample key's row in the fit set (None for an image the fit never saw), by a map built once
        from ``fit_keys``; what finds a fit image's start noise (and MEM's trigger) again in the map."""
        where = self._runtime.get("fit_row_of_key")
        if where is None:
            fit_keys = self._runtime.get("fit_keys")
            known = [] if fit_keys is None else fit_keys.tolist()
            where = self._runtime["fit_row_of_key"] = {int(k): i for i, k in enumerate(known)}
        return [where.get(int(k)) for k in keys]

    def _map_start_noise(self, batch: ProtectBatch, x: torch.Tensor, delta: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
        """``delta`` with the rows of fit images replaced by the noise their fit built (``final_from_fit_noise``)."""
        levels = self._runtime.get("map_start")
        if levels is None:
            return delta
        found = [(i, r) for i, r in enumerate(self._fit_rows_of(batch.keys)) if r is not None]
        if found:
            rows, fit_rows = (list(t) for t in zip(*found))
            kept = levels[fit_rows].to(torch.float32) * (float(self.config.epsilon) / 127)
            delta[rows] = self.project(kept.to(x.device), x[rows], grey[rows])
        return delta

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the processes of a data-parallel fit (itself on one process)."""
        dp = self._runtime.get("dp")
        return dp.sum(t) if dp is not None else t

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The surrogate's optimiser: SGD with momentum, as the papers train their classifiers."""
        cfg = self.config
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _class_start_length(self, images: int) -> int:
        """Class-wise steps that open the fit: ceil(class_start_epochs * images / batch), 0 when off."""
        epochs = float(self.config.class_start_epochs)
        return max(1, self._steps_for_epochs(epochs, images)) if epochs > 0 else 0

    def _prepare_fit(self, x_all: torch.Tensor, y_all: torch.Tensor, gen: torch.Generator) -> None:
        """State allocated once for the whole fit: with ``persistent_noise`` one noise per fit image, uniform
        in the bound to start with (a subclass adds its own: class-wise noise, text triggers); with
        ``class_start_epochs`` the class patterns the opening class-wise steps optimise (seeded start)."""
        seeded = self.class_start_patterns(tuple(x_all.shape[1:])) if self.config.noise_start == "class" else None
        if self.config.persistent_noise and seeded is not None:  # the store stays on the CPU (images x pixels)
            self._runtime["fit_noise"] = seeded[y_all.cpu()].clone()
        elif self.config.persistent_noise:
            eps = float(self.config.epsilon)
            self._runtime["fit_noise"] = (torch.rand(x_all.shape, generator=gen) * 2 - 1) * eps
        if float(self.config.class_start_epochs) > 0:  # optimised from the seeded draw by the opening steps
            self._runtime["class_start_fitted"] = seeded.clone().to(self.device)
            self._runtime["fit_labels"] = y_all.cpu()  # each image's store row restarts from its class's pattern

    def _finish_fit(self, model, x_all, y_all, grey_all, gen) -> None:
        """Hook run after the bilevel loop."""

    def model_targets(self, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Hook: the targets of the model phase for the fit rows ``idx`` (MEM: captions with their triggers)."""
        return y

    def _fit_state(self) -> dict[str, torch.Tensor]:
        """Hook: the method's own loop state for a fit checkpoint (tensors): the persistent noise and the
        optimised class patterns, where kept."""
        state = {}
        if self._runtime.get("fit_noise") is not None:
            state["fit_noise"] = self._runtime["fit_noise"]
        if self._runtime.get("class_start_fitted") is not None:
            state["class_start"] = self._runtime["class_start_fitted"].cpu()
        return state

    def _restore_fit_state(self, state: dict[str, torch.Tensor]) -> None:
        """Hook: put back what ``_fit_state`` saved."""
        if "fit_noise" in state:
            self._runtime["fit_noise"] = state["fit_noise"]
        if "class_start" in state:
            self._runtime["class_start_fitted"] = state["class_start"].to(self.device)

    def _fit_noise(self, model, x, y, idx, rnd, grey) -> torch.Tensor:
        """The noise of this fit batch: a noise phase from a uniform start, or with ``persistent_noise`` from
        each image's noise of its last visit (kept again afterwards)."""
        cfg = self.config
        store = self._runtime.get("fit_noise")
        step, class_steps = self._runtime.get("fit_step", (0, 0))[0], self._runtime.get("class_start_steps", 0)
        if step < class_steps:  # the opening class-wise steps: optimise the patterns every image will start from
            patterns = self.class_noise_phase(model, x, y, self._runtime["class_start_fitted"], rnd)
            self._runtime["class_start_fitted"] = patterns
            return self.project(patterns[y], x, grey)
        if class_steps and step == class_steps and store is not None:  # each image's noise starts from its class's
            store.copy_(self._runtime["class_start_fitted"].cpu()[self._runtime["fit_labels"]])
        if store is None:
            delta = self.start_noise(x, y, rnd, grey)
        else:
            delta = self.resume_noise(store[idx].to(x.device), x, grey)
        y = self.noise_targets(model, x, y, idx, delta, rnd)
        delta = self.noise_phase(model, x, y, delta, rnd, cfg.noise_steps, cfg.eot_draws, grey)
        if store is not None:
            self._keep_noise(store, idx, delta)
        return delta

    def resume_noise(self, delta: torch.Tensor, x: torch.Tensor, grey: torch.Tensor | None) -> torch.Tensor:
        """Where a persistent noise phase starts: the image's noise of its last visit, projected."""
        return self.project(delta, x, grey)

    def noise_targets(self, model, x, y, idx, delta, rnd) -> torch.Tensor:
        """Hook: the targets the fit's noise phase minimises against (the labels; MEM: shuffled captions)."""
        return y

    def _keep_noise(self, store: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Write this step's noise into the persistent store. On several processes each computed its own rows of
        the global batch: every process gathers all of them, so the store (and the fit) is the same on any number."""
        dp = self._runtime.get("dp")
        if dp is not None and dp.distributed:
            idx, delta = dp.gather(idx.to(delta.device)).cpu(), dp.gather(delta)
        store[idx] = delta.cpu()

    def _model_phase(self, model, train_model, opt, x, y, delta, rnd) -> int:
        """One SGD step of the surrogate on this process's rows; returns how many it classified right.

        Rows are split into batch-norm shards (``fit_shards``); only global shard 0 updates the
        running statistics, which are then broadcast, so every process holds the same model.
        """
        cfg = self.config
        dp = self._runtime["dp"]
        xt = random_crop_flip((x + delta).clamp(0, 1), rnd).detach()
        if self.adversarial_training and cfg.adv_steps > 0:
            rho_a = float(cfg.adv_radius)
            init = (rnd.rand(*x.shape[1:]).to(x.device) * 2 - 1) * rho_a
            r = pgd_ascent(model, xt, y, rho_a, float(cfg.adv_step_size), cfg.adv_steps, init, self._mean_objective)
            self.passes += cfg.adv_steps * x.shape[0]
            xt = (xt + r).clamp(0, 1)
        uniform = float(cfg.clean_uniform_weight)
        # the clean images, cropped and flipped as the noisy ones, share their forward (one batch-norm batch)
        xc = random_crop_flip(x, rnd).detach() if uniform > 0 else None
        model.train()
        opt.zero_grad(set_to_none=True)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        shards = dp.local_shards(rnd.global_batch)
        correct = 0
        for k, (shard, rows) in enumerate(shards):
            if shard:
                for m in norms:
                    m.momentum = 0.0  # running statistics come from global shard 0 only
            with dp.no_sync(train_model, last=k == len(shards) - 1):
                if xc is None:
                    logits = train_model(xt[rows])
                    loss = self.objective(logits, y[rows], reduction="mean")
                else:
                    logits, clean_logits = train_model(torch.cat([xt[rows], xc[rows]])).chunk(2)
                    loss = self.objective(logits, y[rows], reduction="mean") + uniform * self.uninformative_loss(clean_logits, y[rows])
                    self.passes += clean_logits.shape[0]
                (loss * (dp.world / dp.shards)).backward()  # DDP averages
            correct += self.batch_correct(logits.detach(), y[rows])
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        opt.step()
        dp.broadcast_buffers(model)
        self.passes += x.shape[0]
        model.eval()
        return correct

    # ------------------------------------------------------------------ accounting
    def passes_per_sample_step(self) -> int:
        """Forward+backward passes per image and fit step the algorithm needs (SEM paper: 61 for SEM, 561 for REM)."""
        cfg = self.config
        inner = self.passes_per_draw()
        noise = cfg.noise_steps * cfg.eot_draws * inner
        model_phase = (cfg.adv_steps if self.adversarial_training else 0) + 1
        clean = 1 if float(cfg.clean_uniform_weight) > 0 else 0  # the clean images share the SGD step's forward
        return noise + model_phase + clean

    def passes_per_draw(self) -> int:
        """Passes per noise-gradient draw: 1, plus the inner PGD steps of a method that attacks (REM)."""
        return 1

    def passes_per_mapped_image(self) -> int:
        cfg = self.config
        inner = self.passes_per_draw()
        return cfg.final_noise_steps * cfg.final_eot_draws * inner


__all__ = ["FitState", "MinMinConfig", "MinMinProtector", "patterns_at_size", "pgd_ascent", "to_fast_layout", "uniform_per_copy"]
