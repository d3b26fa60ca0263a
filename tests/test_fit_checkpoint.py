"""A fit interrupted part-way goes on from its checkpoint and ends with the same protector."""

import numpy as np
import pytest
import torch

import uexamples as ue
from helpers import TINY_MINMIN
from uexamples.core.checkpoint import FILENAME
from uexamples.methods.minmin import MinMinProtector

pytestmark = pytest.mark.unit
STEPS = dict(TINY_MINMIN, train_steps=9)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def sample():
    return ue.load_sample_dataset().select(range(160))


def interrupt_after(monkeypatch, model_steps: int) -> None:
    """Make the fit die (as a kill would) after ``model_steps`` surrogate updates."""
    original = MinMinProtector._model_phase
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        if calls["n"] == model_steps:
            raise Interrupted
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MinMinProtector, "_model_phase", dying)


def arrays(protector) -> dict[str, np.ndarray]:
    return protector._fitted_arrays()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ue.SEMProtect(seed=3, **STEPS),
        lambda: ue.EMProtect(seed=3, noise_type="class-wise", **STEPS),  # method state: the class noise
        lambda: ue.SEMProtect(seed=3, persistent_noise=True, **STEPS),  # loop state: every image's noise
        # 8 class-wise steps open the fit: the checkpoint at step 6 holds half-optimised class patterns, and the
        # resumed fit restarts every image's noise from them at step 8
        lambda: ue.SEMProtect(seed=3, persistent_noise=True, noise_start="class", class_start_epochs=1.6, **STEPS),
    ],
    ids=["sem", "em-classwise", "sem-persistent", "sem-class-start"],
)
def test_interrupted_fit_resumes_to_the_same_protector(sample, tmp_path, monkeypatch, make):
    reference = make().fit(sample, progress=False)

    with monkeypatch.context() as m:
        interrupt_after(m, 7)  # checkpoints after steps 3 and 6; dies in step 8
        with pytest.raises(Interrupted):
            make().fit(sample, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    saved = torch.load(tmp_path / FILENAME, weights_only=True)
    assert saved["step"] == 6

    resumed = make().fit(sample, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert resumed.fit_stats["resumed_at_step"] == 6 and resumed.fit_stats["steps"] == reference.fit_stats["steps"] >= 9
    ref, got = arrays(reference), arrays(resumed)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name], err_msg=name)
    assert not (tmp_path / FILENAME).exists()  # a finished fit leaves no checkpoint behind
    # and the protected images are the same
    rows = sample.select(range(8))
    a, b = rows.map(reference, batched=True), rows.map(resumed, batched=True)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))


def test_a_checkpoint_of_another_fit_is_refused(sample, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            ue.SEMProtect(seed=3, **STEPS).fit(sample, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint of a different fit"):
        ue.SEMProtect(seed=4, **STEPS).fit(sample, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        ue.SEMProtect(seed=3, **STEPS).fit(sample, progress=False, checkpoint_dir=tmp_path, checkpoint_every=0)
