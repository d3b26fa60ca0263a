"""Image-caption datasets: MEM, contrastive surrogates, retrieval victims (the image-text issue)."""

import json

import datasets
import numpy as np
import pytest
import torch
from helpers import captioned, rename_saved_arrays, shared_dataset, tiny_clip_folder  # noqa: F401  (a fixture)

import uexamples as ue
from uexamples.evaluation.retrieval import RetrievalError, chance_levels, retrieval_metrics
from uexamples.surrogates.contrastive import ContrastiveSurrogate, encode_captions

TINY_MEM = dict(train_steps=4, train_batch_size=8, noise_steps=2, eot_draws=1, final_noise_steps=3, final_eot_draws=1,
                map_negatives=16)  # fmt: skip
@pytest.fixture(scope="module")
def pairs():
    return captioned(16)


@pytest.fixture(scope="module")
def fitted(pairs):
    return ue.MEMProtect(seed=3, **TINY_MEM).fit(pairs, progress=False)


@pytest.fixture(scope="module")
def mapped(pairs, fitted):
    return pairs.map(fitted, batched=True, batch_size=5)


def _pixels(ds):
    return [np.asarray(r["image"]).astype(int) for r in ds]


def test_captions_and_other_columns_pass_through_byte_for_byte(pairs, mapped):
    assert mapped["caption"] == pairs["caption"] and mapped["id"] == pairs["id"]
    assert mapped.features == pairs.features
    assert any((a != b).any() for a, b in zip(_pixels(pairs), _pixels(mapped)))


def test_string_captions_without_labels_map(fitted):
    ds = captioned(6, seed=1).map(lambda r: {"text": r["caption"][0]}, remove_columns=["caption"])
    assert isinstance(ds.features["text"], datasets.Value)
    out = ds.map(ue.MEMProtect(seed=0, **TINY_MEM).fit(ds, progress=False), batched=True)
    assert out["text"] == ds["text"]


def test_bound_holds_after_rounding_and_modes_and_sizes_are_kept(pairs, mapped):
    levels = round(255 * 8 / 255)
    for a, b, ra, rb in zip(_pixels(pairs), _pixels(mapped), pairs, mapped):
        assert ra["image"].mode == rb["image"].mode and ra["image"].size == rb["image"].size
        assert np.abs(a - b).max() <= levels


def test_same_seed_same_bytes_whatever_the_map_batch(pairs, mapped):
    again = ue.MEMProtect(seed=3, **TINY_MEM).fit(pairs, progress=False)
    other_batches = pairs.map(again, batched=True, batch_size=16)
    assert all((a == b).all() for a, b in zip(_pixels(mapped), _pixels(other_batches)))
    other_seed = pairs.map(ue.MEMProtect(seed=4, **TINY_MEM).fit(pairs, progress=False), batched=True)
    assert any((a != b).any() for a, b in zip(_pixels(mapped), _pixels(other_seed)))


def test_save_and_load_give_identical_output(tmp_path, pairs, fitted, mapped):
    fitted.save_pretrained(tmp_path / "mem")
    saved = json.loads((tmp_path / "mem" / "protector_config.json").read_text())
    assert saved["method"] == "mem"
    loaded = ue.Protector.from_pretrained(tmp_path / "mem")
    again = pairs.map(loaded, batched=True)
    assert all((a == b).all() for a, b in zip(_pixels(mapped), _pixels(again)))


def test_noise_minimises_the_contrastive_loss_unlike_random_noise_of_the_same_bound():
    """Catches noise replaced by random noise of the same bound: against the fitted surrogate, the protected
    images must match their own captions far better (the final pass's loss: own captions vs the bank)."""
    ds = shared_dataset("flickr8k-1k").select(range(48))
    protector = ue.MEMProtect(seed=0, **{**TINY_MEM, "train_steps": 40, "train_batch_size": 16, "final_noise_steps": 10}).fit(ds, progress=False)
    out = ds.map(protector, batched=True)
    from uexamples.core.loading import load_split

    res = protector.working_resolution()
    x, xp = load_split(ds, "image", res).images, load_split(out, "image", res).images
    rnd = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 8 / 255).clamp(0, 1)
    ids = encode_captions(protector._runtime["surrogate"].tokenizer, ds["caption"], 5)
    model = protector._runtime["surrogate"].model.eval()
    protector._runtime["against_bank"] = True

    def loss(images):
        with torch.no_grad():
            return float(protector.objective(model(images), ids, reduction="mean"))

    clean, protected, random = loss(x), loss(xp), loss(rnd)
    protector._runtime["against_bank"] = False
    assert protected < 0.7 * min(clean, random), (clean, protected, random)


def test_needs_captions_and_says_so():
    ds = ue.load_sample_dataset().select(range(8))
    with pytest.raises(ue.ColumnError, match="needs captions.*text_column"):
        ue.MEMProtect(**TINY_MEM).fit(ds, progress=False)


def test_a_transformers_clip_saved_locally_is_the_surrogate(tmp_path, tiny_clip_folder, pairs):
    protector = ue.MEMProtect(surrogate=tiny_clip_folder, seed=0, **TINY_MEM).fit(pairs, progress=False)
    assert protector.rules["resolution"].startswith("32 px grid (the surrogate's input size)")
    out = pairs.map(protector, batched=True)
    assert all(np.abs(a - b).max() <= 8 for a, b in zip(_pixels(pairs), _pixels(out)))
    protector.save_pretrained(tmp_path / "p")
    again = pairs.map(ue.Protector.from_pretrained(tmp_path / "p"), batched=True)
    assert all((a == b).all() for a, b in zip(_pixels(out), _pixels(again)))


def test_contrastive_surrogate_rebuilds_from_its_description(pairs):
    s = ContrastiveSurrogate.build("conv-clip", pairs["caption"])
    again = ContrastiveSurrogate.rebuild(json.loads(json.dumps(s.desc)), s.state_arrays())
    x, ids = torch.rand(2, 3, 20, 20), encode_captions(s.tokenizer, pairs["caption"][:2], 3)
    s.model.eval(), again.model.eval()
    assert torch.equal(s.model(x), again.model(x)) and torch.equal(s.model.encode_text(ids), again.model.encode_text(ids))


# ---------------------------------------------------------------------- retrieval metrics and victims
def test_retrieval_metrics_rank_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    owners = torch.tensor([0, 1, 2, 2])  # caption 0 belongs to image 0 but matches image 1 best
    m = retrieval_metrics(img, txt, owners)
    # image 0 ranks captions (1, 3, 2, 0): its own caption 0 is 4th; image 1: (0, 2, 3, 1) -> 4th;
    # image 2: captions 2 and 3 tie first -> rank 1
    assert m["i2t_r1"] == pytest.approx(1 / 3) and m["i2t_r5"] == 1.0 and m["i2t_median_rank"] == 4
    # caption 0 -> images (1, 2, 0): 3rd; caption 1 -> (0, 2, 1): 3rd; captions 2, 3 -> image 2 first
    assert m["t2i_r1"] == 0.5 and m["t2i_median_rank"] == 2


def test_chance_levels_match_random_rankings():
    gen = torch.Generator().manual_seed(0)
    owners = torch.arange(50).repeat_interleave(5)
    runs = [retrieval_metrics(torch.randn(50, 8, generator=gen), torch.randn(250, 8, generator=gen), owners) for _ in range(200)]
    chance = chance_levels(50, 250)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert np.mean([r[k] for r in runs]) == pytest.approx(chance[k], abs=0.02), k
    assert np.median([r["t2i_median_rank"] for r in runs]) == pytest.approx(chance["t2i_median_rank"], rel=0.15)


def test_evaluate_picks_the_retrieval_victim_for_captions_without_labels(pairs, mapped):
    report = ue.evaluate(mapped, pairs, clean=pairs, victim="clip-conv", epochs=2, batch_size=8, resolution=16, progress=False)
    assert isinstance(report, ue.RetrievalReport)
    row = report.results[0]
    assert set(row) == {"countermeasure", "protected", "clean"} and len(row["protected"]["runs"][0]["curve"]) == 2
    assert report.chance["t2i_r1"] == pytest.approx(1 / 16)
    table = report.to_markdown()
    assert "(chance)" in table and "I→T R@1" in table


def test_retrieval_rejects_classifier_countermeasures(pairs):
    with pytest.raises(RetrievalError, match="image-only"):
        ue.evaluate_retrieval(pairs, pairs, countermeasures="mixup", epochs=1, progress=False)
    with pytest.raises(RetrievalError, match="class labels"):  # orthogonal projection fits a classifier to the labels
        ue.evaluate_retrieval(pairs, pairs, countermeasures="orthogonal", epochs=1, progress=False)


@pytest.mark.slow
def test_a_clean_clip_victim_learns_real_pairs_and_the_chance_line_is_right():
    """On real captions the from-scratch CLIP must beat chance, or the benchmark would prove nothing."""
    train = shared_dataset("flickr8k-1k", "train")
    test = shared_dataset("flickr8k-1k", "test")
    r = ue.evaluate_retrieval(train, test, victim="clip-conv", epochs=8, resolution=32, progress=False, quality=False)
    p = r.results[0]["protected"]
    assert r.chance["t2i_r10"] == pytest.approx(0.05)
    assert p["t2i_r10"]["mean"] > 0.05 + 0.02, p["t2i_r10"]


@pytest.mark.integration
def test_cli_protects_and_evaluates_a_captioned_repo_and_the_card_says_captions_are_untouched(tmp_path, pairs):
    from uexamples.cards import render_card
    from uexamples.cli import main

    repo = tmp_path / "pairs"
    (repo / "data").mkdir(parents=True)
    pairs.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n\n# captioned\n")
    out = tmp_path / "out"
    assert main(["protect", "--dataset", str(repo), "--method", "mem", "--train-steps", "3", "--train-batch-size", "8",
                 "--final-noise-steps", "2", "--output", str(out), "--quiet"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"] == {"image": "image", "label": None, "text": "caption"}
    protected = datasets.load_from_disk(str(out / "dataset"))
    assert protected["caption"] == pairs["caption"]
    card = render_card(summary, "me/pairs-protected", "cc-by-4.0")
    assert "protected column `image`" in card and "captions in `caption` included (byte for byte" in card
    assert "Chosen for this data by the preset's rule, resolution" in card and card.count("preset's rule, resolution") == 1
    assert main(["evaluate", "--protected", str(out), "--test", str(repo), "--test-split", "train", "--victim", "clip-conv",
                 "--epochs", "1", "--batch-size", "8", "--output", str(tmp_path / "eval"), "--quiet"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["chance"]["t2i_r1"] == pytest.approx(1 / 16) and report["config"]["victim"] == "clip-conv"


def test_text_triggers_rewrite_captions_consistently_and_the_card_says_so(tmp_path, pairs):
    from uexamples.cards import render_card

    protector = ue.MEMProtect(seed=0, text_triggers=2, **TINY_MEM).fit(pairs, progress=False)
    out = pairs.map(protector, batched=True, batch_size=5)
    for new, old in zip(out["caption"], pairs["caption"]):
        prefixes = {n[: len(n) - len(o)] for n, o in zip(new, old)}
        assert len(new) == len(old) and all(n.endswith(" " + o) for n, o in zip(new, old))
        assert len(prefixes) == 1 and len(next(iter(prefixes)).split()) == 2  # one 2-word trigger per image
    assert len({c[0].split()[:2].__str__() for c in out["caption"]}) > 1  # images get different triggers
    protector.save_pretrained(tmp_path / "p")
    again = pairs.map(ue.Protector.from_pretrained(tmp_path / "p"), batched=True)
    assert again["caption"] == out["caption"]
    assert all((a == b).all() for a, b in zip(_pixels(out), _pixels(again)))
    # saved before the fit keys moved to the engine (2026-12-06): the same triggers are found again
    rename_saved_arrays(tmp_path / "p", {"fit_keys": "mem.fit_keys"})
    old = pairs.map(ue.Protector.from_pretrained(tmp_path / "p"), batched=True)
    assert old["caption"] == out["caption"] and all((a == b).all() for a, b in zip(_pixels(out), _pixels(old)))
    unseen = captioned(3, seed=9)
    first, second = unseen.map(protector, batched=True), unseen.map(protector, batched=True)
    assert first["caption"] == second["caption"] != unseen["caption"]
    summary = {"method": "mem", "config": protector.public_config(), "columns": {"image": "image", "text": "caption"},
               "images": 16, "source": {"dataset": "x", "split": "train"}}  # fmt: skip
    card = render_card(summary, "me/x", "cc-by-4.0")
    assert "were changed as said below" in card and "2 trigger words" in card and "byte for byte" not in card
    assert "searched during the first 25 % of the fit" in card  # the fast preset's trigger_search, said in the card


def test_noise_grid_is_the_grid_of_the_resolution_rule():
    assert ue.MEMProtect(seed=0).working_resolution() == 32  # both presets: the 32 px grid for photos
    assert ue.MEMProtect(seed=0, preset="paper").working_resolution() == 32
    assert ue.MEMProtect(seed=0, noise_grid=16).working_resolution() == 16
    with pytest.raises(ValueError, match="noise_grid"):
        ue.MEMProtect(seed=0, noise_grid=0)


def test_trigger_search_stops_hotflip_after_its_fraction_of_the_fit(pairs):
    """With trigger_search=0.5 the triggers after 4 fit steps are those HotFlip left after step 2 (they then stay
    fixed while the noise goes on binding to them); with 0 they are the seeded random start."""
    fit = lambda steps, search: ue.MEMProtect(seed=1, text_triggers=2, trigger_search=search,  # noqa: E731
                                              **{**TINY_MEM, "train_steps": steps}).fit(pairs, progress=False)  # fmt: skip
    half, first_two, searched = fit(4, 0.5), fit(2, 1.0), fit(4, 1.0)
    assert torch.equal(half._runtime["triggers"], first_two._runtime["triggers"])
    assert not torch.equal(half._runtime["triggers"], searched._runtime["triggers"])  # the search would have gone on
    assert torch.equal(fit(1, 0.0)._runtime["triggers"], fit(4, 0.0)._runtime["triggers"])  # never searched
    assert not torch.equal(fit(1, 0.0)._runtime["triggers"], first_two._runtime["triggers"])
    with pytest.raises(ValueError, match="trigger_search"):
        ue.MEMProtect(text_triggers=2, trigger_search=1.5)


def test_fit_images_start_their_final_pass_from_the_noise_their_fit_built(pairs, fitted, mapped):
    """final_from_fit_noise (the paper preset's; fast leaves it off) starts a fit image's final pass from the noise
    its fit kept for it (the published loop outputs noise[index]); images the fit never saw start from the seeded
    draw. Against the same fit without it: rows the fit never saw get the same bytes (same surrogate, same start),
    fit rows other ones. Catches the kept noise ignored at map, applied to images the fit never saw, or the presets
    not saying what they say."""
    assert ue.MEMProtect(preset="paper").config.final_from_fit_noise and not fitted.config.final_from_fit_noise
    kept = ue.MEMProtect(seed=3, final_from_fit_noise=True, **TINY_MEM).fit(pairs, progress=False)
    assert "map_start" not in fitted._runtime and len(kept._runtime["map_start"]) == len(pairs)
    unseen = captioned(4, seed=9)
    assert all((a == b).all() for a, b in zip(_pixels(unseen.map(fitted, batched=True)), _pixels(unseen.map(kept, batched=True))))
    ours = _pixels(pairs.map(kept, batched=True))
    assert np.mean([(a != b).mean() for a, b in zip(ours, _pixels(mapped))]) > 0.1


def test_trigger_words_let_triggers_use_words_no_caption_uses(tmp_path, pairs):
    """trigger_words adds pseudo-words to the offline surrogate's vocabulary (the paper's HotFlip ranks CLIP's whole
    vocabulary, mostly tokens no caption uses): the triggers then draw from them, the captions carry them, and a
    saved protector finds the same words again. Catches the pool not built, built from the fit seed (another
    vocabulary per fit), left out of the trigger candidates, or lost on save; 0 keeps the vocabulary as it was."""
    from uexamples.surrogates.contrastive import caption_words, pseudo_words

    caption_vocab = {w for c in pairs["caption"] for text in c for w in caption_words(text)}
    assert ue.MEMProtect().config.trigger_words == ue.MEMProtect(preset="paper").config.trigger_words == 8192  # both presets
    plain = ue.MEMProtect(seed=0, text_triggers=3, trigger_words=0, **TINY_MEM).fit(pairs, progress=False)
    pooled = ue.MEMProtect(seed=0, text_triggers=3, trigger_words=200, **TINY_MEM).fit(pairs, progress=False)
    plain_vocab, pooled_vocab = plain._runtime["surrogate"].tokenizer.vocabulary, pooled._runtime["surrogate"].tokenizer.vocabulary
    assert pooled_vocab == plain_vocab + pseudo_words(200, caption_vocab) and not caption_vocab & set(pooled_vocab[len(plain_vocab):])
    other_seed = ue.MEMProtect(seed=5, text_triggers=3, trigger_words=200, **TINY_MEM).fit(pairs, progress=False)
    assert other_seed._runtime["surrogate"].tokenizer.vocabulary == pooled_vocab
    out = pairs.map(pooled, batched=True)
    trigger_text = [c[0][: len(c[0]) - len(o[0])].split() for c, o in zip(out["caption"], pairs["caption"])]
    pool = set(pooled_vocab[len(plain_vocab):])
    assert sum(w in pool for t in trigger_text for w in t) > len(trigger_text)  # 200 of ~260 candidates: most slots
    pooled.save_pretrained(tmp_path / "p")
    assert pairs.map(ue.Protector.from_pretrained(tmp_path / "p"), batched=True)["caption"] == out["caption"]
    assert ue.MEMProtect(seed=0, **TINY_MEM).fit(pairs, progress=False)._runtime["surrogate"].tokenizer.vocabulary == plain_vocab
    with pytest.raises(ValueError, match="trigger_words"):
        ue.MEMProtect(text_triggers=3, trigger_words=-1)
    assert any("made-up words" in n and "0.34 and 0.36" in n for n in ue.MEMProtect.card_notes(pooled.public_config()))
    assert not any("made-up words" in n or "0.34 and 0.36" in n for n in ue.MEMProtect.card_notes(plain.public_config()))
