"""hub_scripts/protect.py on real processes: two processes give what one gives; a killed run resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest

from helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real multi-process runs
SCRIPT = str(REPO / "hub_scripts" / "protect.py")
FAST_SEM = ["--method", "sem", "--train-steps", "6", "--quiet"]


def script_env(tmp_path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # fmt: skip
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(folder) -> tuple[np.ndarray, list]:
    ds = datasets.load_from_disk(str(folder / "dataset"))
    return np.stack([np.asarray(im, dtype=np.int16) for im in ds["image"]]), ds["label"]


def run(cmd, env, timeout=600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, default chunking."""
    tmp = tmp_path_factory.mktemp("one")
    run([sys.executable, SCRIPT, *FAST_SEM, "--output", str(tmp / "out")], script_env(tmp))
    return tmp / "out"


def test_two_processes_give_the_same_dataset(one_process, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), SCRIPT, *FAST_SEM, "--chunk-size", "70", "--map-batch-size", "32",
           "--output", str(out)]  # fmt: skip
    run(cmd, script_env(tmp_path, ACCELERATE_USE_CPU="1"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["chunks"] == 8 and summary["images"] == 500
    assert summary["chunks_reused"] == 0
    a, la = pixels(one_process)
    b, lb = pixels(out)
    assert la == lb and a.shape == b.shape
    diff = np.abs(a - b)
    # same surrogate and same noise; floating-point summation order may move a few values by one level
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert np.abs(a - pixels_source()).max() > 0  # and it is protected
    # after success the work folder holds only the run's identity (no second copy of the dataset), and the
    # same command on two processes knows the output is complete
    assert [p.name for p in out.with_name("two.work").iterdir()] == ["run.json"]
    again = run(cmd, script_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert "nothing to generate" in again.stdout and np.array_equal(pixels(out)[0], b)


def test_persistent_noise_is_the_same_on_two_processes(tmp_path):
    """Each process computes its rows of a global fit batch; with persistent_noise every process must keep every
    row's noise (gathered), or the next visit of a row another process computed starts elsewhere."""
    args = [SCRIPT, "--method", "sem", "--train-steps", "12", "--persistent-noise", "--quiet"]  # 500 rows: 3 epochs
    run([sys.executable, *args, "--output", str(tmp_path / "one")], script_env(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), *args, "--output", str(tmp_path / "two")]  # fmt: skip
    run(cmd, script_env(tmp_path, ACCELERATE_USE_CPU="1"))
    a, _ = pixels(tmp_path / "one")
    b, _ = pixels(tmp_path / "two")
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def pixels_source() -> np.ndarray:
    import uexamples as ue

    return np.stack([np.asarray(im, dtype=np.int16) for im in ue.load_sample_dataset()["image"]])


def test_killed_run_resumes_and_ends_with_the_same_dataset(one_process, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, SCRIPT, *FAST_SEM, "--chunk-size", "50", "--map-batch-size", "25", "--output", str(out)]
    env = script_env(tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    chunks = out.with_name("resumed.work") / "chunks"
    deadline = time.time() + 400
    while not (chunks / "chunk-000002").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill, mid-map
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    done_before = sorted(p.name for p in chunks.iterdir() if not p.name.endswith(".tmp"))
    assert 3 <= len(done_before) < 10
    # a different argument is refused instead of mixing two runs
    other = subprocess.run([*cmd[:-2], "--seed", "1", "--output", str(out)], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "other arguments" in other.stderr
    run(cmd, env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fit_seconds"] == 0  # the fit checkpoint was reused
    assert [p.name for p in out.with_name("resumed.work").iterdir()] == ["run.json"]  # no second copy left behind
    assert summary["chunks_reused"] >= len(done_before)
    a, la = pixels(one_process)
    b, lb = pixels(out)
    assert la == lb and np.array_equal(a, b)
    # a finished output is not generated again
    again = run(cmd, env)
    assert "nothing to generate" in again.stdout


def test_run_killed_during_the_fit_goes_on_from_the_fit_checkpoint(tmp_path):
    args = [sys.executable, SCRIPT, "--method", "sem", "--train-steps", "24", "--quiet", "--fit-checkpoint-steps", "5"]
    env = script_env(tmp_path)
    reference = tmp_path / "reference"
    run([*args, "--output", str(reference)], env)

    out = tmp_path / "resumed"
    proc = subprocess.Popen([*args, "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    checkpoint = out.with_name("resumed.work") / "fit-progress" / "fit-checkpoint.pt"
    deadline = time.time() + 400
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill, mid-fit
    proc.wait()
    assert not (out.with_name("resumed.work") / "fit").exists(), "the fit finished before it could be killed"
    run([*args, "--output", str(out)], env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fit"]["resumed_at_step"] >= 5 and summary["fit"]["steps"] == 24
    assert json.loads((reference / "summary.json").read_text())["fit"]["resumed_at_step"] == 0
    assert not checkpoint.exists()
    a, la = pixels(reference)
    b, lb = pixels(out)
    assert la == lb and np.array_equal(a, b)


def test_uc_on_two_processes_shards_encoding_and_clusters(tmp_path):
    """UC: each process encodes half the images, K-means runs on the main process, clusters' perturbations
    are trained where ``k % processes == rank``; the dataset equals the one-process run."""
    uc = ["--method", "uc", "--clusters", "4", "--min-min-steps", "4", "--quiet"]  # fast: min-min on the clusters
    run([sys.executable, SCRIPT, *uc, "--output", str(tmp_path / "one")], script_env(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), SCRIPT, *uc, "--chunk-size", "128", "--output", str(tmp_path / "two")]  # fmt: skip
    run(cmd, script_env(tmp_path, ACCELERATE_USE_CPU="1"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["fit"]["processes"] == 2 and summary["method"] == "uc"
    a, _ = pixels(tmp_path / "one")
    b, _ = pixels(tmp_path / "two")
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert np.abs(a - pixels_source()).max() > 0


def test_salm_on_two_processes_gives_the_one_process_dataset(tmp_path):
    """SALM through the engine's data-parallel fit (fixed fit shards) and the sharded map: the same masks
    and noise as on one process, so the same dataset; nothing changed outside a 10 % mask."""
    salm = ["--method", "salm", "--train-steps", "4", "--mask-ratio", "0.1", "--quiet"]
    run([sys.executable, SCRIPT, *salm, "--output", str(tmp_path / "one")], script_env(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), SCRIPT, *salm, "--chunk-size", "128", "--output", str(tmp_path / "two")]  # fmt: skip
    run(cmd, script_env(tmp_path, ACCELERATE_USE_CPU="1"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["method"] == "salm"
    a, _ = pixels(tmp_path / "one")
    b, _ = pixels(tmp_path / "two")
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    changed = (a != pixels_source()).any(-1)  # (N, H, W): pixels with any channel changed
    assert 0 < changed.mean() <= 0.1 and changed.sum((1, 2)).max() <= round(0.1 * 32 * 32)
