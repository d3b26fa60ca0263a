"""MEM: multimodal error-minimizing noise for image-caption datasets (Liu et al., ACM MM 2024).

The min-min engine with a contrastive objective instead of class labels: a CLIP-style surrogate trains
on the noisy pairs (symmetric InfoNCE), while each image's noise minimises the InfoNCE of the image +
noise against its own captions, so that the noise alone tells the model which caption goes with the
image and the model learns nothing transferable from the pixels. Captions are never changed.

Where this differs from the published code, and why:

- the published loop alternates 200 CLIP steps with a noise pass over the whole set (20 rounds); here
  each fit step runs the noise phase on its batch then one CLIP step (the engine's loop, as EM here);
- several captions per image (Flickr, COCO: 5) are pulled together: the text side of a pair is the
  mean direction of the image's caption embeddings;
- the final pass run by ``map`` contrasts each image with a fixed bank of ``map_negatives`` training
  captions instead of the other rows of its map batch, so an image's noise does not depend on which
  rows it is mapped with (same seed, same bytes, on any batch size or number of processes).

The default surrogate (``"conv-clip"``) is a small CLIP trained from scratch during the fit (tiny conv
net image tower, 2-layer transformers text tower, word-level vocabulary built from the captions): it needs
no download. A pretrained transformers ``CLIPModel`` (Hub id or folder) is fine-tuned instead when named.

>>> import datasets, PIL.Image, numpy as np, uexamples as ue
>>> rng = np.random.default_rng(0)
>>> ds = datasets.Dataset.from_dict({
...     "image": [PIL.Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(8)],
...     "caption": [["a dog on grass", "a brown dog"], ["a man in snow"]] * 4}).cast_column("image", datasets.Image())
>>> protect = ue.MEMProtect(train_steps=2, final_noise_steps=1, train_batch_size=4).fit(ds, progress=False)
>>> out = ds.map(protect, batched=True)
>>> out[0]["caption"] == ds[0]["caption"], out[0]["image"].size
(True, (32, 24))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets
import numpy as np
import torch

from ..core.batch import ProtectBatch, caption_of
from ..core.columns import Columns
from ..core.loading import load_split
from ..core.options import check_int, option
from ..core.registry import register_method
from ..logging import get_logger
from ..surrogates.contrastive import ContrastiveSurrogate, contrastive_loss, encode_captions
from .minmin import MinMinConfig, MinMinProtector

logger = get_logger(__name__)


@dataclasses.dataclass
class MEMConfig(MinMinConfig):
    """MEM's surrogate is a CLIP; its targets are captions."""

    surrogate: Any = option("conv-clip", "contrastive surrogate: conv-clip (a small CLIP trained from scratch during the "
                            "fit, no download), a transformers CLIPModel Hub id or folder, or a PixelCLIP module")  # fmt: skip
    captions_per_image: int = option(5, "captions of an image used together (cycled when it has fewer, cut when more)")
    map_negatives: int = option(256, "training captions the final pass contrasts each image with (fixed at fit time)")


PAPER = dict(  # the published setting: 8/255, step 1/255, 8 sign steps, no augmentation in the noise steps
    train_steps=4000, train_batch_size=128, lr=1e-4, weight_decay=0.1, lr_decay_every=100_000,
    noise_steps=8, eot_draws=1, step_size=1 / 255, final_noise_steps=8, final_eot_draws=1,
)
# CPU-sized: the fit length follows the data (30 epochs, 20 to 300 steps); Adam-free SGD on the small CLIP
# with the engine's optimiser; crop/flip draws in the noise steps so that the victim's augmentation keeps it.
FAST = dict(
    train_steps=250, train_epochs=20, min_train_steps=20, train_batch_size=64, lr=1e-3, weight_decay=0.1,
    lr_decay_every=100_000, noise_steps=5, eot_draws=2, step_size=2 / 255, final_noise_steps=20, final_eot_draws=2,
)


@register_method
class MEMProtect(MinMinProtector):
    """Multimodal error-minimizing noise: image-caption pairs that a CLIP-style model cannot learn from."""

    method = "mem"
    title = "MEM (multimodal error-minimizing noise)"
    summary = ("A CLIP-style surrogate is trained on the image-caption pairs while each image's noise minimises its "
               "contrastive loss against its own captions (Liu et al., ACM MM 2024).")  # fmt: skip
    paper = "Liu et al., *Multimodal Unlearnable Examples: Protecting Data against Multimodal Contrastive Learning*, ACM MM 2024"
    citation = (
        "@inproceedings{liu2024multimodal,\n  title={Multimodal Unlearnable Examples: Protecting Data against Multimodal "
        "Contrastive Learning},\n  author={Liu, Xinwei and Jia, Xiaojun and Xun, Yuan and Liang, Siyuan and Cao, Xiaochun},\n"
        "  booktitle={ACM Multimedia},\n  year={2024}\n}"
    )
    config_class = MEMConfig
    needs_labels = False
    needs_texts = True
    adversarial_training = False
    surrogate_class = ContrastiveSurrogate
    PRESETS = {"paper": PAPER, "fast": FAST}

    def validate_config(self) -> None:
        super().validate_config()
        check_int(self.config, "captions_per_image")
        check_int(self.config, "map_negatives")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._map_bank: torch.Tensor | None = None  # text embeddings of the negatives bank, once per loaded model

    # ------------------------------------------------------------------ surrogate and targets
    def _build_surrogate(self, spec: Any, dataset: datasets.Dataset, columns: Columns) -> ContrastiveSurrogate:
        captions = dataset[columns.text]
        return ContrastiveSurrogate.build(spec, captions, trust_remote_code=self.config.trust_remote_code)

    def _tokens(self, captions: list[Any]) -> torch.Tensor:
        return encode_captions(self._runtime["surrogate"].tokenizer, captions, int(self.config.captions_per_image))

    def _load_training_tensors(self, dataset: datasets.Dataset, columns: Columns, progress: bool):
        n = len(dataset)
        limit = self.config.max_fit_samples
        indices = np.arange(n)
        if limit and n > limit:
            indices = np.sort(np.random.default_rng(self.config.seed).choice(n, size=limit, replace=False))
        self._choose_resolution(dataset, columns.image, indices)
        split = load_split(dataset, columns.image, self.working_resolution(), None, indices, progress)
        texts = dataset.select(indices.tolist())[columns.text]
        tokens = self._tokens([caption_of(t, int(r)) for t, r in zip(texts, indices)])
        # the bank of negatives for the final pass: a seeded sample of training captions, kept with the protector
        pick = np.random.default_rng(self.config.seed).permutation(n)[: int(self.config.map_negatives)]
        self._runtime["bank_tokens"] = tokens[np.sort(pick)]
        return split.images, split.grey, tokens

    def targets_for(self, batch: ProtectBatch) -> torch.Tensor:
        return self._tokens(batch.texts)

    # ------------------------------------------------------------------ objective
    def objective(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Symmetric InfoNCE of images (embeddings ``outputs``) and their captions (token ids ``targets``,
        (B, C, L)); rows with identical captions (the augmented copies of one image) are not negatives.
        In the final pass (``map``): image-to-text InfoNCE against the own captions and the fixed bank."""
        model = self._model()
        flat = targets.flatten(1)
        if self._runtime.get("against_bank"):  # each row alone: its own captions against the bank, no batch-mates
            bank_tokens, bank = self._bank()
            own = (outputs * self._text(targets)).sum(-1, keepdim=True)
            others = (outputs @ bank.t()).masked_fill((flat.unsqueeze(1) == bank_tokens.flatten(1).unsqueeze(0)).all(-1), float("-inf"))
            logits = model.scale * torch.cat([own, others], 1)
            return torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                                                     reduction=reduction)  # fmt: skip
        same = (flat.unsqueeze(1) == flat.unsqueeze(0)).all(-1)
        return contrastive_loss(outputs, self._text(targets), model.scale, same, reduction)

    def _text(self, targets: torch.Tensor) -> torch.Tensor:
        """Caption embeddings; during noise steps (text tower frozen) from the cache that ``noise_phase``
        fills once per batch: re-encoding 5 captions per image at every step cost 3/4 of the fit."""
        cached = self._runtime.get("text_cache")
        if cached is not None:
            ids, emb = cached
            copies = len(targets) // len(ids)
            if copies * len(ids) == len(targets) and torch.equal(targets, ids.repeat(copies, *([1] * (ids.dim() - 1)))):
                return emb.repeat(copies, 1)
        return self._model().encode_text(targets)

    def noise_phase(self, model, x, y, delta, rnd, steps, draws, grey=None) -> torch.Tensor:
        with torch.no_grad():
            self._runtime["text_cache"] = (y, self._model().encode_text(y).detach())
        try:
            return super().noise_phase(model, x, y, delta, rnd, steps, draws, grey)
        finally:
            self._runtime["text_cache"] = None

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._runtime["bank_tokens"].to(self.device)
        if self._map_bank is None:
            with torch.no_grad():
                self._map_bank = self._model().encode_text(tokens).detach()
        return tokens, self._map_bank

    # ------------------------------------------------------------------ the fit: persistent noise, AdamW
    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW, as CLIP (and MEM's CleanCLIP base) is trained: SGD barely moves a from-scratch text transformer."""
        cfg = self.config
        return torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))

    def _prepare_fit(self, x_all: torch.Tensor, y_all: torch.Tensor, gen: torch.Generator) -> None:
        """One noise per training image, kept across the fit (as the published loop keeps ``noise[index]``):
        a fresh start at every step gives the surrogate no stable pattern to bind each caption to."""
        eps = float(self.config.epsilon)
        self._runtime["fit_noise"] = (torch.rand(x_all.shape, generator=gen) * 2 - 1) * eps

    def _fit_state(self) -> dict[str, torch.Tensor]:
        return {"fit_noise": self._runtime["fit_noise"]}

    def _restore_fit_state(self, state: dict[str, torch.Tensor]) -> None:
        self._runtime["fit_noise"] = state["fit_noise"]

    def _fit_noise(self, model, x, y, idx, rnd, grey) -> torch.Tensor:
        cfg = self.config
        store = self._runtime["fit_noise"]
        delta = self.project(store[idx].to(x.device), x, grey)
        delta = self.noise_phase(model, x, y, delta, rnd, cfg.noise_steps, cfg.eot_draws, grey)
        store[idx] = delta.cpu()
        return delta

    def _finish_fit(self, model, x_all, y_all, grey_all, gen) -> None:
        self._runtime.pop("fit_noise", None)  # the map recomputes each image's noise against the final surrogate

    def batch_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> int:
        """In-batch image-to-caption top-1 (the surrogate's running accuracy on the noisy pairs)."""
        with torch.no_grad():
            sim = outputs @ self._model().encode_text(targets).t()
        return int((sim.argmax(1) == torch.arange(len(sim), device=sim.device)).sum())

    def perturbation(self, x: torch.Tensor, batch: ProtectBatch, grey: torch.Tensor) -> torch.Tensor:
        self._runtime["against_bank"] = True
        try:
            return super().perturbation(x, batch, grey)
        finally:
            self._runtime["against_bank"] = False

    # ------------------------------------------------------------------ saving
    def _fit(self, dataset, columns, progress) -> None:
        if self._accelerator is not None and int(self._accelerator.num_processes) > 1:
            # the text tower trains outside the data-parallel image forward, so DDP would not sync it: every
            # process fits the same surrogate alone instead (same seed and data), then maps its own shard
            logger.warning("MEM fits on each of the %d processes alone (no data-parallel fit yet); the map is shared",
                           int(self._accelerator.num_processes))  # fmt: skip
            self._accelerator = None
        super()._fit(dataset, columns, progress)
        self._map_bank = None

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = super()._fitted_arrays()
        return {**arrays, "mem.bank_tokens": self._runtime["bank_tokens"].numpy()}

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        bank = torch.from_numpy(np.array(arrays.pop("mem.bank_tokens")))
        super()._load_fitted(meta, arrays)
        self._runtime["bank_tokens"] = bank
        self._map_bank = None


__all__ = ["MEMConfig", "MEMProtect"]
