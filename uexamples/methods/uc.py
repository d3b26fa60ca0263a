"""UC: Unlearnable Clusters (Zhang et al., CVPR 2023): label-agnostic protection.

No label is read anywhere. Fit:

1. features of every training image from a frozen encoder (CLIP image embedding, ViT pooled output,
   a CIFAR ResNet's pooled features, any ``nn.Module``; ``surrogates.load_encoder``);
2. K-means with K clusters on those features (scikit-learn);
3. one perturbation ``delta_k`` per cluster (``|delta_k| <= epsilon``), trained so that the encoder's
   features of ``x + delta_k`` move towards the centre of *another* cluster::

       min KL( softmax(c[(k + 1) mod K]) || softmax(h(x + delta_k)) )

   either produced by a ResNet generator from a fixed random input (``optimiser="generator"``: the
   paper's prior, Adam 1e-4, cosine to 1e-6) or optimised directly (``optimiser="direct"``).

Map: encode the image, take the nearest centre, add that cluster's perturbation (brought to the
image's size and mode). A victim whose labels follow the clusters learns ``delta_k -> label``
instead of the images; so protection holds for any labelling the clusters are pure for (cluster
purity is measured in ``benchmarks/label_agnostic.py``).

As published, every generator trains on *all* images (``train_on="all"``; the data loader's
cluster id is ignored) and the clustering script does not run (NameError). ``preset="paper"`` keeps
the training on all images; ``preset="fast"`` trains each perturbation on its own cluster, which
is what the method describes and what a CPU can afford (measured in benchmarks/README.md).

>>> import uexamples as ue
>>> ds = ue.load_sample_dataset().remove_columns("label")          # no labels needed
>>> uc = ue.UCProtect(seed=0, clusters=4, min_min_steps=5).fit(ds, progress=False)
>>> protected = ds.map(uc, batched=True)
>>> sorted(set(uc.clusters_of(ds).tolist()))
[0, 1, 2, 3]
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.additive import AdditiveConfig, AdditiveProtector, project_grey
from ..core.batch import ProtectBatch
from ..core.columns import Columns
from ..core.distributed import DataParallel
from ..core.loading import load_split
from ..core.options import check_int, check_non_negative, option
from ..core.progress import progress_bar
from ..core.registry import register_method
from ..surrogates.layer import DEFAULT_ENCODER, FeatureEncoder, load_encoder, rebuild_encoder

OPTIMISERS = ("generator", "direct", "min-min")
TRAIN_ON = ("cluster", "all")


@dataclasses.dataclass
class UCConfig(AdditiveConfig):
    """Hyper-parameters of Unlearnable Clusters (K, the encoder, how each cluster's perturbation is trained)."""

    encoder: Any = option(DEFAULT_ENCODER, "frozen feature encoder: transformers Hub id or folder (CLIP, ViT, ResNet), "
                          "a CIFAR ResNet .safetensors file, a torch.nn.Module, or the built-in offline default")  # fmt: skip
    trust_remote_code: bool = option(False, "allow a Hub encoder's own modelling code to run")
    clusters: int = option(10, "K-means clusters (K)")
    optimiser: str = option("generator", "how a cluster's perturbation is trained: a ResNet generator from a fixed "
                            "random input (the paper), directly, or as class-wise error-minimising noise with the "
                            "clusters as pseudo-labels (min-min)", choices=OPTIMISERS)  # fmt: skip
    min_min_steps: int = option(150, "surrogate steps of the min-min optimiser (EM's engine, class-wise, fast preset)")
    train_on: str = option("cluster", "images each perturbation trains on: its own cluster, or all images (the "
                           "published code)", choices=TRAIN_ON)  # fmt: skip
    epochs: int = option(50, "passes over the training images of each perturbation")
    train_batch_size: int = option(256, "images per optimisation step")
    lr: float = option(1e-4, "Adam learning rate (cosine-annealed to 1e-6)")
    weight_decay: float = option(5e-4, "Adam weight decay")
    generator_width: int = option(64, "base channels of the perturbation generator")
    kmeans_restarts: int = option(3, "K-means restarts (scikit-learn n_init); the best inertia is kept")
    normalize_features: bool = option(False, "cluster L2-normalised features (spherical K-means: clusters by direction, "
                                      "as CLIP-style features are compared); the objective keeps the raw features")  # fmt: skip


PAPER = dict(encoder="openai/clip-vit-base-patch32", clusters=10, epsilon=16 / 255, optimiser="generator",
             train_on="all", epochs=50, train_batch_size=256, lr=1e-4, weight_decay=5e-4,
             normalize_features=False)  # fmt: skip
# CPU-sized, chosen on cifar10-10k (victim convnet 8 epochs, own labels; benchmarks/README.md): with the
# shipped encoder, clusters of L2-normalised features (purity 0.73 -> 0.81) and class-wise min-min noise
# on the clusters gave 38.7 %, against 44.5 % for the paper's KL objective optimised directly on the same
# clusters and 51.7 % with raw-feature clusters. direct/generator keep epochs/lr for their own runs.
FAST = dict(encoder=DEFAULT_ENCODER, clusters=10, epsilon=8 / 255, optimiser="min-min", normalize_features=True,
            train_on="cluster", epochs=4, train_batch_size=128, lr=4e-3, weight_decay=0.0)  # fmt: skip


# ---------------------------------------------------------------------------------------- generator
class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PerturbationGenerator(nn.Module):
    """The paper's ResNet generator: 7x7 conv, two stride-2 convs, 6 residual blocks (reflect padding),
    two transposed convs, 7x7 conv, tanh; BatchNorm and ReLU throughout (3 -> 3 channels)."""

    def __init__(self, width: int = 64, blocks: int = 6) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(w * mult, w * mult * 2, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(w * mult * 2), nn.ReLU(True)]  # fmt: skip
        layers += [_ResidualBlock(w * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(w * mult, w * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                       nn.BatchNorm2d(w * mult // 2), nn.ReLU(True)]  # fmt: skip
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def cluster_seed(seed: int, cluster: int) -> int:
    """An independent seed per cluster: a cluster's perturbation does not depend on which process trains it."""
    # the shift on a Python int: numpy 1.x cannot shift a uint64 by a Python int (it casts both to float64)
    return int(np.random.SeedSequence([seed, cluster]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]) >> 1


def kmeans(features: np.ndarray, k: int, seed: int, restarts: int) -> np.ndarray:
    """K-means centres (k, D), float32. Full K-means up to 50,000 points, mini-batch K-means beyond."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(features) <= 50_000:
        km = KMeans(n_clusters=k, n_init=restarts, random_state=seed % 2**32)
    else:
        km = MiniBatchKMeans(n_clusters=k, n_init=restarts, random_state=seed % 2**32, batch_size=4096)
    km.fit(features.astype(np.float64))
    return km.cluster_centers_.astype(np.float32)


def nearest(features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of each feature row (squared Euclidean distance, as K-means uses)."""
    d = (features * features).sum(1, keepdim=True) - 2 * features @ centers.T + (centers * centers).sum(1)[None]
    return d.argmin(1)


# ---------------------------------------------------------------------------------------- the method
@register_method
class UCProtect(AdditiveProtector):
    """Unlearnable Clusters: one perturbation per K-means cluster of encoder features; no labels."""

    method = "uc"
    title = "UC (Unlearnable Clusters)"
    summary = ("Images are clustered in a pretrained encoder's feature space and each cluster gets one perturbation "
               "that pushes its features towards another cluster; no labels are needed (Zhang et al., CVPR 2023).")  # fmt: skip
    paper = "Zhang et al., *Unlearnable Clusters: Towards Label-agnostic Unlearnable Examples*, CVPR 2023"
    citation = (
        "@inproceedings{zhang2023unlearnable,\n  title={Unlearnable Clusters: Towards Label-agnostic Unlearnable "
        "Examples},\n  author={Zhang, Jiaming and Ma, Xingjun and Yi, Qi and Sang, Jitao and Jiang, Yu-Gang and "
        "Wang, Yaowei and Xu, Changsheng},\n  booktitle={CVPR},\n  year={2023}\n}"
    )
    config_class = UCConfig
    needs_fit = True
    needs_labels = False
    PRESETS = {"paper": PAPER, "fast": FAST}

    @classmethod
    def card_notes(cls, config: dict[str, Any]) -> list[str]:
        from pathlib import Path

        enc = str(config.get("encoder", DEFAULT_ENCODER))
        if enc != DEFAULT_ENCODER and Path(enc).exists():
            enc = Path(enc).name  # a local path means nothing on the Hub and may be private
        return [
            "Label-agnostic: no label column was read. The noise follows "
            f"{config.get('clusters')} clusters of the images' features, so it works against a model trained on any "
            "labelling that these clusters separate (the dataset's own labels, coarser or finer ones); it cannot "
            "protect against a labelling that cuts across the clusters.",
            f"Encoder used for the clusters: `{enc}`"
            + (" (shipped with uexamples: a CIFAR ResNet-20 trained on the CIFAR-10 train set)." if enc == DEFAULT_ENCODER else "."),
        ]

    MODULE_FIELD = "encoder"

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.config
        for name in ("clusters", "epochs", "train_batch_size", "generator_width", "kmeans_restarts", "min_min_steps"):
            check_int(cfg, name)
        if cfg.clusters < 2:
            raise ValueError(f"clusters must be >= 2 (each cluster is pushed towards another), got {cfg.clusters}")
        if not float(cfg.lr) > 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
        check_non_negative(cfg, "weight_decay")
        if cfg.resolution == "native":
            raise ValueError("UC adds one perturbation per cluster on a common grid: set resolution=N, not 'native'")
        if not isinstance(cfg.encoder, str) or not cfg.encoder:
            raise TypeError(f"encoder must be a Hub id, a folder, a weights file or a torch.nn.Module, got {cfg.encoder!r}")

    # ------------------------------------------------------------------ encoder
    def encoder(self) -> FeatureEncoder:
        """The frozen encoder (loaded once per process, from its description after a load or an unpickling)."""
        enc = self._runtime.get("encoder")
        if enc is None:
            desc = self._runtime.get("encoder_desc")
            if desc is not None:
                enc = rebuild_encoder(desc, self._module)
            elif self.config.encoder == "module":
                if self._module is None:
                    raise ValueError("this protector uses a custom encoder module: pass it again (encoder=...)")
                enc = load_encoder(self._module)
            else:
                enc = load_encoder(self.config.encoder, trust_remote_code=self.config.trust_remote_code)
            enc = enc.to(self.device)
            self._runtime["encoder"] = enc
        return enc

    def working_resolution(self) -> int | None:
        """The grid of the perturbations: ``resolution``, else the fitted one, else the encoder's input size."""
        if self.config.resolution:
            return int(self.config.resolution)
        if self._runtime.get("resolution"):
            return int(self._runtime["resolution"])
        return self.encoder().input_size or self.default_resolution

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features of working images, in chunks of ``batch_size``."""
        enc, bs = self.encoder(), int(self.config.batch_size)
        with torch.no_grad():
            return torch.cat([enc(x[i : i + bs].to(self.device)).float().cpu() for i in range(0, len(x), bs)])

    # ------------------------------------------------------------------ fit
    def _fit(self, dataset: datasets.Dataset, columns: Columns, progress: bool) -> None:
        cfg = self.config
        world = int(self._accelerator.num_processes) if self._accelerator is not None else 1
        dp = DataParallel(self._accelerator, shards=world)  # rows split by process; no batch-norm shards here
        show = progress and dp.rank == 0
        started = time.time()
        enc = self.encoder()
        res = self.working_resolution()
        split = load_split(dataset, columns.image, res, progress=show, desc="Loading images")
        x, grey = split.images, split.grey
        # each process encodes its share of the rows; every process then holds all features
        features = self._gather_rows(dp, self._encode_rows(x, dp, show))
        t_features = time.time() - started
        if len(features) < cfg.clusters:  # every process holds all features: all of them stop here
            raise ValueError(f"{len(features)} images cannot form {cfg.clusters} clusters: lower clusters=")
        centers = torch.zeros(cfg.clusters, features.shape[1])
        space = self._cluster_space(features)
        if dp.rank == 0:  # K-means on the main process only, then broadcast
            centers = torch.from_numpy(kmeans(space.numpy(), cfg.clusters, cfg.seed, cfg.kmeans_restarts))
        if dp.distributed:
            centers = centers.to(self.device)
            torch.distributed.broadcast(centers, src=0)
            centers = centers.cpu()
        assign = nearest(space, centers)
        t_kmeans = time.time() - started - t_features
        sizes = torch.bincount(assign, minlength=cfg.clusters)
        if int(sizes.min()) == 0:
            raise ValueError(f"K-means left a cluster empty ({sizes.tolist()}): lower clusters=")
        self._runtime.update(centers=centers, resolution=res)
        if cfg.optimiser == "min-min":
            deltas, losses = self._min_min_perturbations(dataset, columns, assign, res, progress), None
        else:
            # the objective's targets: each cluster's mean in the encoder's own feature space (the K-means
            # centres themselves unless the clustering ran on normalised features)
            means = torch.stack([features[assign == k].mean(0) for k in range(cfg.clusters)])
            deltas, losses = self._cluster_perturbations(enc, x, grey, assign, means, dp, show)
        self._runtime["deltas"] = deltas
        self.fit_stats = {
            "images": len(x), "cluster_sizes": sizes.tolist(), "seconds": round(time.time() - started, 2),
            "feature_seconds": round(t_features, 2), "kmeans_seconds": round(t_kmeans, 2), "processes": dp.world,
        }  # fmt: skip
        if losses is not None:
            self.fit_stats["final_kl"] = [round(float(v), 5) for v in losses]

    def _cluster_perturbations(self, enc: FeatureEncoder, x: torch.Tensor, grey: torch.Tensor, assign: torch.Tensor,
                               targets: torch.Tensor, dp: DataParallel, show: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The paper's per-cluster perturbations (cluster k's features pulled towards ``targets[(k + 1) % K]``);
        cluster k is trained by process k % world, then summed over processes."""
        cfg, res = self.config, x.shape[-1]
        deltas = torch.zeros(cfg.clusters, 3, res, res)
        losses = torch.zeros(cfg.clusters)
        mine = [k for k in range(cfg.clusters) if k % dp.world == dp.rank]
        bar = progress_bar(total=len(mine), desc="Training cluster perturbations", unit="cluster", progress=show)
        for k in mine:
            pool = torch.arange(len(x)) if cfg.train_on == "all" else (assign == k).nonzero().flatten()
            all_grey = bool(grey[pool].all())
            deltas[k], losses[k] = self._train_perturbation(enc, x, pool, targets[(k + 1) % cfg.clusters], k, all_grey)
            bar.update(1)
            bar.set_postfix(kl=f"{float(losses[k]):.4f}")
        bar.close()
        return dp.sum(deltas.to(self.device)).cpu(), dp.sum(losses.to(self.device)).cpu()

    def _min_min_perturbations(self, dataset: datasets.Dataset, columns: Columns, assign: torch.Tensor, res: int,
                               progress: bool) -> torch.Tensor:  # fmt: skip
        """Class-wise error-minimising noise (EM's engine) with the clusters as the label source."""
        from .em import EMProtect

        cfg = self.config
        world = int(self._accelerator.num_processes) if self._accelerator is not None else 1
        pseudo = dataset.select_columns([columns.image]).add_column("uc_cluster", assign.tolist())
        pseudo = pseudo.cast_column("uc_cluster", datasets.ClassLabel(num_classes=cfg.clusters))
        em = EMProtect(preset="fast", noise_type="class-wise", epsilon=cfg.epsilon, seed=cfg.seed, resolution=res,
                       label_column="uc_cluster", device=cfg.device, train_steps=cfg.min_min_steps,
                       fit_shards=max(2, world))  # fmt: skip  (2 shards: the same noise on 1 or 2 processes)
        em.fit(pseudo, progress=progress, accelerator=self._accelerator)
        return em._runtime["class_noise"].detach().float().cpu()

    def _encode_rows(self, x: torch.Tensor, dp: DataParallel, show: bool) -> torch.Tensor:
        per = math.ceil(len(x) / dp.world)
        mine = x[dp.rank * per : (dp.rank + 1) * per]
        bs, enc, out = int(self.config.batch_size), self.encoder(), []
        with torch.no_grad():
            for i in progress_bar(range(0, len(mine), bs), desc="Encoding images", unit="batch", progress=show):
                out.append(enc(mine[i : i + bs].to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def _gather_rows(self, dp: DataParallel, part: torch.Tensor) -> torch.Tensor:
        if not dp.distributed:
            return part
        from accelerate.utils import gather_object

        return torch.cat([p for p in gather_object([part]) if len(p)])

    def _train_perturbation(self, enc: FeatureEncoder, x: torch.Tensor, pool: torch.Tensor, target: torch.Tensor,
                            k: int, grey: bool) -> tuple[torch.Tensor, float]:  # fmt: skip
        """Cluster ``k``'s perturbation: features of ``x[pool] + delta`` pulled towards ``target``'s."""
        cfg = self.config
        dev, eps = self.device, float(cfg.epsilon)
        gen = torch.Generator().manual_seed(cluster_seed(cfg.seed, k))
        shape = (1, *x.shape[1:])
        if cfg.optimiser == "generator":
            torch.manual_seed(cluster_seed(cfg.seed, k))  # the generator's initial weights
            net = PerturbationGenerator(int(cfg.generator_width)).to(dev)
            z = torch.rand(shape, generator=gen).to(dev)  # the paper's fixed uniform input
            params = list(net.parameters())
        else:
            net, z = None, None
            start = (torch.rand(shape, generator=gen) * 2 - 1) * eps
            params = [start.to(dev).requires_grad_(True)]

        def current() -> torch.Tensor:
            d = net(z) if net is not None else params[0]
            d = d.clamp(-eps, eps)
            return d.mean(1, keepdim=True).expand_as(d) if grey else d

        steps_per_epoch = max(1, math.ceil(len(pool) / int(cfg.train_batch_size)))
        total = int(cfg.epochs) * steps_per_epoch
        opt = torch.optim.Adam(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=min(1e-6, float(cfg.lr)))
        goal = F.softmax(target.to(dev), 0)
        loss_ema = None
        for _ in range(int(cfg.epochs)):
            order = pool[torch.randperm(len(pool), generator=gen)]
            for i in range(steps_per_epoch):
                idx = order[i * cfg.train_batch_size : (i + 1) * cfg.train_batch_size]
                if net is not None:
                    net.train()
                feats = enc((x[idx].to(dev) + current()).clamp(0, 1))
                loss = F.kl_div(F.log_softmax(feats, 1), goal.expand_as(feats), reduction="batchmean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if net is None:
                    with torch.no_grad():
                        params[0].clamp_(-eps, eps)
                value = loss.item()
                loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        if net is not None:
            net.eval()
        with torch.no_grad():
            return current()[0].detach().cpu(), float(loss_ema)

    # ------------------------------------------------------------------ map
    def _cluster_space(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) if self.config.normalize_features else features

    def clusters_of_images(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster index of each working image (B, 3, R, R)."""
        return nearest(self._cluster_space(self.encode(x)), self._runtime["centers"])

    def clusters_of(self, dataset: datasets.Dataset, image_column: str | None = None, progress: bool = False) -> np.ndarray:
        """The cluster each image of ``dataset`` falls in (what :meth:`__call__` uses to pick its perturbation)."""
        self.require_fitted("it assigns clusters")
        from ..core.columns import detect_columns

        col = detect_columns(dataset.features, image_column, None, need_label=False, method="UC").image
        split = load_split(dataset, col, self.working_resolution(), progress=progress, desc="Assigning clusters")
        return self.clusters_of_images(split.images).numpy()

    def perturbation(self, x: torch.Tensor, batch: ProtectBatch, grey: torch.Tensor) -> torch.Tensor:
        deltas = self._runtime["deltas"]
        return project_grey(deltas[self.clusters_of_images(x)], grey)

    # ------------------------------------------------------------------ state
    def _fitted_meta(self) -> dict[str, Any]:
        return {"encoder": self.encoder().desc, "resolution": int(self._runtime["resolution"])}

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        return {"centers": self._runtime["centers"].numpy(), "perturbations": self._runtime["deltas"].numpy()}

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        centers, deltas = np.asarray(arrays["centers"]), np.asarray(arrays["perturbations"])
        if centers.shape[0] != self.config.clusters or deltas.shape[0] != self.config.clusters:
            raise ValueError(f"saved UC state has {centers.shape[0]} centres and {deltas.shape[0]} perturbations "
                             f"for clusters={self.config.clusters}: the protector is damaged")  # fmt: skip
        if float(np.abs(deltas).max(initial=0)) > float(self.config.epsilon) + 1e-6:
            raise ValueError("saved UC perturbations exceed epsilon: the protector is damaged")
        self._runtime.update(
            centers=torch.from_numpy(np.array(centers, dtype=np.float32)),
            deltas=torch.from_numpy(np.array(deltas, dtype=np.float32)),
            resolution=int(meta["resolution"]), encoder_desc=meta["encoder"],
        )  # fmt: skip


__all__ = ["PerturbationGenerator", "UCConfig", "UCProtect", "kmeans", "nearest"]
