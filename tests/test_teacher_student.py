"""Teacher-student pieces: the top-k store, the soft-target loss, the schedules, the pipeline on 2 workers."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.comm import LocalCommunicator
from disttrain.config import CONF_DIR, compose
from disttrain.data import BatchStream, FrameSet
from disttrain.experiments import soft_targets as st
from disttrain.experiments.teacher_student import label, run_pipeline
from disttrain.train import run
from workers import run_workers


def test_topk_store_round_trip(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40) * 3
    indices, probs = st.topk_posteriors(logits, 20)
    assert indices.dtype == np.int16 and probs.dtype == np.float16 and indices.shape == (3, 5, 20)
    # Independent reference: sort the softmax, keep the 20 largest.
    ref_probs, ref_idx = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True)
    assert np.array_equal(indices, ref_idx[..., :20].numpy())
    assert np.array_equal(probs, ref_probs[..., :20].numpy().astype(np.float16))

    feats = torch.randn(3, 5, 7).numpy()
    path = tmp_path / "shard.npz"
    st.write_topk_shard(str(path), feats, indices, probs, np.arange(3))
    back = st.read_topk_shard(str(path), num_classes=40)
    assert back.features.dtype == torch.float32 and torch.equal(back.features, torch.from_numpy(feats))
    assert torch.equal(back.labels.indices, torch.from_numpy(indices).long())
    assert back.labels.probs.dtype == torch.float16 and torch.equal(back.labels.probs, torch.from_numpy(probs))
    assert sorted(os.listdir(tmp_path)) == ["shard.npz"]  # no temp file left
    assert st.bytes_per_frame(40, 20) == {"topk": 80, "dense": 160}
    assert st.index_dtype(40000) == np.int32 and st.bytes_per_frame(3000, 20)["dense"] == 12000
    with pytest.raises(ValueError, match="indices must lie in"):
        st.read_topk_shard(str(path), num_classes=10)


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "shard.npz"
    path.write_bytes(b"old")

    def half_then_crash(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        st.atomic_write(str(path), half_then_crash)
    assert sorted(os.listdir(tmp_path)) == ["shard.npz"] and path.read_bytes() == b"old"


def test_soft_target_loss_matches_explicit_sum():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 12, requires_grad=True)
    full = torch.softmax(torch.randn(2, 3, 12) * 2, -1)
    probs, indices = full.topk(5, dim=-1)
    targets = st.SoftTargets(indices, probs.half())
    loss = st.soft_target_loss(logits, targets)
    # Reference: a dense target that is the renormalised top-5, zero elsewhere; a loop over frames.
    total = 0.0
    for b in range(2):
        for t in range(3):
            dense = torch.zeros(12, dtype=torch.float64)
            p = probs[b, t].half().double()
            dense[indices[b, t]] = p / p.sum()
            total += -(dense * torch.log_softmax(logits[b, t].detach().double(), -1)).sum()
    assert float(loss.detach()) == pytest.approx(float(total / 6), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def _streams(schedule, every=4, total=20, seed=3):
    labelled = FrameSet(torch.arange(24.).view(24, 1, 1), torch.zeros(24, 1, dtype=torch.long))
    machine = FrameSet(-torch.arange(1., 41.).view(40, 1, 1),
                       st.SoftLabels(torch.zeros(40, 1, 2, dtype=torch.long), torch.ones(40, 1, 2).half()))
    return st.InterleavedStream(BatchStream(labelled, 4, seed), BatchStream(machine, 4, seed + 1),
                                schedule, every, total)


def _kinds(stream, n):
    return ["L" if not isinstance(next(stream)[1], st.SoftTargets) else "M" for _ in range(n)]


def test_interleaving_ratio_and_determinism():
    a, b = _streams("interleaved"), _streams("interleaved")
    draws_a = [next(a) for _ in range(20)]
    draws_b = [next(b) for _ in range(20)]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(draws_a, draws_b))  # same seed, same order
    kinds = ["M" if isinstance(t, st.SoftTargets) else "L" for _, t in draws_a]
    assert "".join(kinds) == "MMML" * 5
    # Labelled batches carry labelled features (>= 0), machine ones machine features (< 0).
    assert all((f >= 0).all() == (k == "L") for (f, _), k in zip(draws_a, kinds))
    other = _streams("interleaved", seed=4)
    assert not all(torch.equal(x[0], next(other)[0]) for x in draws_a)
    assert "".join(_kinds(_streams("interleaved", every=3), 9)) == "MMLMMLMML"


def test_separate_schedule_puts_labelled_batches_last():
    assert "".join(_kinds(_streams("separate", every=4, total=10), 12)) == "MMMMMMMMLLLL"
    # The same number of each kind as the interleaved schedule over train.steps.
    inter = [st.is_labelled_step("interleaved", 4, 10, s) for s in range(10)]
    sep = [st.is_labelled_step("separate", 4, 10, s) for s in range(10)]
    assert sum(inter) == sum(sep) == 2


def test_stream_resumes_where_it_stopped():
    a = _streams("interleaved")
    for _ in range(7):
        next(a)
    b = _streams("interleaved")
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(next(a)[0], next(b)[0]) for _ in range(10))


def test_bad_settings_name_the_key(tmp_path):
    labelled = st.LabelledAcoustic(labelled_utts=4, train_utts=8, eval_utts=2, utt_len=4)
    with pytest.raises(ValueError, match="data.schedule"):
        st.InterleavedData(labelled, schedule="both")
    with pytest.raises(ValueError, match="data.targets_dir"):
        st.InterleavedData(labelled, targets_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.labelled_every"):
        st.InterleavedData(labelled, labelled_every=0)
    with pytest.raises(ValueError, match="data.labelled_utts"):
        st.LabelledAcoustic(labelled_utts=8, train_utts=8)
    with pytest.raises(ValueError, match="data.targets_dir is not set"):
        st.InterleavedData(labelled).batches(0, 1, 2, 0)


def test_labelling_shards_per_rank_cover_the_unlabelled_split(tmp_path):
    corpus = ["data.labelled_utts=8", "data.train_utts=28", "data.eval_utts=4", "data.utt_len=8"]
    run(compose(["data=labelled", *corpus, "model=mlp", "train.steps=2", "train.batch_size=4",
                 "train.progress=false", "train.checkpoint_every=0"]), str(tmp_path))
    manifest = label(str(tmp_path), str(tmp_path / "t"), LocalCommunicator(), top_k=5, shards_per_rank=3)
    assert manifest["files"] == sorted(set(os.listdir(tmp_path / "t")) - {"manifest.json"})
    assert manifest["frames"] == 20 * 8 and manifest["bytes_per_frame_topk"] == 5 * 4
    utts = np.concatenate([np.load(tmp_path / "t" / f)["utts"] for f in manifest["files"]])
    assert sorted(utts) == list(range(8, 28))  # the unlabelled split, each utterance once
    from disttrain.experiments.soft_targets import LabelledAcoustic

    corpus_data = LabelledAcoustic(labelled_utts=8, train_utts=28, eval_utts=4, utt_len=8)
    with np.load(tmp_path / "t" / manifest["files"][1]) as shard:
        assert np.array_equal(shard["features"], corpus_data._generate()[0].features[shard["utts"]].numpy())


def _pipeline(rank, world, out_dir, sync):
    torch.set_num_threads(1)
    result = run_pipeline(out_dir, preset="tiny", sync=sync, overrides=["sync.sync_every=3"] if sync == "bmuf" else [])
    return result, sorted(os.listdir(os.path.join(out_dir, "targets")))


@pytest.mark.parametrize("sync", ["gtc", "bmuf"])
def test_pipeline_on_two_workers(sync, tmp_path):
    if not Path(CONF_DIR, "sync", f"{sync}.yaml").is_file():
        pytest.skip(f"conf/sync/{sync}.yaml is not there yet")
    (result, files), (none, files_1) = run_workers(_pipeline, 2, str(tmp_path), sync, timeout_s=110)
    assert none is None and files == files_1
    assert files == ["manifest.json", "topk-00000-000.npz", "topk-00000-001.npz",
                     "topk-00001-000.npz", "topk-00001-001.npz"]
    assert result["workers"] == 2 and result["sync"] == sync
    assert set(result["eval_acc"]) == {"teacher", "student_labelled", "student_interleaved", "student_separate"}
    assert all(0 <= a <= 1 for a in result["eval_acc"].values())
    assert result["storage"]["frames"] == 32 * 16 and result["storage"]["bytes_per_frame_topk"] == 80
    assert result["params"]["ratio"] > 2
    saved = json.loads((tmp_path / "teacher_student.json").read_text())
    assert saved["eval_acc"] == result["eval_acc"]
    for name in ("teacher", "student_interleaved"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["sync"] == sync
