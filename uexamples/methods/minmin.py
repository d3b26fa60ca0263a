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

The J transformation draws are one batch of J*B images, never a Python loop over images.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.additive import AdditiveProtector, project_grey
from ..core.augment import BatchRandom, SampleRandom, random_crop_flip
from ..core.checkpoint import FitCheckpoint
from ..core.columns import Columns
from ..core.distributed import DataParallel
from ..core.loading import load_split
from ..core.protector import ProtectorConfig
from ..surrogates import build_surrogate, load_state_arrays, rebuild_surrogate, state_arrays


@dataclasses.dataclass
class MinMinConfig(ProtectorConfig):
    """Hyper-parameters of the min-min engine (names follow the papers: rho_u = epsilon).

    surrogate: built-in name ("smallcnn", "convnet", "resnet18", ...), Hub id or folder of a
        transformers image model, or a ``torch.nn.Module`` instance.
    resolution: working resolution of the noise (default: 32, or the transformers model's input size).
    train_steps / train_batch_size / lr / momentum / weight_decay / lr_decay_every / lr_decay: the
        surrogate's SGD during the bilevel fit.
    noise_steps (K), eot_draws (J), step_size (alpha_u): the noise phase during the fit.
    final_noise_steps / final_eot_draws: the noise phase run by ``map`` against the fitted surrogate.
    adv_radius (rho_a), adv_steps, adv_step_size: adversarial radius of REM/SEM (and of the model phase).
    stop_at_train_accuracy: stop the fit once the surrogate's running accuracy on noisy data exceeds it.
    max_fit_samples: fit on at most this many images (a seeded random subset) to bound memory and time.
    fit_shards: split each fit batch into this many batch-norm shards (a multiple of the number of
        processes of a data-parallel fit; the same value gives the same surrogate on any number of
        processes, see ``core.distributed``).
    """

    surrogate: Any = "smallcnn"
    resolution: int | None = None
    trust_remote_code: bool = False
    train_steps: int = 5000
    train_batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_every: int = 2000
    lr_decay: float = 0.1
    noise_steps: int = 10
    eot_draws: int = 5
    step_size: float = 1.6 / 255
    adv_radius: float = 4 / 255
    adv_steps: int = 10
    adv_step_size: float = 0.8 / 255
    final_noise_steps: int = 10
    final_eot_draws: int = 5
    stop_at_train_accuracy: float | None = None
    max_fit_samples: int | None = None
    fit_shards: int = 1


def to_fast_layout(model: nn.Module) -> nn.Module:
    """channels_last: 1.4-1.6x faster convolutions on CPU (measured in benchmarks/speed.py)."""
    return model.to(memory_format=torch.channels_last)


def pgd_ascent(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, step: float, steps: int, init: torch.Tensor
) -> torch.Tensor:
    """PGD that *maximises* the loss within an L-inf ball of ``radius``; returns the offset r (detached)."""
    r = init.clone()
    for _ in range(steps):
        r.requires_grad_(True)
        loss = F.cross_entropy(model((x + r).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, r)
        r = (r.detach() + step * g.sign()).clamp(-radius, radius)
    return r.detach()


class MinMinProtector(AdditiveProtector):
    """Shared engine; subclasses choose ``variant`` ("em", "rem" or "sem") and presets."""

    config_class = MinMinConfig
    needs_fit = True
    needs_labels = True
    variant = "sem"
    adversarial_training = True  # model phase on PGD examples (REM, SEM); EM trains on t(x + delta)

    def __init__(self, preset: str = "fast", **kwargs: Any) -> None:
        surrogate = kwargs.get("surrogate")
        self._surrogate_module = surrogate if isinstance(surrogate, nn.Module) else None
        if self._surrogate_module is not None:
            kwargs["surrogate"] = f"module:{type(surrogate).__module__}.{type(surrogate).__qualname__}"
        super().__init__(preset=preset, **kwargs)
        self.passes = 0  # forward+backward passes, in images (for the speed benchmark)

    # ------------------------------------------------------------------ state
    def working_resolution(self) -> int:
        if self.config.resolution:
            return int(self.config.resolution)
        if self._runtime.get("resolution"):
            return int(self._runtime["resolution"])
        desc = self._runtime.get("desc") or {}
        if desc.get("kind") == "transformers":
            return int(desc["size"][0])
        return 32

    def _model(self) -> nn.Module:
        model = self._runtime.get("model")
        if model is None:
            raise RuntimeError("surrogate not built")
        return model

    def _fitted_meta(self) -> dict[str, Any]:
        return {"surrogate": self._runtime["desc"], "resolution": self.working_resolution()}

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._runtime.get("arrays_cache") or {})
        if not arrays:
            arrays = state_arrays(self._model())
            self._runtime["arrays_cache"] = arrays
        return arrays

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        desc = meta["surrogate"]
        model = rebuild_surrogate(desc, self._surrogate_module)
        load_state_arrays(model, arrays)
        self._runtime.update(desc=desc, model=to_fast_layout(model.to(self.device)).eval(), arrays_cache=dict(arrays))
        self._runtime["resolution"] = meta.get("resolution")

    def _accept_runtime_kwargs(self, kwargs: dict[str, Any], state: dict[str, Any]) -> None:
        module = kwargs.pop("surrogate", None)
        self._surrogate_module = module if isinstance(module, nn.Module) else None
        self.passes = 0
        super()._accept_runtime_kwargs(kwargs, state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._surrogate_module = None
        self.passes = 0
        super().__setstate__(state)

    # ------------------------------------------------------------------ the noise phase
    def noise_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, rnd, draws: int
    ) -> torch.Tensor:
        """Gradient of the loss with respect to ``delta``, summed over J transformation draws (one batch)."""
        cfg = self.config
        rho_a = float(cfg.adv_radius)
        y_rep = y.repeat(draws)
        delta = delta.detach().requires_grad_(True)
        xt = random_crop_flip((x + delta).clamp(0, 1).repeat(draws, 1, 1, 1), rnd)
        if self.variant == "sem":
            u = (rnd.rand(draws, *x.shape[1:]).to(x.device) * 2 - 1) * rho_a
            xt = xt + u.transpose(0, 1).reshape_as(xt)
        elif self.variant == "rem":
            init = (rnd.rand(draws, *x.shape[1:]).to(x.device) * 2 - 1) * rho_a
            init = init.transpose(0, 1).reshape_as(xt)
            r = pgd_ascent(model, xt.detach(), y_rep, rho_a, float(cfg.adv_step_size), cfg.adv_steps, init)
            self.passes += cfg.adv_steps * xt.shape[0]
            xt = xt + r
        loss = F.cross_entropy(model(xt.clamp(0, 1)), y_rep, reduction="sum")
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
        """K signed-gradient steps that *minimise* the loss, averaged over J transformation draws."""
        eps, alpha = float(self.config.epsilon), float(self.config.step_size)
        for _ in range(steps):
            g = self.noise_gradient(model, x, y, delta, rnd, draws)
            delta = (delta.detach() - alpha * g.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x  # keep x + delta a valid image
            if grey is not None:
                delta = project_grey(delta, grey)
        return delta.detach()

    # ------------------------------------------------------------------ map
    def perturbation(self, x, labels, keys, grey) -> torch.Tensor:
        model = self._model().eval()
        dev = self.device
        x, y = x.to(dev), labels.to(dev)
        rnd = SampleRandom(keys)
        eps = float(self.config.epsilon)
        delta = (rnd.rand(*x.shape[1:]).to(dev) * 2 - 1) * eps
        delta = project_grey((x + delta).clamp(0, 1) - x, grey)
        cfg = self.config
        return self.noise_phase(model, x, y, delta, rnd, cfg.final_noise_steps, cfg.final_eot_draws, grey).cpu()

    # ------------------------------------------------------------------ fit
    def _load_training_tensors(self, dataset: datasets.Dataset, columns: Columns, progress: bool):
        n = len(dataset)
        limit = self.config.max_fit_samples
        indices = np.arange(n)
        if limit and n > limit:
            indices = np.sort(np.random.default_rng(self.config.seed).choice(n, size=limit, replace=False))
        split = load_split(dataset, columns.image, self.working_resolution(), columns.label, indices, progress)
        self._check_labels(split.labels.tolist(), indices.tolist())
        return split.images, split.grey, split.labels

    def _fit(self, dataset: datasets.Dataset, columns: Columns, progress: bool) -> None:
        cfg = self.config
        dp = DataParallel(self._accelerator, int(cfg.fit_shards))
        torch.manual_seed(cfg.seed)  # weight initialisation (the same on every process)
        spec = self._surrogate_module if self._surrogate_module is not None else cfg.surrogate
        model, desc = build_surrogate(spec, self.num_classes, trust_remote_code=cfg.trust_remote_code)
        self._runtime = {"desc": desc, "dp": dp}
        x_all, grey_all, y_all = self._load_training_tensors(dataset, columns, progress and dp.rank == 0)
        dev = self.device
        model = to_fast_layout(model.to(dev))
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        train_model, opt, model = dp.prepare(model, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.lr_decay_every), gamma=cfg.lr_decay)
        self._prepare_fit(x_all, y_all, gen)
        n = x_all.shape[0]
        bs = min(cfg.train_batch_size, n)
        bs -= bs % dp.shards  # equal shards
        rows = dp.local_rows(bs)
        order, pos = torch.randperm(n, generator=gen), 0
        acc_ema, started, first = None, time.time(), 0
        ckpt = None
        if self._checkpoint is not None:
            # not the number of processes: with the same fit_shards the state is the same on any number
            identity = {"config": self.public_config(), "rows": n, "num_classes": self.num_classes}
            ckpt = FitCheckpoint(self._checkpoint[0], self._checkpoint[1], identity, dp.rank)
            saved = ckpt.load()
            if saved is not None:  # go on from the last checkpoint: same state, same random numbers
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                gen.set_state(saved["generator"])
                torch.set_rng_state(saved["torch_rng"])
                order, pos, acc_ema, first = saved["order"], int(saved["pos"]), saved["acc_ema"], int(saved["step"])
                self.passes = int(saved["passes"])
                self._restore_fit_state(saved["method_state"])
        desc_bar = f"Fitting {self.method.upper()} surrogate"
        bar = tqdm(range(first, cfg.train_steps), desc=desc_bar, disable=not progress or dp.rank != 0,
                   initial=first, total=cfg.train_steps)  # fmt: skip
        step = first - 1
        for step in bar:
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + bs][rows]  # this process's rows of the global batch
            pos += bs
            x, y, grey = x_all[idx].to(dev), y_all[idx].to(dev), grey_all[idx]
            rnd = BatchRandom(gen, bs, rows)
            model.eval()
            delta = self._fit_noise(model, x, y, idx, rnd, grey)
            correct = self._model_phase(model, train_model, opt, x, y, delta, rnd)
            acc = float(dp.sum(torch.tensor(float(correct)))) / bs
            sched.step()
            acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
            if step % 10 == 0:
                bar.set_postfix(train_acc=f"{acc_ema:.3f}")
            if cfg.stop_at_train_accuracy is not None and step >= 20 and acc_ema >= cfg.stop_at_train_accuracy:
                break
            if ckpt is not None and ckpt.due(step + 1, cfg.train_steps):
                ckpt.save({
                    "step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "order": order, "pos": pos, "acc_ema": acc_ema, "passes": self.passes,
                    "method_state": self._fit_state(),
                })  # fmt: skip
        bar.close()
        self.fit_stats = {"steps": step + 1, "train_accuracy": acc_ema, "seconds": time.time() - started,
                          "processes": dp.world, "resumed_at_step": first}  # fmt: skip
        model.eval()
        self._runtime.update(model=model)
        self._runtime.pop("dp", None)
        self._finish_fit(model, x_all, y_all, grey_all, gen)
        if ckpt is not None:
            ckpt.remove()

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the processes of a data-parallel fit (itself on one process)."""
        dp = self._runtime.get("dp")
        return dp.sum(t) if dp is not None else t

    def _prepare_fit(self, x_all: torch.Tensor, y_all: torch.Tensor, gen: torch.Generator) -> None:
        """Hook for class-wise noise (allocated once for the whole fit)."""

    def _finish_fit(self, model, x_all, y_all, grey_all, gen) -> None:
        """Hook run after the bilevel loop."""

    def _fit_state(self) -> dict[str, torch.Tensor]:
        """Hook: the method's own loop state for a fit checkpoint (tensors)."""
        return {}

    def _restore_fit_state(self, state: dict[str, torch.Tensor]) -> None:
        """Hook: put back what ``_fit_state`` saved."""

    def _fit_noise(self, model, x, y, idx, rnd, grey) -> torch.Tensor:
        cfg = self.config
        eps = float(cfg.epsilon)
        delta = (rnd.rand(*x.shape[1:]).to(x.device) * 2 - 1) * eps
        delta = project_grey((x + delta).clamp(0, 1) - x, grey)
        return self.noise_phase(model, x, y, delta, rnd, cfg.noise_steps, cfg.eot_draws, grey)

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
            r = pgd_ascent(model, xt, y, rho_a, float(cfg.adv_step_size), cfg.adv_steps, init)
            self.passes += cfg.adv_steps * x.shape[0]
            xt = (xt + r).clamp(0, 1)
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
                logits = train_model(xt[rows])
                loss = F.cross_entropy(logits, y[rows]) * (dp.world / dp.shards)  # DDP averages over processes
                loss.backward()
            correct += int((logits.argmax(1) == y[rows]).sum())
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
        inner = cfg.adv_steps + 1 if self.variant == "rem" else 1
        noise = cfg.noise_steps * cfg.eot_draws * inner
        model_phase = (cfg.adv_steps if self.adversarial_training else 0) + 1
        return noise + model_phase

    def passes_per_mapped_image(self) -> int:
        cfg = self.config
        inner = cfg.adv_steps + 1 if self.variant == "rem" else 1
        return cfg.final_noise_steps * cfg.final_eot_draws * inner


__all__ = ["MinMinConfig", "MinMinProtector", "pgd_ascent"]
