"""BMUF against independent references (torch's averager, an outer torch SGD, the all-reduce
baseline), with real gloo workers that each see different data."""
import io
import json

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.testing import assert_close

from disttrain.comm import LocalCommunicator, TorchCommunicator
from disttrain.config import compose
from disttrain.sync.allreduce import AllReduce
from disttrain.sync.bmuf import BMUF
from disttrain.train import run
from workers import run_workers

LR = 0.1


def _model(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def _batch(rank, step):
    # Different data on every rank and every step: nothing passes with the sync switched off.
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64))


def _local_step(model, optimizer, rank, step):
    x, y = _batch(rank, step)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _flat(model):
    return torch.cat([t.detach().reshape(-1).clone() for t in list(model.parameters()) + list(model.buffers())
                      if t.is_floating_point()])


def _bmuf_run(rank, world, steps, momentum, sync_kwargs, batches=None):
    """Trajectory (flat model after every step, then after finish()) and stats of one rank."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    comm = TorchCommunicator() if world else LocalCommunicator()
    sync = BMUF(comm, **sync_kwargs)
    trajectory = []
    with sync.attach(model, optimizer):
        for step in range(1, (batches[rank] if batches else steps) + 1):
            _local_step(model, optimizer, rank, step)
            trajectory.append(_flat(model))
        sync.finish()
    trajectory.append(_flat(model))
    return trajectory, sync.stats()


def _reference(world, steps, momentum, tau, eta, zeta, variant, batches=None):
    """BMUF as an outer torch.optim.SGD on the pseudo-gradient W_g - Wbar (fairseq's NBM by its
    own formula), N models in one process; a partial last block is plainly averaged."""
    batches = batches or [steps] * world
    models = [_model() for _ in range(world)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=momentum) for m in models]
    global_params = [p.detach().clone().requires_grad_() for p in models[0].parameters()]
    if variant == "fairseq_nesterov":
        delta = [torch.zeros_like(p) for p in global_params]
    else:
        outer = torch.optim.SGD(global_params, lr=zeta, momentum=eta, nesterov=variant == "nesterov")
    trajectories = [[] for _ in range(world)]
    mid_block = [False] * world

    def average():
        with torch.no_grad():
            return [torch.stack(ps).mean(0) for ps in zip(*(m.parameters() for m in models))]

    def restart_blocks():
        with torch.no_grad():
            for m, opt in zip(models, optimizers):
                for p, gp in zip(m.parameters(), global_params):
                    p.copy_(gp)
                    if "momentum_buffer" in opt.state[p]:
                        opt.state[p]["momentum_buffer"].zero_()
        mid_block[:] = [False] * world

    for step in range(1, max(batches) + 1):
        for r in range(world):
            if step <= batches[r]:
                _local_step(models[r], optimizers[r], r, step)
                mid_block[r] = True
        if step % tau == 0:
            with torch.no_grad():
                for i, (gp, mean) in enumerate(zip(global_params, average())):
                    if variant == "fairseq_nesterov":  # D = eta D + zeta G;  W_g += (1 + eta) D
                        delta[i].mul_(eta).add_(mean - gp, alpha=zeta)
                        gp.add_(delta[i], alpha=1 + eta)
                    else:
                        gp.grad = gp.detach() - mean
            if variant != "fairseq_nesterov":
                outer.step()
            restart_blocks()
        for r in range(world):
            if step <= batches[r]:
                trajectories[r].append(_flat(models[r]))
    if any(mid_block):
        with torch.no_grad():
            for gp, mean in zip(global_params, average()):
                gp.copy_(mean)
        restart_blocks()
    for r in range(world):
        trajectories[r].append(_flat(models[r]))
    return trajectories


def _close(a, b):
    assert_close(a, b, rtol=0, atol=1e-12)


def test_no_block_momentum_is_torch_periodic_model_averager():
    tau, steps = 4, 13

    def both(rank, world):
        model, reference = _model(), _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
        averager = PeriodicModelAverager(period=tau, warmup_steps=tau - 1)
        ours, theirs = [], []
        with BMUF(TorchCommunicator(), sync_every=tau, block_momentum=0.0, block_lr=1.0,
                  local_momentum="keep").attach(model, optimizer):
            for step in range(1, steps + 1):
                _local_step(model, optimizer, rank, step)
                _local_step(reference, ref_optimizer, rank, step)
                averager.average_parameters(reference.parameters())
                ours.append(_flat(model))
                theirs.append(_flat(reference))
        return ours, theirs

    results = run_workers(both, 2)
    for ours, theirs in results:
        for a, b in zip(ours, theirs):
            # float64 rounding only: W_g + (Wbar - W_g) is not always bitwise Wbar (seen: 1e-16)
            assert_close(a, b, rtol=0, atol=1e-15)
    assert not torch.equal(results[0][0][-1], results[1][0][-1])  # mid-block: the ranks differ


@pytest.mark.parametrize("variant", ["classical", "nesterov", "fairseq_nesterov"])
def test_block_momentum_is_an_outer_sgd(variant):
    # 3 workers, 11 steps in blocks of 3: three filtered syncs, then a partial block averaged.
    kwargs = dict(sync_every=3, block_momentum=0.6, block_lr=1.3, variant=variant)
    results = run_workers(_bmuf_run, 3, 11, 0.9, kwargs)
    reference = _reference(3, 11, 0.9, 3, 0.6, 1.3, variant)
    for rank, (trajectory, stats) in enumerate(results):
        assert len(trajectory) == len(reference[rank]) == 12
        for a, b in zip(trajectory, reference[rank]):
            _close(a, b)
        assert stats["syncs"] == 4
        assert torch.equal(trajectory[-1], results[0][0][-1])


def test_variants_differ():
    runs = {v: run_workers(_bmuf_run, 2, 9, 0.0, dict(sync_every=3, block_momentum=0.5, variant=v))[0][0][-1]
            for v in ("classical", "nesterov", "fairseq_nesterov")}
    assert (runs["classical"] - runs["nesterov"]).abs().max() > 1e-6
    assert (runs["nesterov"] - runs["fairseq_nesterov"]).abs().max() > 1e-6


def test_every_step_averaging_is_gradient_all_reduce():
    def both(rank, world):
        model, baseline = _model(), _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        base_optimizer = torch.optim.SGD(baseline.parameters(), lr=LR)
        bmuf = BMUF(TorchCommunicator(), sync_every=1, block_momentum=0.0, block_lr=1.0)
        ours, theirs = [], []
        with bmuf.attach(model, optimizer), AllReduce(TorchCommunicator()).attach(baseline, base_optimizer):
            for step in range(1, 9):
                _local_step(model, optimizer, rank, step)
                _local_step(baseline, base_optimizer, rank, step)
                ours.append(_flat(model))
                theirs.append(_flat(baseline))
        return ours, theirs

    for ours, theirs in run_workers(both, 2):
        for a, b in zip(ours, theirs):
            _close(a, b)


def test_replicas_equal_after_syncs_only_and_start_from_rank_0():
    tau, steps = 4, 12

    def worker(rank, world):
        model = _model(seed=rank, batchnorm=True)  # differently initialised ranks
        initial = _flat(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        sync = BMUF(TorchCommunicator(), sync_every=tau, bucket_mb=0.0005)
        before, after = [], []
        optimizer.register_step_post_hook(lambda *_: before.append(_flat(model)))  # runs before the sync's hook
        with sync.attach(model, optimizer):
            broadcast = _flat(model)
            for step in range(1, steps + 1):
                _local_step(model, optimizer, rank, step)
                after.append(_flat(model))
        return initial, broadcast, before, after, sync.stats()

    (init0, bc0, before0, after0, stats), (init1, bc1, before1, after1, _) = run_workers(worker, 2)
    assert not torch.equal(init0, init1) and torch.equal(bc0, init0) and torch.equal(bc1, init0)
    for step in range(1, steps + 1):
        i = step - 1
        if step % tau == 0:
            assert torch.equal(after0[i], after1[i]), f"ranks differ after the sync at step {step}"
            assert (after0[i] - before0[i]).abs().max() > 1e-6, f"the sync at step {step} changed nothing"
            assert (after1[i] - before1[i]).abs().max() > 1e-6
        else:
            assert torch.equal(after0[i], before0[i])  # no exchange mid-block
            assert (after0[i] - after1[i]).abs().max() > 1e-6, f"ranks equal mid-block at step {step}"
    model_bytes = after0[0].numel() * 8  # parameters and BatchNorm's running statistics, float64
    bucket = int(0.0005 * 2**20)
    assert stats["syncs"] == steps // tau and stats["bytes_per_block"] == model_bytes + 16
    assert stats["collectives_per_block"] == 1 + -(-model_bytes // bucket)
    assert stats["bytes_per_step_amortised"] == (model_bytes + 16) / tau


def test_one_worker_applies_the_block_filter():
    # fairseq's BMUF does nothing on one worker; here the equations hold for N = 1 as well.
    for variant in ("classical", "nesterov"):
        kwargs = dict(sync_every=3, block_momentum=0.5, block_lr=1.0, variant=variant)
        trajectory, _ = _bmuf_run(0, 0, 9, 0.9, kwargs)
        for a, b in zip(trajectory, _reference(1, 9, 0.9, 3, 0.5, 1.0, variant)[0]):
            _close(a, b)
        plain, _ = _bmuf_run(0, 0, 9, 0.9, dict(kwargs, block_momentum=0.0, local_momentum="keep"))
        assert torch.equal(plain[1], trajectory[1])  # inside the first block: plain SGD
        assert (plain[-1] - trajectory[-1]).abs().max() > 1e-6


def test_resume_mid_block_is_bitwise():
    steps, stop = 11, 6  # blocks of 4: stop 2 steps into the second block
    kwargs = dict(sync_every=4, block_momentum=0.5, local_momentum="keep")

    def worker(rank, world):
        straight, _ = _bmuf_run(rank, world, steps, 0.9, kwargs)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        sync = BMUF(TorchCommunicator(), **kwargs)
        with sync.attach(model, optimizer):
            for step in range(1, stop + 1):
                _local_step(model, optimizer, rank, step)
        checkpoint = io.BytesIO()  # each rank saves its own: mid-block the replicas differ
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "sync": sync.state_dict()}, checkpoint)
        checkpoint.seek(0)
        state = torch.load(checkpoint)
        model = _model(seed=99)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        sync = BMUF(TorchCommunicator(), **kwargs)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sync.load_state_dict(state["sync"])  # before attach: set up keeps this rank's model
        resumed = []
        with sync.attach(model, optimizer):
            for step in range(stop + 1, steps + 1):
                _local_step(model, optimizer, rank, step)
                resumed.append(_flat(model))
            sync.finish()
        resumed.append(_flat(model))
        return straight[stop:], resumed, state["sync"]

    for straight, resumed, state in run_workers(worker, 2):
        assert state["block_step"] == 2 and state["steps"] == stop and state["block_delta"].abs().max() > 0
        assert len(straight) == len(resumed) == steps - stop + 1
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_uneven_data_does_not_hang_and_every_rank_syncs_alike():
    # Rank 0 has 13 batches, rank 1 only 6; blocks of 4. Rank 1 follows the syncs at steps 8
    # and 12 from finish(), then both average rank 0's partial block.
    batches = [13, 6]
    kwargs = dict(sync_every=4, block_momentum=0.5, variant="nesterov")
    results = run_workers(_bmuf_run, 2, None, 0.9, kwargs, batches, timeout_s=60, collective_timeout_s=20)
    reference = _reference(2, None, 0.9, 4, 0.5, 1.0, "nesterov", batches)
    for rank, (trajectory, stats) in enumerate(results):
        assert stats["syncs"] == 4 and stats["steps"] == batches[rank]
        for a, b in zip(trajectory, reference[rank]):
            _close(a, b)
    assert torch.equal(results[0][0][-1], results[1][0][-1])


@pytest.mark.parametrize("key, value, message", [
    ("sync_every", 0, "sync.sync_every must be an integer >= 1"),
    ("sync_every", 2.5, "sync.sync_every"),
    ("block_momentum", 1.0, r"sync.block_momentum must be in \[0, 1\)"),
    ("block_momentum", -0.1, "sync.block_momentum"),
    ("block_lr", 0, "sync.block_lr must be a number > 0"),
    ("warmup_steps", -1, "sync.warmup_steps must be an integer >= 0"),
    ("local_momentum", "zero", "sync.local_momentum='zero': valid values are reset, keep, average"),
    ("variant", "nbm", "sync.variant='nbm': valid values are classical, nesterov, fairseq_nesterov"),
    ("bucket_mb", 0, "sync.bucket_mb must be > 0"),
])
def test_bad_input(key, value, message):
    with pytest.raises(ValueError, match=message):
        BMUF(LocalCommunicator(), **{key: value})


def test_local_momentum_policies():
    def worker(rank, world, policy):
        model = _model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        with BMUF(TorchCommunicator(), sync_every=2, local_momentum=policy).attach(model, optimizer):
            for step in (1, 2):
                _local_step(model, optimizer, rank, step)
        return [dict(optimizer.state[p]) for p in model.parameters()]

    reset = run_workers(worker, 2, "reset")
    for state in reset[0]:
        assert not state["exp_avg"].any() and state["exp_avg_sq"].any() and state["step"] == 2
    averaged = run_workers(worker, 2, "average")
    kept = run_workers(worker, 2, "keep")
    for a0, a1, k0, k1 in zip(*averaged, *kept):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a0[key], a1[key])
            _close(a0[key], (k0[key] + k1[key]) / 2)
            assert (k0[key] - k1[key]).abs().max() > 0


def test_warmup_all_reduces_gradients_then_starts_the_first_block():
    def worker(rank, world):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        sync = BMUF(TorchCommunicator(), sync_every=3, warmup_steps=2)
        trajectory = []
        with sync.attach(model, optimizer):
            for step in range(1, 7):
                _local_step(model, optimizer, rank, step)
                trajectory.append(_flat(model))
        return trajectory, sync.stats()

    (t0, stats), (t1, _) = run_workers(worker, 2)
    assert [torch.equal(a, b) for a, b in zip(t0, t1)] == [True, True, False, False, True, False]
    assert stats["syncs"] == 1


def test_training_loop_writes_bmuf_stats(tmp_path):
    overrides = ["sync=bmuf", "sync.sync_every=5", "model=mlp", "train.steps=20", "train.batch_size=4",
                 "train.eval_every=0", "train.log_every=5", "train.progress=false", "optim.lr=0.1",
                 "data.train_utts=64", "data.eval_utts=8", "data.utt_len=8"]
    run_workers(lambda rank, world: run(compose(overrides), str(tmp_path))["eval_loss"], 2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sync"] == "bmuf" and summary["world_size"] == 2
    stats = summary["stats"]
    assert stats["syncs"] == 4 and stats["collectives_per_block"] == 2 and stats["block_position"] == 0
    model_bytes = stats["bytes_per_block"] - 16
    assert stats["bytes_per_step_amortised"] == stats["bytes_per_block"] / 5
    # mean over the 2 workers of: rank 0's broadcast, four syncs, and finish()'s control word
    # (nobody mid-block: no exchange)
    assert summary["bytes_sent_per_step"] == (model_bytes / 2 + 4 * (model_bytes + 16) + 16) / 20
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["syncs"] for r in records] == [1, 2, 3, 4]
