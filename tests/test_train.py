"""The Hydra training loop: config groups, the run directory contract, bad input, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from disttrain.comm import LocalCommunicator
from disttrain.config import CONF_DIR, ConfigError, compose
from disttrain.train import run
from workers import run_workers

# A seconds-long run: MLP on a small corpus.
LOOP = ["model=mlp", "train.steps=30", "train.batch_size=8", "train.eval_every=10",
        "train.log_every=5", "train.progress=false", "optim.lr=0.1"]
FAST = LOOP + ["data.train_utts=128", "data.eval_utts=16", "data.utt_len=16"]

SUMMARY_KEYS = {"sync", "world_size", "steps", "samples", "wall_s", "samples_per_s", "eval_loss",
                "eval_acc", "bytes_sent_per_step", "comm_s", "config"}


def _options(group):
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["sync", "model", "data", "optim", "comm"])
def test_every_group_option_composes_and_builds(group, tmp_path):
    for option in _options(group):
        cfg = compose([f"{group}={option}"])
        assert cfg[group]._target_
        if group == "data" and option == "features":
            continue  # needs files; built in test_feature_files_run below
        if group == "comm" and option != "torch":
            continue  # other communicators need their launcher (tests/test_mpi.py)
        if group == "sync":
            instantiate(cfg.sync, comm=LocalCommunicator())
        elif group == "model":
            instantiate(cfg.model, input_dim=4, num_classes=6)
        elif group == "optim":
            instantiate(cfg.optim)([torch.nn.Parameter(torch.ones(2))])
        else:
            instantiate(cfg[group])


def test_one_worker_run_writes_the_run_directory(tmp_path):
    summary = run(compose(FAST), str(tmp_path))
    assert SUMMARY_KEYS <= set(json.loads((tmp_path / "summary.json").read_text()))
    assert summary["world_size"] == 1 and summary["samples"] == 30 * 8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all({"samples", "train_loss", "wall_s", "bytes_sent", "comm_s"} <= set(r) for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20, 30]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    state = torch.load(tmp_path / "model.pt")
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def _run_in_worker(rank, world, run_dir, overrides):
    torch.set_num_threads(1)
    return run(compose(overrides), run_dir)


def test_two_workers_share_one_run_directory(tmp_path):
    summaries = run_workers(_run_in_worker, 2, str(tmp_path), FAST)
    assert summaries[0]["world_size"] == 2 and summaries[0]["samples"] == 30 * 8 * 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6  # one writer: rank 0
    # Each step all-reduces every gradient once, plus rank 0's initial broadcast, averaged
    # over the two workers.
    numel = sum(v.numel() for v in torch.load(tmp_path / "model.pt").values())
    assert summaries[0]["bytes_sent_per_step"] == pytest.approx(numel * 4 * (1 + 1 / 30 / 2))


def test_feature_files_run(tmp_path):
    from disttrain.data import SyntheticAcoustic, write_feature_shards

    corpus = SyntheticAcoustic(num_classes=8, feat_dim=6, utt_len=16, train_utts=64, eval_utts=8)
    write_feature_shards(corpus.train_set(0, 1), str(tmp_path / "train"), 4)
    write_feature_shards(corpus.eval_set(), str(tmp_path / "eval"), 1)
    cfg = compose(LOOP + ["data=features", f"data.train_dir={tmp_path / 'train'}",
                          f"data.eval_dir={tmp_path / 'eval'}", "data.num_classes=8", "data.utt_len=16"])
    summary = run(cfg, str(tmp_path))
    assert summary["eval_acc"] > 1 / 8  # learns something from files it read


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps must be an integer >= 1, got 0"),
    ("train.steps=abc", "train.steps must be an integer >= 1, got 'abc'"),
    ("train.batch_size=-4", "train.batch_size must be an integer >= 1"),
    ("train.log_every=0", "train.log_every must be an integer >= 1"),
    ("train.eval_every=-1", "train.eval_every must be an integer >= 0"),
    ("train.seed=1.5", "train.seed must be an integer"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=-0.1", "optim.lr must be a number > 0"),
    ("optim.momentum=1.0", r"optim.momentum must be a number in \[0, 1\)"),
])
def test_bad_training_settings(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(compose(FAST + [override]), str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()  # rejected before any work


@pytest.mark.parametrize("override, message", [
    ("data.train_utts=4", "fewer than train.batch_size=8"),
    ("model.hidden=0", "model.hidden must be a positive integer"),
    ("data=features", "Missing mandatory value: data.train_dir"),
])
def test_bad_component_settings(override, message, tmp_path):
    overrides = (LOOP if override.startswith("data=") else FAST) + [override]
    with pytest.raises(Exception, match=message):
        run(compose(overrides), str(tmp_path))


def test_unknown_option_and_key_are_named():
    with pytest.raises(MissingConfigException, match="sync/foo"):
        compose(["sync=foo"])
    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose(["train.stepz=3"])


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "disttrain.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
    result = _cli(FAST + ["train.batch_size=0", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "disttrain: error: train.batch_size must be an integer >= 1, got 0"


def test_torchrun_two_workers(tmp_path):
    """A real torchrun launch with no hydra.run.dir: both ranks must pick the same directory."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "disttrain.train", *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[:2000] + "\n...\n" + result.stderr[-2000:]
    run_dirs = list((tmp_path / "outputs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["bytes_sent_per_step"] > 0
    assert len((run_dirs[0] / "metrics.jsonl").read_text().splitlines()) == 6
    torch.load(run_dirs[0] / "model.pt")
