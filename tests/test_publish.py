"""Publishing end to end against a local HTTP server that speaks the Hub API to the real client."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from hub_server import LocalHub
from test_distributed import SCRIPT, script_env

pytestmark = pytest.mark.integration
KEY = "70412938475123"
REPO_ID = "tester/cifar-grey-cuda"


@pytest.fixture()
def local_hub():
    hub = LocalHub().start()
    yield hub
    hub.stop()


def hub_env(tmp_path, hub) -> dict:
    env = script_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1",
                     HF_HUB_DISABLE_TELEMETRY="1", UEXAMPLES_CUDA_KEY=KEY)  # fmt: skip
    env.pop("HF_HUB_OFFLINE")
    return env


def push(tmp_path, hub, out, source, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, SCRIPT, "--dataset", str(source), "--method", "cuda", "--quiet", "--output", str(out),
           "--push-to-hub", REPO_ID, *extra]  # fmt: skip
    return subprocess.run(cmd, env=hub_env(tmp_path, hub), capture_output=True, text=True, timeout=600)


@pytest.fixture()
def evaluation(tmp_path):
    import uexamples as ue

    train = ue.load_sample_dataset("train").select(range(100))
    test = ue.load_sample_dataset("test")
    report = ue.evaluate(train, test, clean=train, victim="tinycnn", epochs=1, progress=False, quality=False)
    return report.save(tmp_path / "eval")


def test_push_card_and_bit_exact_reload(tmp_path, local_hub, evaluation, grey_sample_repo):
    out = tmp_path / "out"
    res = push(tmp_path, local_hub, out, grey_sample_repo, ["--evaluation", str(evaluation)])
    assert res.returncode == 0, res.stderr[-3000:]
    files = local_hub.repos[REPO_ID].files
    assert {"README.md", "preview.png", "evaluation.png"} <= set(files)
    assert any(p.startswith("data/train-") and p.endswith(".parquet") for p in files)
    # the card: YAML metadata (license carried over from the source card) and an honest body
    text = files["README.md"].decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "cc-by-4.0"
    assert "unlearnable-examples" in meta["tags"]
    assert meta["uexamples"]["method"] == "cuda" and meta["uexamples"]["seed"] == 0
    assert meta["uexamples"]["source"] == "cifar-grey" and meta["uexamples"]["split"] == "train"
    assert meta["uexamples"]["epsilon"] is None and meta["uexamples"]["evaluated"] is True
    assert "dataset_info" in meta and "configs" in meta  # what push_to_hub wrote is kept
    assert "Never re-encode the images as JPEG" in text and "@inproceedings{sadasivan2023cuda" in text
    assert "![clean | protected | amplified noise](preview.png)" in text
    assert "| standard |" in text  # the evaluation table
    # no secret anywhere: not in a file, not in a request body, not in the output
    for blob in [*files.values(), *local_hub.bodies]:
        assert KEY.encode() not in blob and local_hub.token.encode() not in blob
    assert KEY not in res.stdout + res.stderr and local_hub.token not in res.stdout + res.stderr
    # load it back from the "Hub": bit-exact pixels
    check = textwrap.dedent(f"""
        import datasets, numpy as np
        hub = datasets.load_dataset("{REPO_ID}", split="train")
        local = datasets.load_from_disk("{out / 'dataset'}")
        assert len(hub) == len(local) == 120
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) and a.mode == b.mode == "L"
                   for a, b in zip(hub["image"], local["image"]))
        print("EQUAL" if same and hub["label"] == local["label"] else "DIFFERENT")
    """)
    loaded = subprocess.run([sys.executable, "-c", check], env=hub_env(tmp_path, local_hub), capture_output=True, text=True, timeout=300)
    assert loaded.stdout.strip().endswith("EQUAL"), loaded.stderr[-3000:]


@pytest.mark.parametrize(
    "pattern, status, message",
    [
        (r"POST /api/repos/create", 401, "refused the credentials (401)"),
        (r"GET /api/datasets/tester/[^/]+(/revision/[^/]+)?$", 404, "answered 404"),  # repo info, either API form
        (r"POST /api/datasets/.*/commit/", 500, "answered 500"),
        (r"PUT /lfs-upload/", None, "connection to the Hub failed"),
    ],
)  # fmt: skip
def test_hub_errors_are_clear_and_a_rerun_finishes(tmp_path, local_hub, pattern, status, message, grey_sample_repo):
    out = tmp_path / "out"
    local_hub.fail(pattern, status, times=50)  # persistent: the client's own retries also fail
    res = push(tmp_path, local_hub, out, grey_sample_repo)
    assert res.returncode == 3, res.stderr[-3000:]
    assert message in res.stderr and "local output is kept" in res.stderr
    assert "Traceback" not in res.stderr
    assert (out / "summary.json").is_file() and (out / "dataset").is_dir()  # nothing lost
    local_hub.faults.clear()
    again = push(tmp_path, local_hub, out, grey_sample_repo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to generate" in again.stdout
    files = local_hub.repos[REPO_ID].files
    assert "README.md" in files and json.dumps(sorted(files)).count("parquet") == 1


def test_card_template_ships_inside_the_package():
    """publish() must work from an installed wheel: the package links (and wheels copy) cards/dataset_card.md."""
    import uexamples as ue
    from uexamples.cards import TEMPLATE

    assert TEMPLATE.is_relative_to(Path(ue.__file__).parent)
    assert TEMPLATE.resolve() == (REPO / "cards" / "dataset_card.md").resolve()
    assert "{{ pretty_name }}" in TEMPLATE.read_text()


@pytest.mark.slow
def test_a_built_wheel_carries_the_card_template_and_the_sample(tmp_path):
    """Build the wheel, install it into an empty folder, and publish-render a card from there (not the repo)."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("uexamples-*.whl")
    import uexamples

    assert wheel.name.startswith(f"uexamples-{uexamples.__version__}-")  # one source for the version
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    check = textwrap.dedent("""
        import uexamples as ue
        from uexamples.cards import TEMPLATE, render_card
        assert "/site/" in ue.__file__, ue.__file__
        assert TEMPLATE.is_file() and not TEMPLATE.is_symlink()
        assert len(ue.load_sample_dataset()) == 500
        summary = {"method": "sem", "config": {"epsilon": 8 / 255, "seed": 0, "preset": "fast"}, "images": 500,
                   "source": {"dataset": None, "split": "train"}, "linf_levels": 8, "mean_psnr": 40.0, "mean_ssim": 0.99}
        card = render_card(summary, "someone/protected", license="mit")
        print("OK" if "liu2024stable" in card and "Never re-encode" in card else "BAD")
    """)
    env = dict(script_env(tmp_path), PYTHONPATH=str(site))
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.stdout.strip().endswith("OK"), res.stderr[-3000:]
    # the accelerate script comes with the wheel: `accelerate launch -m uexamples.hub_scripts.protect`, and a command
    script = subprocess.run([sys.executable, "-m", "uexamples.hub_scripts.protect", "--help"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert script.returncode == 0 and "--push-to-hub" in script.stdout, script.stderr[-3000:]
    entry = (site / f"uexamples-{uexamples.__version__}.dist-info" / "entry_points.txt").read_text()
    assert "uexamples-hub-protect = uexamples.hub_scripts.protect:main" in entry


def test_card_wording_follows_the_measured_visibility():
    from uexamples.cards import render_card

    base = {"method": "sem", "config": {"epsilon": 8 / 255, "seed": 0, "preset": "fast"}, "images": 10,
            "source": {"dataset": None, "split": "train"}, "linf_levels": 8}  # fmt: skip
    faint = render_card({**base, "mean_psnr": 32.1, "mean_ssim": 0.95}, "me/x", "mit")
    blur = render_card({**base, "method": "cuda", "mean_psnr": 19.0, "mean_ssim": 0.62}, "me/x", "mit")
    assert "People still see the same pictures" in faint and "visible" not in faint.split("## What was done")[0]
    assert "People still see" not in blur and "The change is **visible**" in blur and "19.00 dB" in blur


# ---------------------------------------------------------------------------------- protectors on the Hub
def _python(code: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)  # fmt: skip


def test_protectors_pushed_to_the_hub_load_back_by_repo_id_in_a_fresh_process(tmp_path, local_hub):
    """A fitted SEM and a CUDA protector go to model repos and come back by repo id, in another process,
    with identical output; the key and the token are in no uploaded file and no request; the model card
    names the method and what it was fitted on; offline, the cached copy loads."""
    env = hub_env(tmp_path, local_hub)
    common = f"""
        import numpy as np, uexamples as ue
        ds = ue.load_sample_dataset().select(range(40))
        def pixels(p):
            return np.stack([np.asarray(im, dtype=np.int16) for im in ds.map(p, batched=True)["image"]])
        KEY = {KEY}
    """
    pushed = _python(common + """
        sem = ue.SEMProtect(seed=1, surrogate="tinycnn", train_steps=3, train_batch_size=16, final_noise_steps=2).fit(ds, progress=False)
        print(sem.push_to_hub("tester/sem-protector"))
        cuda = ue.CUDAProtect(key=KEY, num_classes=10)
        cuda.push_to_hub("tester/cuda-protector", private=True)
        np.save("sem.npy", pixels(sem)); np.save("cuda.npy", pixels(cuda))
    """, env, tmp_path)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert {"protector_config.json", "protector.safetensors", "README.md"} <= set(local_hub.repos["models/tester/sem-protector"].files)
    loaded = _python(common + """
        sem = ue.Protector.from_pretrained("tester/sem-protector")
        cuda = ue.Protector.from_pretrained("tester/cuda-protector", key=KEY)
        assert type(sem).__name__ == "SEMProtect" and sem.fitted_on["rows"] == 40, sem.fitted_on
        assert (pixels(sem) == np.load("sem.npy")).all() and (pixels(cuda) == np.load("cuda.npy")).all()
        try:
            ue.Protector.from_pretrained("tester/cuda-protector")
        except ValueError as exc:
            assert "key" in str(exc)
        else:
            raise AssertionError("a CUDA protector loaded without its key")
        try:
            ue.Protector.from_pretrained("tester/nothing-here")
        except FileNotFoundError as exc:
            print("missing:", exc)
    """, env, tmp_path)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "neither a folder nor a model repository" in loaded.stdout
    offline = _python(common + """
        sem = ue.Protector.from_pretrained("tester/sem-protector")   # from the cache: HF_HUB_OFFLINE=1
        assert (pixels(sem) == np.load("sem.npy")).all()
    """, {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)  # fmt: skip
    assert offline.returncode == 0, offline.stderr[-3000:]
    secrets = (KEY.encode(), local_hub.token.encode())
    uploaded = [d for r in local_hub.repos.values() for d in r.files.values()] + list(local_hub.blobs.values())
    assert not any(s in d for s in secrets for d in uploaded)
    assert not any(KEY.encode() in b for b in local_hub.bodies)
    card = local_hub.repos["models/tester/sem-protector"].files["README.md"].decode()
    assert "library_name: uexamples" in card and "SEM" in card and "Fitted on" in card and "40 rows" in card
    assert "key=...)" in local_hub.repos["models/tester/cuda-protector"].files["README.md"].decode()


def test_publishing_from_python_gives_the_cli_card_and_a_cmyk_card_says_tiff(tmp_path, local_hub):
    """ue.publish(dataset, repo, protector=, source=) with no summary.json: the same card body as the CLI's for
    the same data, the preview uploaded, and CMYK images (stored as TIFF) named as such."""
    env = hub_env(tmp_path, local_hub)
    res = _python(f"""
        import json, uexamples as ue
        from uexamples.cards import render_card
        from uexamples.cli import main
        ds = ue.load_sample_dataset().select(range(24))
        ds = ds.map(lambda r: {{"image": r["image"].convert("CMYK")}})
        ds.save_to_disk("cmyk")
        cuda = ue.CUDAProtect(key={KEY}, num_classes=10)
        out = ds.map(cuda, batched=True)
        print(ue.publish(out, "tester/cmyk-protected", protector=cuda, source=ds, dataset_name="cmyk"))
        assert main(["protect", "--dataset", "cmyk", "--method", "cuda", "--num-classes", "10", "--output", "o", "--quiet"]) == 0
        summary = json.load(open("o/summary.json"))
        open("cli_card.md", "w").write(render_card(summary, "tester/cmyk-protected", "unknown"))
    """, env, tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    files = local_hub.repos["tester/cmyk-protected"].files
    assert "preview.png" in files and any(p.endswith(".parquet") for p in files)
    pushed = files["README.md"].decode()
    cli = (tmp_path / "cli_card.md").read_text()
    assert pushed.split("\n---\n", 1)[1].strip() == cli.split("\n---\n", 1)[1].strip()  # the body, word for word
    assert "(TIFF for CMYK)" in pushed and "uexamples:" in pushed
    assert KEY not in pushed


def test_several_splits_are_protected_together_and_published_in_one_repository(tmp_path, local_hub):
    """`uexamples protect --splits train,test`: fit on train, both splits protected into one DatasetDict with one
    summary and one card; publishing puts both splits in one repository, and they reload bit-exact."""
    env = hub_env(tmp_path, local_hub)
    res = _python(f"""
        import json, numpy as np, datasets, uexamples as ue
        from uexamples.cli import main
        from uexamples.hub import publish
        assert main(["protect", "--method", "cuda", "--num-classes", "10", "--splits", "train,test", "--output", "o",
                     "--quiet"]) == 0
        out = datasets.load_from_disk("o/dataset")
        assert set(out) == {{"train", "test"}}, out
        summary = json.load(open("o/summary.json"))
        assert summary["splits"] == {{"train": 500, "test": len(ue.load_sample_dataset("test"))}} and summary["split"] == "train"
        publish("o", "tester/two-splits")
        back = datasets.load_dataset("tester/two-splits")
        for s in ("train", "test"):
            assert np.array_equal(np.stack([np.asarray(i) for i in back[s]["image"]]),
                                  np.stack([np.asarray(i) for i in out[s]["image"]]))
        assert main(["evaluate", "--protected", "o", "--epochs", "1", "--output", "ev", "--quiet"]) == 0
    """, env, tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    files = local_hub.repos["tester/two-splits"].files
    assert any(p.startswith("data/train-") for p in files) and any(p.startswith("data/test-") for p in files)
    card = files["README.md"].decode()
    assert "splits `train` (500 images), `test`" in card and "fitted on `train`" in card


def test_a_streamed_run_uploads_each_shard_as_it_is_written(tmp_path, local_hub, grey_sample_repo):
    """hub_scripts/protect.py --streaming --push-to-hub: each finished parquet shard is uploaded (one commit each)
    and deleted, so the disk never holds the dataset; the card's configs point at the shards; the repo loads
    back by id with the pixels of a non-streamed run."""
    out = tmp_path / "out"
    res = push(tmp_path, local_hub, out, grey_sample_repo, ["--streaming", "--max-shard-size", "20KB"])
    assert res.returncode == 0, res.stderr[-3000:]
    repo = local_hub.repos[REPO_ID]
    shards = sorted(p for p in repo.files if p.startswith("data/"))
    assert len(shards) > 1 and all(p.startswith("data/train-") and p.endswith(".parquet") for p in shards)
    assert len(repo.commits) == len(shards) + 1  # a commit per shard as it was finished, then the card
    assert not list((out / "dataset").rglob("*.parquet"))  # uploaded shards left the disk
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_uploaded"] and summary["shards"] == [p.removeprefix("data/") for p in shards]
    meta = yaml.safe_load(repo.files["README.md"].decode().split("---")[1])
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_examples": 120}]
    for blob in [*repo.files.values(), *local_hub.bodies]:
        assert KEY.encode() not in blob and local_hub.token.encode() not in blob
    check = textwrap.dedent(f"""
        import datasets, numpy as np
        from uexamples.cli import main
        assert main(["protect", "--dataset", "{grey_sample_repo}", "--method", "cuda", "--quiet", "--output", "plain"]) == 0
        hub = datasets.load_dataset("{REPO_ID}", split="train")
        local = datasets.load_from_disk("plain/dataset")
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) and a.mode == b.mode == "L"
                   for a, b in zip(hub["image"], local["image"]))
        print("EQUAL" if same and len(hub) == 120 and hub["label"] == local["label"] else "DIFFERENT")
    """)
    loaded = subprocess.run([sys.executable, "-c", check], env=hub_env(tmp_path, local_hub), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert loaded.stdout.strip().endswith("EQUAL"), loaded.stderr[-3000:]


def test_a_streamed_output_is_published_from_its_folder(tmp_path, local_hub):
    """`uexamples protect --streaming` then `publish(folder)`: the shards are uploaded as they are."""
    env = hub_env(tmp_path, local_hub)
    res = _python(f"""
        import datasets, numpy as np
        from uexamples.cli import main
        from uexamples.hub import publish
        assert main(["protect", "--method", "cuda", "--num-classes", "10", "--streaming", "--max-shard-size", "100KB",
                     "--output", "o", "--quiet"]) == 0
        publish("o", "tester/streamed")
        back = datasets.load_dataset("tester/streamed", split="train")
        local = datasets.load_dataset("o/dataset", split="train")
        assert len(back) == 500 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back["image"], local["image"]))
    """, env, tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    files = local_hub.repos["tester/streamed"].files
    assert sorted(p for p in files if p.startswith("data/")) == sorted(
        f"data/{p.name}" for p in (tmp_path / "o" / "dataset" / "data").glob("*.parquet"))
