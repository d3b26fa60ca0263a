"""evaluate(): victims learn, countermeasures do what they say, metrics are right, bad input is refused."""

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import uexamples as ue
from uexamples.cli import main
from uexamples.evaluation import (
    CountermeasureError,
    EvaluationError,
    balanced_accuracy,
    dataset_quality,
    image_quality,
    macro_auc,
    parse_countermeasure,
    parse_countermeasures,
    psnr,
    train_victim,
)
from uexamples.evaluation.countermeasures import PartialProtection
from uexamples.evaluation.victim import build_victim, dataset_to_tensors

from helpers import shared_dataset


def _images(n=6, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- countermeasures
@pytest.mark.unit
def test_grayscale_is_luma_on_all_channels():
    x = _images()
    out = parse_countermeasure("grayscale").preprocess(x)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c], luma)


@pytest.mark.unit
def test_jpeg_equals_a_pil_round_trip_and_quality_matters():
    x = (_images(3) * 255).round() / 255
    out10 = parse_countermeasure("jpeg:10").preprocess(x)
    img = PIL.Image.fromarray((x[1] * 255).round().byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=10)
    expected = torch.from_numpy(np.array(PIL.Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(out10[1], expected)
    out90 = parse_countermeasure("jpeg:90").preprocess(x)
    assert (out90 - x).abs().mean() < (out10 - x).abs().mean()
    assert (out10 - x).abs().max() > 0.05


@pytest.mark.unit
def test_bitdepth_keeps_two_to_the_bits_levels():
    x = _images()
    out = parse_countermeasure("bitdepth:2").preprocess(x)
    assert set(torch.unique(out * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert (out - x).abs().max() <= 1 / 6 + 1e-6


@pytest.mark.unit
def test_blur_keeps_constants_and_spreads_an_impulse():
    const = torch.full((1, 3, 9, 9), 0.4)
    blur = parse_countermeasure("blur:1")
    assert torch.allclose(blur.preprocess(const), const, atol=1e-6)
    impulse = torch.zeros(1, 3, 11, 11)
    impulse[0, :, 5, 5] = 1
    out = blur.preprocess(impulse)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    g = torch.exp(-torch.tensor(1.0) / 2)  # one pixel away: relative weight exp(-1/(2 sigma^2))
    assert (out[5, 6] / out[5, 5]).item() == pytest.approx(g.item(), rel=1e-4)


@pytest.mark.unit
def test_frame_blackens_the_dark_field_around_the_image_only():
    x = torch.full((2, 3, 10, 10), 0.5)
    x[0, :, :, :3] = x[0, :, :, -2:] = 6 / 255  # image 0: a dark frame left and right, carrying noise
    x[0, :, 0, 1] = 14 / 255
    x[0, :, 4:6, 5:7] = 2 / 255  # a dark structure inside the image
    x[1, :, :3, :] = 6 / 255  # image 1: dark along the top only: not a frame
    out = parse_countermeasure("frame:20/255").preprocess(x)
    assert (out[0, :, :, :3] == 0).all() and (out[0, :, :, -2:] == 0).all()  # the frame and its noise are gone
    assert torch.equal(out[0, :, :, 3:-2], x[0, :, :, 3:-2])  # the rest, the inner dark structure included, is kept
    assert torch.equal(out[1], x[1])
    assert parse_countermeasure("frame").label == "frame:20/255"
    kept = parse_countermeasure("frame:5/255").preprocess(x)  # below the frame's level: nothing is touched
    assert torch.equal(kept, x)


@pytest.mark.unit
def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(50, 3, 32, 32)
    out = parse_countermeasure("cutout:8").apply(x, torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 64).all() and (zeros > 0).all() and (zeros == 64).any()
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # same square on every channel


@pytest.mark.unit
def test_mixup_mixes_images_and_targets_with_one_lambda():
    x = _images(8)
    y = torch.arange(8)  # one class per image: the target row tells which two images were mixed
    cm = parse_countermeasure("mixup:1")
    xm, target = cm.mix(x, y, 8, torch.Generator().manual_seed(3))
    assert torch.allclose(target.sum(1), torch.ones(8))
    lams = target[torch.arange(8), y]  # the weight of each image's own class
    partners = []
    for i in range(8):
        lam = float(lams[i])
        others = target[i].clone()
        others[i] = 0
        j = int(others.argmax()) if others.max() > 0 else i  # mixed with itself when perm[i] == i
        partners.append(j)
        assert torch.allclose(xm[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
    mixed = [i for i in range(8) if partners[i] != i]
    assert mixed, "no image was mixed with another"
    assert torch.allclose(lams[mixed], lams[mixed[0]].expand(len(mixed)))  # one lambda for the batch
    assert 0 < float(lams[mixed[0]]) < 1
    assert sorted(partners) == list(range(8))  # the partners are a permutation


@pytest.mark.unit
def test_adversarial_training_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_victim("tinycnn", 10).eval()
    x = _images(16, size=32)
    y = torch.randint(0, 10, (16,))
    cm = parse_countermeasure("adv:8/255,steps=5")
    adv = cm.attack(model, x, y, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)
    assert cm.label == "adv:8/255,steps=5"


@pytest.mark.unit
def test_partial_protection_mixes_exactly_the_fraction():
    protected, clean = torch.ones(100, 3, 4, 4), torch.zeros(100, 3, 4, 4)
    mixed = PartialProtection(0.3).mix_training_set(protected, clean, torch.Generator().manual_seed(0))
    assert int(mixed[:, 0, 0, 0].sum()) == 30
    with pytest.raises(CountermeasureError, match="clean"):
        PartialProtection(0.3).mix_training_set(protected, None, torch.Generator())


@pytest.mark.unit
def test_orthogonal_projection_removes_class_patterns_and_keeps_the_rest():
    gen = torch.Generator().manual_seed(0)
    n, k = 600, 4
    y = torch.arange(n) % k
    patterns = (torch.rand(k, 3, 16, 16, generator=gen) * 2 - 1) * 8 / 255
    images = torch.rand(n, 3, 16, 16, generator=gen) * 0.6 + 0.2
    out = parse_countermeasure("orthogonal").preprocess_labelled(images + patterns[y], y, torch.Generator().manual_seed(0))

    def pattern_share(x):  # how much of each class's pattern its mean image still carries
        means = torch.stack([x[y == c].mean(0) - x.mean(0) for c in range(k)])
        centred = patterns - patterns.mean(0)
        return float((means * centred).sum() / (centred * centred).sum())

    assert pattern_share(images + patterns[y]) > 0.95
    assert abs(pattern_share(out)) < 0.15  # a projection that did nothing (or the wrong span) keeps ~1
    # only a k-dimensional span is removed: the images are otherwise the same
    residual = (out - (images + patterns[y])).reshape(n, -1)
    assert torch.linalg.matrix_rank(residual, atol=1e-4) <= k
    assert parse_countermeasure("orthogonal:5").label == "orthogonal,epochs=5"
    # test images: as they are by default; with test=1 projected along the training set's directions
    test = images[:8] + patterns[y[:8]]
    assert parse_countermeasure("orthogonal").preprocess_test(test) is test
    both = parse_countermeasure("orthogonal,test=1")
    with pytest.raises(CountermeasureError, match="training set first"):
        both.preprocess_test(test)
    both.preprocess_labelled(images + patterns[y], y, torch.Generator().manual_seed(0))
    assert torch.allclose(both.preprocess_test(test), out[:8], atol=1e-5)  # the same projection as the training rows


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec, message",
    [("sharpen", "unknown countermeasure"), ("jpeg:0", "quality"), ("adv:8/255,foo=1", "no parameter"),
     ("partial:2", "fraction"), ("blur:x", "not a number"), ("frame:1.5", "level"), ("orthogonal:0", "epochs")],
)  # fmt: skip
def test_bad_countermeasures(spec, message):
    with pytest.raises(CountermeasureError, match=message):
        parse_countermeasure(spec)


@pytest.mark.unit
def test_parse_list_string():
    labels = [c.label for c in parse_countermeasures("standard, jpeg:10, adv:4/255,steps=3, partial:0.5")]
    assert labels == ["standard", "jpeg:10", "adv:4/255,steps=3", "partial:0.5"]


# ---------------------------------------------------------------- metrics
@pytest.mark.unit
def test_metrics_match_hand_computed_values():
    o = np.full((3, 8, 8), 100, np.uint8)
    p = o.copy()
    p[:, 0, :] += 4  # one row of 8 pixels changed by 4 levels on every channel
    q = image_quality(o, p)
    mse = (4 / 255) ** 2 * (3 * 8) / (3 * 64)
    assert q["linf"] == 4
    assert q["l2"] == pytest.approx(np.sqrt(24 * (4 / 255) ** 2))
    assert q["psnr"] == pytest.approx(10 * np.log10(1 / mse))
    assert q["changed_pixels"] == pytest.approx(8 / 64) and q["changed_values"] == pytest.approx(24 / 192)
    assert psnr(np.zeros(4), np.full(4, 0.5)) == pytest.approx(20 * np.log10(2))


@pytest.mark.unit
def test_dataset_quality_on_known_images():
    a = np.full((8, 8, 3), 50, np.uint8)
    b = a.copy()
    b[0, 0, 0] = 58
    feats = datasets.Features({"image": datasets.Image()})
    orig = datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(a)] * 2}, features=feats)
    prot = datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(a), PIL.Image.fromarray(b)]}, features=feats)
    q = dataset_quality(orig, prot, "image")
    assert q["linf_levels"] == 8
    assert q["mean_l2"] == pytest.approx((0 + 8 / 255) / 2)
    assert q["changed_pixels"] == pytest.approx((0 + 1 / 64) / 2)
    assert q["mean_psnr"] == pytest.approx(10 * np.log10(1 / ((8 / 255) ** 2 / 192)))  # the unchanged image is inf


@pytest.mark.unit
def test_balanced_accuracy_and_macro_auc_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.choice(4, size=300, p=[0.6, 0.2, 0.15, 0.05])  # imbalanced, like a medical set
    probs = rng.dirichlet(np.ones(4), size=300)
    probs[np.arange(300), y] += rng.random(300)  # scores that know something about the label
    probs /= probs.sum(1, keepdims=True)
    assert balanced_accuracy(y, probs.argmax(1)) == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert macro_auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert balanced_accuracy(y, np.zeros_like(y)) == pytest.approx(0.25)  # the majority guess: 60 % accuracy
    assert macro_auc(y[:2] * 0, probs[:2]) != macro_auc(y[:2] * 0, probs[:2])  # one class: NaN, not a number


# ---------------------------------------------------------------- victims
@pytest.mark.slow
@pytest.mark.integration
def test_clean_victim_learns_on_real_cifar():
    train = shared_dataset("cifar10-10k", "train").select(range(2000))
    test = shared_dataset("cifar10-10k", "test").select(range(500))
    tx, ty = dataset_to_tensors(train)
    sx, sy = dataset_to_tensors(test)
    res = train_victim(tx, ty, sx, sy, arch="smallcnn", epochs=6, batch_size=64, progress=False)
    assert res.final_accuracy > 0.3  # chance is 0.1
    assert len(res.curve) == 6 and res.best_accuracy == max(res.curve)


@pytest.mark.unit
def test_victim_reports_per_class_recall_prediction_shares_and_monitor_curves():
    """The per-class view of a victim's final model and the per-epoch monitor sets: a monitor set equal to the test
    split gives the test curve, the recalls average to the balanced accuracy and weight to the accuracy, the shares
    sum to one (catches recall taken over predicted instead of true classes, unnormalised shares, a monitor scored
    with another model or in train mode)."""
    gen = torch.Generator().manual_seed(0)
    tx, ty = torch.rand(96, 3, 16, 16, generator=gen), torch.arange(96) % 3
    tx[ty == 1] += 0.5  # something to learn: one class brighter
    sx, sy = torch.rand(40, 3, 16, 16, generator=gen), torch.tensor([0] * 20 + [1] * 12 + [2] * 8)
    sx[sy == 1] += 0.5
    res = train_victim(tx.clamp(0, 1), ty, sx.clamp(0, 1), sy, arch="tinycnn", epochs=3, batch_size=32, progress=False,
                       num_classes=4, monitor={"test_again": (sx.clamp(0, 1), sy), "train": (tx.clamp(0, 1), ty)})  # fmt: skip
    assert res.monitor_curves["test_again"] == res.curve and len(res.monitor_curves["train"]) == 3
    recall, share = res.final_recall_per_class, res.final_prediction_share
    assert len(recall) == len(share) == 4 and recall[3] is None  # no test image of class 3
    assert np.mean(recall[:3]) == pytest.approx(res.final_balanced_accuracy)
    assert sum(share) == pytest.approx(1.0)
    # accuracy = sum over classes of recall x the class's share of the test split
    assert sum(r * n / 40 for r, n in zip(recall[:3], (20, 12, 8))) == pytest.approx(res.final_accuracy)


@pytest.mark.unit
def test_transformers_victims_build_from_config():
    from transformers import ResNetConfig

    vit = build_victim({"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}, 5)  # fmt: skip
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    resnet = build_victim(ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic"), 3)
    assert resnet(torch.rand(2, 3, 32, 32)).shape == (2, 3)


# ---------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def protected_sample(sample_ds):
    return sample_ds.map(ue.CUDAProtect(key=11, allow_weak_key=True).fit(sample_ds), batched=True)


@pytest.mark.integration
def test_evaluate_report_plot_and_table(protected_sample, sample_ds, tmp_path):
    test = ue.load_sample_dataset("test")
    report = ue.evaluate(protected_sample, test, clean=sample_ds, victim="tinycnn",
                         countermeasures=["standard", "partial:0.5", "orthogonal,test=1"], epochs=2, seeds=[0, 1],
                         progress=False)  # fmt: skip
    assert [r["countermeasure"] for r in report.results] == ["standard", "partial:0.5", "orthogonal,test=1"]
    std = report.results[0]
    assert report.results[2]["clean"]["runs"] != std["clean"]["runs"]  # its own clean victims, on projected images
    assert len(std["protected"]["runs"]) == 2 and len(std["protected"]["curve_mean"]) == 2
    assert std["protected"]["final_std"] >= 0 and std["ratio"] == pytest.approx(
        std["protected"]["final_mean"] / std["clean"]["final_mean"])  # fmt: skip
    # partial's baseline is plain clean training: the same runs, not retrained
    assert report.results[1]["clean"] == std["clean"]
    assert report.quality["linf_levels"] > 0 and 0 < report.quality["mean_ssim"] < 1
    out = report.save(tmp_path / "eval")
    assert json.loads((out / "report.json").read_text())["config"]["seeds"] == [0, 1]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert PIL.Image.open(out / "curves.png").size[0] > 400
    table = (out / "table.md").read_text()
    assert "| standard |" in table and "| partial:0.5 |" in table and "±" in table
    # balanced accuracy and AUC of every victim, summarised and in the table
    run = std["protected"]["runs"][0]
    assert 0 <= run["final_balanced_accuracy"] <= 1 and 0 <= run["final_auc"] <= 1
    assert std["clean"]["auc_mean"] == pytest.approx(np.mean([r["final_auc"] for r in std["clean"]["runs"]]))
    assert "| balanced accuracy: protected / clean | AUC: protected / clean |" in table


@pytest.mark.integration
def test_evaluate_label_agnostic(protected_sample, sample_ds):
    test = ue.load_sample_dataset("test")
    vehicle = {0, 1, 8, 9}
    report = ue.evaluate(protected_sample, test, clean=sample_ds, victim="tinycnn", epochs=1, progress=False,
                         relabel=["cifar10-vehicles-animals", lambda c: c % 3], quality=False)  # fmt: skip
    # one report: the own labels first, then every relabelling, each with its own clean baseline
    assert [(r["labels"], r["num_classes"]) for r in report.results] == [("own", 10), ("cifar10-vehicles-animals", 2), ("<lambda>", 3)]
    assert report.config["relabelled"] and report.config["labellings"]["cifar10-vehicles-animals"] == {"num_classes": 2}
    assert report.results[1]["clean"]["curve_mean"] != report.results[0]["clean"]["curve_mean"]  # its own baseline
    table = report.to_markdown()
    assert "| labels (classes) | countermeasure |" in table and "| cifar10-vehicles-animals (2) | standard |" in table
    # the built-in named relabelling equals the same function, and refuses a dataset with other classes
    assert ue.evaluation.RELABELINGS["cifar10-vehicles-animals"](8) == 1 == int(8 in vehicle)
    other = protected_sample.cast_column("label", datasets.ClassLabel(names=[f"c{i}" for i in range(10)]))
    with pytest.raises(EvaluationError, match="is for the classes"):
        ue.evaluate(other, test.cast_column("label", other.features["label"]), victim="tinycnn", epochs=1,
                    relabel="cifar10-vehicles-animals", progress=False, quality=False)  # fmt: skip
    with pytest.raises(EvaluationError, match="unknown relabelling"):
        ue.evaluate(protected_sample, test, victim="tinycnn", epochs=1, relabel="nope", progress=False)
    # another label column than the protector saw
    coarse = lambda ds: ds.add_column("coarse", [int(c in vehicle) for c in ds["label"]])  # noqa: E731
    report = ue.evaluate(coarse(protected_sample), coarse(test), clean=coarse(sample_ds), victim="tinycnn", epochs=1,
                         label_column="coarse", progress=False, quality=False)  # fmt: skip
    assert report.config["label_column"] == "coarse" and report.config["num_classes"] == 2


@pytest.mark.unit
def test_evaluate_bad_input(protected_sample, sample_ds):
    test = ue.load_sample_dataset("test")
    kw = dict(victim="tinycnn", epochs=1, progress=False)
    with pytest.raises(EvaluationError, match="test set is empty"):
        ue.evaluate(protected_sample, test.select([]), **kw)
    renamed = test.cast_column("label", datasets.ClassLabel(names=[f"c{i}" for i in range(10)]))
    with pytest.raises(EvaluationError, match="label classes differ"):
        ue.evaluate(protected_sample, renamed, **kw)
    with pytest.raises(EvaluationError, match="outside"):
        ue.evaluate(protected_sample, test, num_classes=5, **kw)
    with pytest.raises(CountermeasureError, match="unknown countermeasure"):
        ue.evaluate(protected_sample, test, countermeasures=["sharpen"], **kw)
    with pytest.raises(EvaluationError, match="needs the clean"):
        ue.evaluate(protected_sample, test, countermeasures=["partial:0.5"], **kw)
    with pytest.raises(EvaluationError, match="rows"):
        ue.evaluate(protected_sample, test, clean=sample_ds.select(range(10)), **kw)
    no_label = test.remove_columns("label")
    with pytest.raises(EvaluationError, match="test set"):
        ue.evaluate(protected_sample, no_label, **kw)


@pytest.mark.integration
def test_cli_evaluate_after_protect(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", str(2**61 + 5))
    out = tmp_path / "out"
    assert main(["protect", "--method", "cuda", "--output", str(out), "--quiet"]) == 0
    ev = tmp_path / "eval"
    rc = main(["evaluate", "--protected", str(out), "--victim", "tinycnn", "--epochs", "1",
               "--countermeasures", "standard,grayscale", "--relabel", "cifar10-vehicles-animals",
               "--output", str(ev), "--quiet"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| own (10) | grayscale |" in printed and "| cifar10-vehicles-animals (2) | grayscale |" in printed
    report = json.loads((ev / "report.json").read_text())
    assert report["config"]["train_images"] == 500 and report["config"]["test_images"] == 100
    assert [r["labels"] for r in report["results"]] == ["own", "own", "cifar10-vehicles-animals", "cifar10-vehicles-animals"]
    assert main(["evaluate", "--protected", str(out), "--relabel", "nope", "--output", str(ev)]) == 2
    assert main(["evaluate", "--protected", str(out), "--countermeasures", "nope", "--output", str(ev)]) == 2


@pytest.mark.slow
@pytest.mark.integration
def test_readme_evaluate_example_runs_as_written(tmp_path, monkeypatch):
    from helpers import REPO

    text = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    example = next(b for b in blocks if "ue.evaluate(" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "eval" / "curves.png").is_file() and (tmp_path / "eval" / "table.md").is_file()


@pytest.mark.unit
def test_report_warns_when_the_clean_victim_learned_nothing():
    """A clean baseline at chance makes protected / clean meaningless: the table says so (and only then)."""
    from uexamples.evaluation.evaluate import EvaluationReport

    def side(acc, balanced):
        return {"final_mean": acc, "best_mean": acc, "balanced_mean": balanced, "auc_mean": 0.5}

    def report(clean_balanced):
        result = {"countermeasure": "standard", "num_classes": 10, "ratio": 0.94,
                  "protected": side(0.10, 0.10), "clean": side(0.11, clean_balanced)}  # fmt: skip
        return EvaluationReport(config={"victim": "tinycnn", "epochs": 1, "seeds": [0]}, quality=None, results=[result])

    assert "learned almost nothing" in report(0.12).to_markdown()
    assert "Warning" not in report(0.40).to_markdown()
