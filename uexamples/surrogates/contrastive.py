"""Contrastive (CLIP-style) models in pixel space, and a tokenizer that needs no download.

A :class:`PixelCLIP` takes RGB pixels in [0, 1] at any size (resizing and normalisation happen inside,
in torch, so gradients reach the pixels) and token ids, and gives L2-normalised embeddings of both in
one space, with a learnable temperature. Two kinds:

- ``TransformersCLIP``: a transformers ``CLIPModel`` (Hub id, folder, or a fresh one from a
  ``CLIPConfig``: the retrieval victim), with that model's own tokenizer;
- ``ConvCLIP``: a small from-scratch CLIP for CPUs: the built-in conv net as image tower, a transformers
  ``CLIPTextModel`` as text tower, over a word-level vocabulary built from the captions themselves
  (:func:`caption_tokenizer`), so that a fresh machine with no network can train one.

>>> tok = caption_tokenizer(["A dog runs .", ["a cat", "A dog sleeps"]])
>>> tok.convert_ids_to_tokens(tok("a dog flies")["input_ids"])
['[BOS]', 'a', 'dog', '[UNK]', '[EOS]']
>>> clip = ConvCLIP(tok, embed_dim=32)
>>> ids = encode_captions(tok, [["a dog runs"], ["a cat"]], captions_per_image=2)
>>> ids.shape[:2], clip(torch.rand(2, 3, 32, 32)).shape, clip.encode_text(ids).shape
(torch.Size([2, 2]), torch.Size([2, 32]), torch.Size([2, 32]))
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .builtin import BUILTIN


PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONV_TOWERS = ("tinycnn", "smallcnn", "convnet")
MAX_TOKENS = 32  # Flickr/COCO captions: 95 % have fewer than 25 words


def _flat_captions(captions: Iterable[Any]) -> Iterable[str]:
    for c in captions:
        if isinstance(c, str):
            yield c
        else:
            yield from c


def caption_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks: the pre-tokenisation of :func:`caption_tokenizer`."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


_CONSONANTS, _VOWELS = "bdfgjklmnprstvz", "aeiou"


def pseudo_words(n: int, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct pronounceable non-words of three consonant-vowel syllables (``"kotemu"``), none in
    ``exclude``: the same list for the same arguments on every machine (a fixed draw, not the fit's seed).

    >>> pseudo_words(3) == pseudo_words(3), len(set(pseudo_words(500))), all(len(w) == 6 for w in pseudo_words(5))
    (True, 500, True)
    """
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    base = len(syllables)
    taken = set(exclude)
    out: list[str] = []
    for code in np.random.default_rng(20240808).permutation(base**3):  # a fixed order of all 421,875 words
        if len(out) == n:
            break
        first, rest = divmod(int(code), base**2)
        word = syllables[first] + syllables[rest // base] + syllables[rest % base]
        if word not in taken:
            out.append(word)
    if len(out) < n:
        raise ValueError(f"only {len(out)} pseudo-words are free, {n} asked")
    return out


def caption_tokenizer(captions: Iterable[Any] | None = None, vocabulary: Sequence[str] | None = None,
                      min_count: int = 1, max_words: int = 20_000, max_length: int = MAX_TOKENS,
                      extra_words: int = 0):  # fmt: skip
    """A word-level ``PreTrainedTokenizerFast`` from the captions (or a saved ``vocabulary``): no download.

    Words seen at least ``min_count`` times (the ``max_words`` most frequent) get an id; others map to
    ``[UNK]``. Every text becomes ``[BOS] words [EOS]``, at most ``max_length`` tokens. ``extra_words``
    pseudo-words that no caption uses (:func:`pseudo_words`) follow the caption words: MEM's trigger words
    may be any token of the vocabulary, and a real CLIP's has thousands that captions never use.

    >>> tok = caption_tokenizer(["a dog runs"], extra_words=2)
    >>> tok.vocabulary[4:] == ["a", "dog", "runs"] + pseudo_words(2, ["a", "dog", "runs"])
    True
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if vocabulary is None:
        if captions is None:
            raise ValueError("caption_tokenizer needs captions or a vocabulary")
        counts = Counter(w for text in _flat_captions(captions) for w in caption_words(text))
        words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count][:max_words]
        vocabulary = [PAD, UNK, BOS, EOS] + words + pseudo_words(extra_words, counts)  # none a caption word, kept or not
    vocab = {w: i for i, w in enumerate(vocabulary)}
    if [vocab.get(t) for t in (PAD, UNK, BOS, EOS)] != [0, 1, 2, 3]:
        raise ValueError("a caption vocabulary starts with [PAD], [UNK], [BOS], [EOS]")
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 2), (EOS, 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                  model_max_length=max_length)  # fmt: skip
    tok.vocabulary = list(vocabulary)  # what a saved protector keeps to rebuild it offline
    return tok


def encode_captions(tokenizer, captions: Sequence[Any], captions_per_image: int, max_length: int = MAX_TOKENS) -> torch.Tensor:
    """(B, C, L) token ids: each row's captions (a string or a list), cycled or cut to C per image."""
    texts: list[str] = []
    for c in captions:
        options = [c] if isinstance(c, str) else list(c)
        texts.extend(options[k % len(options)] for k in range(captions_per_image))
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    return ids.view(len(captions), captions_per_image, -1)


def with_triggers(ids: torch.Tensor, triggers: torch.Tensor, eos_token_id: int, pad_token_id: int = 0) -> torch.Tensor:
    """Token ids (B, C, L) with each row's trigger tokens (B, T) put right after the first token (BOS) of
    every caption, the caption shifted right; a caption cut by the shift keeps its end token.

    >>> with_triggers(torch.tensor([[[2, 7, 8, 3, 0, 0]]]), torch.tensor([[5, 6]]), eos_token_id=3).tolist()
    [[[2, 5, 6, 7, 8, 3]]]
    >>> with_triggers(torch.tensor([[[2, 7, 8, 9, 3]]]), torch.tensor([[5, 6]]), eos_token_id=3).tolist()
    [[[2, 5, 6, 7, 3]]]
    """
    t = triggers.shape[-1]
    out = ids.clone()
    out[..., 1 + t :] = ids[..., 1 : ids.shape[-1] - t]
    out[..., 1 : 1 + t] = triggers.unsqueeze(1).expand(-1, ids.shape[1], -1)
    lost = ~(out == eos_token_id).any(-1)  # the end token was shifted out: put it back in the last place
    out[..., -1] = torch.where(lost, torch.full_like(out[..., -1], eos_token_id), out[..., -1])
    return out


class PixelCLIP(nn.Module):
    """Base of the contrastive models: ``forward(x)`` gives normalised image embeddings (B, D),
    ``encode_text(ids)`` normalised text embeddings; ids (B, C, L) are C captions per image, whose
    embeddings are averaged (the image is pulled toward all of its captions)."""

    role = "contrastive"
    pad_token_id = 0

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(x), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        lead = ids.shape[:-1]
        flat = ids.reshape(-1, ids.shape[-1])
        # drop the padding columns after the longest text, keeping one: where the pad token is also the end
        # token (OpenAI's CLIP tokenizer) that one is the end token the text tower pools at
        content = (flat != self.pad_token_id).any(0).nonzero()
        used = min(flat.shape[1], int(content.max()) + 2) if len(content) else flat.shape[1]
        flat = flat[:, :used]
        # CLIP's text attention is causal and pools at the end token, which never sees what follows it,
        # so no padding mask is needed (and none can hide an end token that shares the pad id)
        emb = F.normalize(self.text_features(flat, torch.ones_like(flat)), dim=-1)
        emb = emb.view(*lead, -1)
        if emb.dim() == 3:  # several captions per image: their mean direction
            emb = F.normalize(emb.mean(1), dim=-1)
        return emb

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100)

    def token_embedding(self) -> nn.Embedding:
        """The text tower's word embedding (HotFlip reads its gradient)."""
        raise NotImplementedError


class ConvCLIP(PixelCLIP):
    """A small from-scratch CLIP: a built-in conv net (``image_tower``: tinycnn, smallcnn or convnet) as
    image tower, a transformers ``CLIPTextModel`` (``text_layers`` of width ``text_width``) over the
    caption vocabulary, linear projections to ``embed_dim``. Any image size (the towers pool globally)."""

    def __init__(self, tokenizer, embed_dim: int = 128, image_tower: str = "tinycnn", text_width: int = 128,
                 text_layers: int = 2) -> None:  # fmt: skip
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        if image_tower not in CONV_TOWERS:
            raise ValueError(f"image_tower must be one of {CONV_TOWERS}, got {image_tower!r}")
        self.vocabulary = list(tokenizer.vocabulary)
        self.hparams = dict(embed_dim=embed_dim, image_tower=image_tower, text_width=text_width, text_layers=text_layers)
        self.vision = BUILTIN[image_tower](1)
        features = self.vision.classifier.in_features
        self.vision.classifier = nn.Identity()
        self.visual_projection = nn.Linear(features, embed_dim, bias=False)
        config = CLIPTextConfig(vocab_size=len(self.vocabulary), hidden_size=text_width, intermediate_size=4 * text_width,
                                num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 64),
                                max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
        self.text = CLIPTextModel(config)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision(x))

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text(input_ids=ids, attention_mask=mask).pooler_output)

    def token_embedding(self) -> nn.Embedding:
        return self.text.get_input_embeddings()

    def description(self) -> dict[str, Any]:
        return {"kind": "clip-conv", "vocabulary": self.vocabulary, **self.hparams}


def _projected(out: Any) -> torch.Tensor:
    """The projected features of ``get_image_features``/``get_text_features``: a tensor in transformers 4, an
    output whose ``pooler_output`` holds them in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TransformersCLIP(PixelCLIP):
    """A transformers ``CLIPModel`` in pixel space: resize to its input size and normalise in torch."""

    def __init__(self, model: nn.Module, mean=CLIP_MEAN, std=CLIP_STD, size: int | None = None, desc: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.size = int(size or model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.pad_token_id = int(model.config.text_config.pad_token_id or 0)
        self.logit_scale = model.logit_scale
        self.desc = desc or {}

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return _projected(self.model.get_image_features(pixel_values=(x - self.mean) / self.std))

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_text_features(input_ids=ids, attention_mask=mask))

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.get_input_embeddings()

    def description(self) -> dict[str, Any]:
        return dict(self.desc)


def small_clip_config(tokenizer, image_size: int = 64, patch_size: int = 8, width: int = 192, layers: int = 4,
                      embed_dim: int = 128):  # fmt: skip
    """A small ``CLIPConfig`` (ViT image tower, patch ``patch_size``) for from-scratch training on CPUs."""
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
                  num_hidden_layers=layers, num_attention_heads=max(1, width // 64))  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def fresh_transformers_clip(tokenizer, **kwargs: Any) -> TransformersCLIP:
    """A from-scratch transformers CLIP sized by :func:`small_clip_config` (the retrieval victim)."""
    from transformers import CLIPModel

    config = small_clip_config(tokenizer, **kwargs)
    return TransformersCLIP(CLIPModel(config), desc={"kind": "clip-config", "config": config.to_dict()})


def load_transformers_clip(name: str, trust_remote_code: bool = False, revision: str | None = None):
    """(``TransformersCLIP``, tokenizer) of a pretrained CLIP by Hub id or folder (float32: it is differentiated)."""
    import transformers

    from .transformers_models import SurrogateNotAvailable, _processor_geometry, hub_kwargs, load_config

    kwargs = hub_kwargs(trust_remote_code, revision)
    config = load_config(name, kwargs)
    if config.model_type != "clip":
        raise SurrogateNotAvailable(f"{name!r} is a {config.model_type!r} model; a contrastive surrogate must be a CLIPModel")
    try:
        model = transformers.CLIPModel.from_pretrained(name, dtype=torch.float32, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise SurrogateNotAvailable(f"CLIP {name!r} (model and tokenizer) could not be loaded: {exc}") from exc
    mean, std, size = _processor_geometry(name, config, kwargs)
    desc = {"kind": "clip-transformers", "name": name, "mean": list(mean), "std": list(std), "size": int(size[0]),
            "config": config.to_dict()}  # fmt: skip
    return TransformersCLIP(model, mean, std, size[0], desc), tokenizer


def rebuild_clip(desc: dict[str, Any]):
    """(model, tokenizer) from a saved description, without weights (they are loaded after)."""
    from transformers import CLIPConfig, CLIPModel

    kind = desc.get("kind")
    if kind == "clip-conv":
        tok = caption_tokenizer(vocabulary=desc["vocabulary"])
        hp = {k: desc[k] for k in ("embed_dim", "image_tower", "text_width", "text_layers")}
        return ConvCLIP(tok, **hp), tok
    if kind == "clip-transformers":
        import transformers

        from .transformers_models import hub_kwargs

        model = CLIPModel(CLIPConfig.from_dict(desc["config"]))
        tokenizer = transformers.AutoTokenizer.from_pretrained(desc["name"], **hub_kwargs())
        return TransformersCLIP(model, desc["mean"], desc["std"], desc["size"], desc), tokenizer
    raise ValueError(f"unknown contrastive surrogate description {kind!r}")


def build_clip(spec: Any, captions: Iterable[Any] | None = None, trust_remote_code: bool = False, extra_words: int = 0):
    """(model, tokenizer) of a contrastive surrogate: ``"conv-clip"`` (from scratch, vocabulary from
    ``captions`` and ``extra_words`` pseudo-words), a CLIP Hub id or folder, or a ``PixelCLIP`` instance with
    a ``tokenizer`` attribute (those bring their own vocabulary: ``extra_words`` is not used)."""
    if isinstance(spec, PixelCLIP):
        tok = getattr(spec, "tokenizer", None)
        if tok is None:
            raise ValueError("a PixelCLIP surrogate instance needs a .tokenizer attribute")
        return spec, tok
    if spec == "conv-clip":
        tok = caption_tokenizer(captions, extra_words=extra_words)
        return ConvCLIP(tok), tok
    if isinstance(spec, str) and spec:
        return load_transformers_clip(spec, trust_remote_code)
    raise TypeError(f"a contrastive surrogate is 'conv-clip', a CLIP Hub id or folder, or a PixelCLIP; got {spec!r}")


class ContrastiveSurrogate:
    """A trainable CLIP-style surrogate with its tokenizer, saved and rebuilt like :class:`~.layer.Surrogate`
    (weights as ``surrogate.<param>`` arrays, a JSON description that rebuilds it offline)."""

    role = "contrastive"

    def __init__(self, model: PixelCLIP, tokenizer, desc: dict[str, Any]) -> None:
        self.model, self.tokenizer, self.desc = model, tokenizer, desc

    @classmethod
    def build(cls, spec: Any, captions: Iterable[Any] | None = None, trust_remote_code: bool = False,
              extra_words: int = 0) -> "ContrastiveSurrogate":  # fmt: skip
        model, tokenizer = build_clip(spec, captions, trust_remote_code, extra_words)
        desc = model.description() if not _is_instance_spec(spec) else {"kind": "module", "class": f"{type(spec).__module__}.{type(spec).__qualname__}"}
        return cls(model, tokenizer, desc)

    @classmethod
    def rebuild(cls, desc: dict, arrays: dict | None = None, module: nn.Module | None = None) -> "ContrastiveSurrogate":
        from .layer import load_state_arrays

        if desc.get("kind") == "module":
            if module is None:
                raise ValueError(f"this protector was fitted with a custom CLIP module ({desc['class']}); pass it again: "
                                 "from_pretrained(path, surrogate=MyCLIP())")  # fmt: skip
            model, tokenizer = build_clip(module)
        else:
            model, tokenizer = rebuild_clip(desc)
        if arrays is not None:
            load_state_arrays(model, arrays)
        return cls(model, tokenizer, desc)

    @property
    def input_size(self) -> int | None:
        return self.model.size if isinstance(self.model, TransformersCLIP) else None

    def to(self, device: torch.device | str) -> "ContrastiveSurrogate":
        self.model = self.model.to(device)
        return self

    def state_arrays(self) -> dict:
        from .layer import state_arrays

        return state_arrays(self.model)


def _is_instance_spec(spec: Any) -> bool:
    return isinstance(spec, PixelCLIP)


def train_clip(model: PixelCLIP, tokenizer, images: torch.Tensor, captions: Sequence[Sequence[str]], epochs: int,
               batch_size: int = 64, lr: float = 5e-4, weight_decay: float = 0.1, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", progress: bool = False, desc: str = "Training CLIP",
               on_epoch: Callable[[PixelCLIP], str | None] | None = None, max_steps: int | None = None) -> PixelCLIP:  # fmt: skip
    """Train a CLIP-style model from scratch on image-caption pairs: AdamW, 10 % warm-up then cosine, full
    batches of ``batch_size``, one of each image's ``captions`` drawn per step, random crop + flip.

    ``images``: (N, 3, R, R) in [0, 1]; ``captions``: N lists of strings. ``on_epoch(model)`` runs after
    every epoch (the retrieval victim scores itself there) and may return text for the progress bar.
    ``max_steps``: stop (and end the schedule) after that many steps if the epochs would take more.
    """
    from ..core.augment import BatchRandom, random_crop_flip
    from ..core.progress import progress_bar
    from ..core.schedules import shuffled_epochs, step_plan, warmup_cosine

    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    flat = [c for caps in captions for c in caps]
    ids = tokenizer(flat, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")["input_ids"]
    counts = torch.tensor([len(c) for c in captions])
    starts = torch.cumsum(counts, 0) - counts
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bs, per_epoch, total = step_plan(len(images), batch_size, epochs, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup=0.1))
    bar = progress_bar(total=math.ceil(total / per_epoch), desc=desc, progress=progress)
    for batches in shuffled_epochs(len(images), bs, per_epoch, total, gen):
        model.train()
        for idx in batches:
            pick = starts[idx] + (torch.rand(len(idx), generator=gen) * counts[idx]).long()  # one caption each
            x = random_crop_flip(images[idx], BatchRandom(gen, len(idx))).to(device)
            loss = contrastive_loss(model(x), model.encode_text(ids[pick].to(device)), model.scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        shown = on_epoch(model) if on_epoch is not None else None
        bar.update(1)
        if shown:
            bar.set_postfix_str(shown)
    bar.close()
    model.eval()
    return model


def _candidates(same: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """The pairs a row's softmax runs over: every other row that is not a duplicate of it (``same``), and itself."""
    return ~same | torch.eye(n, dtype=torch.bool, device=device)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
                     same: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """Symmetric InfoNCE of matching rows. ``same[i, j]``: rows i and j carry the same pair (augmented
    copies of one image, or one caption twice); such pairs are not counted as negatives."""
    logits = scale * image_emb @ text_emb.t()
    if same is not None:
        logits = logits.masked_fill(~_candidates(same, len(logits), logits.device), float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none")
    loss = loss / 2
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()


def uniform_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
                             same: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy to the uniform distribution, both ways, of the pairs' similarities: at its minimum,
    ``log`` of the candidates' count, when every image is as close to every caption of the batch as to its
    own (an image that tells nothing about its caption). The contrastive counterpart of a classifier
    answering uniformly; ``same`` as in ``contrastive_loss`` (a caption's duplicates are left out of its
    row's candidates).

    >>> e = torch.eye(4)
    >>> round(float(uniform_contrastive_loss(torch.full((4, 4), 0.5), e, 10.0)), 4)  # log 4: tells nothing
    1.3863
    >>> round(float(uniform_contrastive_loss(e, e, 10.0)), 4)  # each image on its own caption
    7.5001
    """
    logits = scale * image_emb @ text_emb.t()
    keep = torch.ones_like(logits, dtype=torch.bool) if same is None else _candidates(same, len(logits), logits.device)
    loss = 0.0
    for lg in (logits, logits.t()):  # image to text, and text to image
        masked = lg.masked_fill(~keep, float("-inf"))
        logp = masked.log_softmax(-1).masked_fill(~keep, 0.0)
        loss = loss - (logp.sum(-1) / keep.sum(-1)).mean()
    return loss / 2


__all__ = [
    "ContrastiveSurrogate", "ConvCLIP", "PixelCLIP", "TransformersCLIP", "build_clip", "caption_tokenizer", "contrastive_loss",
    "encode_captions", "fresh_transformers_clip", "pseudo_words", "train_clip", "uniform_contrastive_loss", "with_triggers", "load_transformers_clip", "rebuild_clip", "small_clip_config",
]  # fmt: skip
