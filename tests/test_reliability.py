"""Checkpoints, exact resume, a SIGKILLed worker under torchrun, damaged files, dead peers, bad config."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disttrain.checkpoint import CheckpointError, load_file
from disttrain.config import CONF_DIR, compose
from disttrain.train import _one_line, run
from workers import run_workers

ROOT = str(Path(__file__).resolve().parent.parent)
BASE = ["model=mlp", "train.batch_size=8", "train.eval_every=0", "train.log_every=5",
        "train.progress=false", "optim.lr=0.1", "data.train_utts=128", "data.eval_utts=16",
        "data.utt_len=16", "train.checkpoint_every=10"]
SYNCS = sorted(p.stem for p in Path(CONF_DIR, "sync").glob("*.yaml"))
# Small blocks and thresholds so every synchronizer has state mid-way.
SYNC_SETTINGS = {"bmuf": ["sync.sync_every=4"], "gtc": []}


def _params(run_dir):
    return torch.load(Path(run_dir) / "model.pt")


def _train(rank, world, run_dir, overrides):
    torch.set_num_threads(1)
    return run(compose(overrides), run_dir)


@pytest.mark.parametrize("sync", SYNCS)
def test_stopped_and_resumed_equals_uninterrupted(sync, tmp_path):
    overrides = BASE + [f"sync={sync}", *SYNC_SETTINGS.get(sync, [])]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    os.makedirs(whole), os.makedirs(parts)
    run_workers(_train, 2, whole, overrides + ["train.steps=30"])
    # Stop at 17 (mid-block for BMUF, residuals pending for GTC); the last checkpoint is step 17.
    run_workers(_train, 2, parts, overrides + ["train.steps=17"])
    summary = run_workers(_train, 2, parts, overrides + ["train.steps=30"])[0]
    a, b = _params(whole), _params(parts)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{sync}: resumed run differs"
    steps = [json.loads(line)["step"] for line in open(Path(parts) / "metrics.jsonl")]
    assert steps == [5, 10, 15, 17, 20, 25, 30]  # one record per step, none repeated
    assert summary["checkpoint_bytes"] > 0


def test_damaged_checkpoints_fall_back_or_stop(tmp_path, caplog):
    run_dir = str(tmp_path)
    run(compose(BASE + ["train.steps=20"]), run_dir)
    newest = tmp_path / "checkpoints" / "step-00000020" / "rank-00000.ckpt"
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_file(str(newest))
    caplog.set_level("INFO", logger="disttrain")
    run(compose(BASE + ["train.steps=30"]), run_dir)
    assert "falling back to an earlier checkpoint" in caplog.text
    assert "resuming from checkpoint step 10" in caplog.text
    reference = tmp_path / "reference"
    reference.mkdir()
    run(compose(BASE + ["train.steps=30"]), str(reference))
    a, b = _params(run_dir), _params(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # One flipped byte: the checksum catches it.
    ckpt = tmp_path / "checkpoints" / "step-00000030" / "rank-00000.ckpt"
    blob = bytearray(ckpt.read_bytes())
    blob[-100] ^= 0xFF
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_file(str(ckpt))

    # A checkpoint of another model is an error that says what to do, not a silent restart.
    with pytest.raises(CheckpointError, match="model_signature=.*train.resume=never"):
        run(compose(BASE + ["train.steps=40", "model.hidden=32"]), run_dir)


def test_finished_run_carries_on_with_more_steps(tmp_path):
    run(compose(BASE + ["train.steps=20"]), str(tmp_path))
    summary = run(compose(BASE + ["train.steps=20"]), str(tmp_path))  # nothing left to do
    assert summary["eval_acc"] == summary["eval_acc"]  # evaluated, not NaN
    run(compose(BASE + ["train.steps=30"]), str(tmp_path))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps[-1] == 30


def _torchrun(args, cwd, env_extra, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sigkilled_worker_is_restarted_and_resumes(tmp_path):
    overrides = BASE + ["train.steps=40", f"hydra.run.dir={tmp_path / 'run'}"]
    result = _torchrun(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                        str(Path(ROOT, "tests", "fault_entry.py")), *overrides], tmp_path,
                       {"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": "25"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint step 20" in result.stdout + result.stderr
    # Every checkpoint file on disk is whole; no temporary file was left behind.
    files = list((tmp_path / "run" / "checkpoints").rglob("*"))
    assert not [f for f in files if ".tmp-" in f.name]
    for f in files:
        if f.suffix == ".ckpt":
            load_file(str(f))
    # And the restarted run ends exactly where an uninterrupted one does.
    reference = tmp_path / "reference"
    reference.mkdir()
    run_workers(_train, 2, str(reference), BASE + ["train.steps=40"])
    a, b = _params(tmp_path / "run"), _params(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hung_peer_ends_the_job_within_the_timeout(tmp_path):
    overrides = BASE + ["train.steps=200", "comm.timeout_s=5", f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.perf_counter()
    result = _torchrun(["--standalone", "--nproc-per-node", "2",
                        str(Path(ROOT, "tests", "fault_entry.py")), *overrides], tmp_path,
                       {"FAULT": "stop", "FAULT_RANK": "1", "FAULT_STEP": "12"}, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "disttrain: error: " in result.stderr and "comm.timeout_s=5" in result.stderr
    assert elapsed < 90, elapsed


# At least 20 bad settings: each must stop before training with one line naming the key.
BAD_SETTINGS = [
    ("train.steps=0", "train.steps"),
    ("train.steps=ten", "train.steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.seed=abc", "train.seed"),
    ("train.eval_every=-5", "train.eval_every"),
    ("train.log_every=0", "train.log_every"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.resume=sometimes", "train.resume"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("+optim.nesterovv=true", "optim.nesterovv"),
    ("model.hidden=0", "model.hidden"),
    ("model.hidden=wide", "model.hidden"),
    ("+model.depth=3", "model.depth"),
    ("data.num_classes=7", "data.num_classes"),
    ("data.noise=-1", "data.noise"),
    ("data.noise=loud", "data.noise"),
    ("data.max_dur=2", "data.max_dur"),
    ("data.train_utts=0", "data.train_utts"),
    ("data.train_utts=4", "train.batch_size"),
    ("comm.timeout_s=0", "comm.timeout_s"),
    ("comm.backend=mpi", "comm.backend"),
    ("comm.device=tpu", "comm.device"),
    ("sync.bucket_mb=0", "sync.bucket_mb"),
    ("+sync.tau=0.1", "sync.tau"),  # a GTC setting given to the all-reduce synchronizer
]


@pytest.mark.parametrize("override, key", BAD_SETTINGS)
def test_bad_setting_gives_one_line_naming_the_key(override, key, tmp_path):
    with pytest.raises(Exception) as err:
        run(compose(BASE + ["train.steps=5", override]), str(tmp_path))
    line = _one_line(err.value)
    assert key in line, line
    assert not (tmp_path / "metrics.jsonl").exists()
