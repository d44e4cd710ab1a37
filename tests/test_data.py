"""The synthetic acoustic corpus, the on-disk feature loader and the batch stream."""
import numpy as np
import pytest
import torch

from disttrain.data import BatchStream, FeatureFiles, SyntheticAcoustic, write_feature_shards

SMALL = dict(num_classes=8, feat_dim=6, utt_len=20, train_utts=40, eval_utts=8)


def test_corpus_is_deterministic_and_seeded():
    a, b = SyntheticAcoustic(**SMALL), SyntheticAcoustic(**SMALL)
    assert torch.equal(a.train_set(0, 1).features, b.train_set(0, 1).features)
    assert torch.equal(a.eval_set().labels, b.eval_set().labels)
    c = SyntheticAcoustic(**SMALL, seed=99)
    assert not torch.equal(a.train_set(0, 1).features, c.train_set(0, 1).features)


def test_corpus_structure():
    corpus = SyntheticAcoustic(**SMALL)
    frames = corpus.train_set(0, 1)
    assert frames.features.shape == (40, 20, 6) and frames.features.dtype == torch.float32
    labels = frames.labels
    assert labels.min() >= 0 and labels.max() < 8
    # Segments last at least min_dur frames: label changes are rarer than every frame.
    changes = (labels[:, 1:] != labels[:, :-1]).float().mean()
    assert 1 / 10 - 0.05 < changes < 1 / 3 + 0.05
    # Every class appears; no class dominates (the majority baseline stays low).
    counts = torch.bincount(labels.reshape(-1), minlength=8).float()
    assert counts.min() > 0 and counts.max() / counts.sum() < 0.4


def test_shards_are_disjoint_and_cover_the_corpus():
    corpus = SyntheticAcoustic(**SMALL)
    whole = corpus.train_set(0, 1).features
    shards = [corpus.train_set(r, 3).features for r in range(3)]
    assert sum(len(s) for s in shards) == len(whole)
    assert torch.equal(torch.cat(shards).sort(dim=0).values, whole.sort(dim=0).values)
    assert not torch.equal(shards[0][:5], shards[1][:5])


def test_batch_stream_order_is_per_rank_and_resumable():
    frames = SyntheticAcoustic(**SMALL).train_set(0, 1)
    stream = BatchStream(frames, batch_size=6, seed=1, rank=0)
    seen = [next(stream)[1] for _ in range(9)]  # crosses an epoch boundary (40 // 6 = 6 per epoch)
    resumed = BatchStream(frames, batch_size=6, seed=1, rank=0)
    replay = BatchStream(frames, batch_size=6, seed=1, rank=0)
    for _ in range(4):
        next(replay)
    resumed.load_state_dict(replay.state_dict())
    assert all(torch.equal(next(resumed)[1], seen[i]) for i in range(4, 9))
    other_rank = BatchStream(frames, batch_size=6, seed=1, rank=1)
    assert not torch.equal(next(other_rank)[1], seen[0])


def test_feature_files_round_trip(tmp_path):
    corpus = SyntheticAcoustic(**SMALL)
    write_feature_shards(corpus.train_set(0, 1), str(tmp_path / "train"), num_shards=4)
    write_feature_shards(corpus.eval_set(), str(tmp_path / "eval"), num_shards=1)
    files = FeatureFiles(str(tmp_path / "train"), str(tmp_path / "eval"), num_classes=8, utt_len=20)
    assert files.feat_dim == 6
    assert torch.equal(files.eval_set().features, corpus.eval_set().features)
    # Shard files go round-robin to ranks; file i holds utterances i, i+4, ...
    rank1 = files.train_set(1, 2)
    expected = torch.cat([corpus.train_set(1, 4).features, corpus.train_set(3, 4).features])
    assert torch.equal(rank1.features, expected)


@pytest.mark.parametrize("arrays, message", [
    (dict(features=np.zeros((40, 6), np.float64), labels=np.zeros(40, np.int32)), "float32"),
    (dict(features=np.zeros((40, 6), np.float32), labels=np.zeros(39, np.int32)), "'labels' must be integers"),
    (dict(features=np.zeros((40, 6), np.float32), labels=np.full(40, 8, np.int32)), r"\[0, data.num_classes=8\)"),
    (dict(feats=np.zeros((40, 6), np.float32)), "cannot read it"),
])
def test_malformed_feature_files_name_the_file(tmp_path, arrays, message):
    for d in ("train", "eval"):
        (tmp_path / d).mkdir()
        np.savez(tmp_path / d / "a.npz", **arrays)
    with pytest.raises(ValueError, match=message) as err:
        FeatureFiles(str(tmp_path / "train"), str(tmp_path / "eval"), num_classes=8).train_set(0, 1)
    assert "a.npz" in str(err.value)


def test_missing_feature_dirs_and_too_many_workers(tmp_path):
    with pytest.raises(ValueError, match="data.train_dir='/nonexistent' is not a directory"):
        FeatureFiles("/nonexistent", str(tmp_path), num_classes=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .npz"):
        FeatureFiles(str(tmp_path / "empty"), str(tmp_path), num_classes=8)
    corpus = SyntheticAcoustic(**SMALL)
    write_feature_shards(corpus.train_set(0, 1), str(tmp_path / "train"), num_shards=2)
    files = FeatureFiles(str(tmp_path / "train"), str(tmp_path / "train"), num_classes=8, utt_len=20)
    with pytest.raises(ValueError, match="3 workers but data.train_dir has only 2 shards"):
        files.train_set(0, 3)
    with pytest.raises(ValueError, match="41 workers but data.train_utts=40"):
        corpus.train_set(0, 41)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=7), "data.num_classes must be an even number"),
    (dict(min_dur=0), "data.min_dur must be a positive integer"),
    (dict(min_dur=5, max_dur=4), "data.max_dur=4 must be >= data.min_dur=5"),
    (dict(tail=3), "data.tail=3 must be < data.min_dur=3"),
    (dict(noise=-1.0), "data.noise must be >= 0"),
])
def test_bad_corpus_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticAcoustic(**{**SMALL, **kwargs})


def test_shard_smaller_than_batch():
    frames = SyntheticAcoustic(**SMALL).train_set(0, 8)
    with pytest.raises(ValueError, match="fewer than train.batch_size=16"):
        BatchStream(frames, batch_size=16, seed=0)
