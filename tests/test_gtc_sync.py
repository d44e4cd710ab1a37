"""The GTC synchronizer with real gloo workers: conservation, identical replicas, options, errors."""
import json
import os

import pytest
import torch
from torch import nn

from disttrain.comm import LocalCommunicator, TorchCommunicator
from disttrain.gtc import NonFiniteGradientError
from disttrain.models import FrameMLP, frame_loss
from disttrain.sync import AllReduce
from disttrain.sync.gtc import GTC
from workers import run_workers

# The first optimizer built imports torch._dynamo (seconds); do it once here, before the forks.
torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)

TAU = 2.0**-2  # power of two: tau / N is exact for N = 1, 2, 4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(6, 5))
        self.bias = nn.Parameter(torch.zeros(7))


def _dyadic(rank, step, shape):
    # Multiples of 2^-10 in [-1, 1): every sum in the test is exact in float32 and float64.
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(-1024, 1024, shape, generator=g).float() / 1024


def _drive(sync, model, optimizer, rank, steps, start=0):
    """Hand-set gradients, take SGD(lr=1) steps; returns raw gradient and applied-move sums (float64)."""
    raw = [torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()]
    moved = [torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()]
    for step in range(start, start + steps):
        before = [p.detach().clone() for p in model.parameters()]
        for i, p in enumerate(model.parameters()):
            p.grad = _dyadic(rank, 100 * step + i, p.shape)
            raw[i] += p.grad.double()
        optimizer.step()
        for i, p in enumerate(model.parameters()):
            moved[i] += (before[i] - p.detach()).double()
    return raw, moved


def _conservation(rank, world, domain, steps):
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    sync = GTC(TorchCommunicator(), tau=TAU, domain=domain)
    with sync.attach(model, optimizer):
        raw, moved = _drive(sync, model, optimizer, rank, steps)
    residual = [v.view(p.shape).double() for v, p in zip(sync.residual.views, model.parameters())]
    return raw, moved, residual, [p.detach().clone() for p in model.parameters()], sync.stats()


def _simulate(world, steps, shapes):
    """An independent float64 GTC: what every rank's move and residual must be."""
    residual = [[torch.zeros(s, dtype=torch.float64) for s in shapes] for _ in range(world)]
    moved = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for step in range(steps):
        for i, shape in enumerate(shapes):
            decoded = torch.zeros(shape, dtype=torch.float64)
            for k in range(world):
                r = residual[k][i]
                r += _dyadic(k, 100 * step + i, shape).double()
                sent = torch.where(r >= TAU, 1.0, torch.where(r <= -TAU, -1.0, 0.0)).double()
                r -= sent * TAU
                decoded += sent * TAU
            moved[i] += decoded / world
    return moved, residual


@pytest.mark.parametrize("world,domain", [(1, "gradient"), (4, "gradient"), (2, "update")])
def test_conservation_is_exact(world, domain):
    steps = 40
    results = run_workers(_conservation, world, domain, steps)
    shapes = [(6, 5), (7,)]
    want_moved, want_residual = _simulate(world, steps, shapes)
    sign = 1.0 if domain == "gradient" else -1.0  # the update domain thresholds -lr * g
    for i in range(len(shapes)):
        raw_sum = sum(r[0][i] for r in results)
        residual_sum = sum(r[2][i] for r in results)
        for rank, (_, moved, residual, params, _) in enumerate(results):
            assert torch.equal(moved[i], want_moved[i]), f"rank {rank} param {i} moved differently"
            assert torch.equal(sign * residual[i], want_residual[rank][i])
            assert torch.equal(params[i], results[0][3][i])
        # N * sum_t d_t == sum_k sum_t g_k,t - sum_k r_k, exactly
        assert torch.equal(world * results[0][1][i], raw_sum - sign * residual_sum)
        assert residual_sum.abs().max() > 0 and results[0][1][i].abs().max() > 0  # not vacuous
    stats = results[0][4]
    assert stats["conserving"] is True and 0 < stats["density_mean"] < 1


def _train_mlp(rank, world, steps, gtc_kwargs, lr=0.3):
    torch.manual_seed(rank)  # different init per rank: attach must broadcast rank 0's
    model = FrameMLP(5, 7, hidden=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    sync = GTC(TorchCommunicator(), **gtc_kwargs)
    g = torch.Generator().manual_seed(50 + rank)  # different data per rank
    words = []
    with sync.attach(model, optimizer):
        for _ in range(steps):
            x, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 7, (8, 3), generator=g)
            optimizer.zero_grad(set_to_none=True)
            frame_loss(model(x), y).backward()
            optimizer.step()
            words.append(sync.stats()["words_last_step"])
    return [p.detach().clone() for p in model.parameters()], words, sync.stats()


@pytest.mark.parametrize("world", [2, 4])
def test_replicas_bitwise_identical(world):
    results = run_workers(_train_mlp, world, 50, dict(tau=2e-3, momentum_correction=0.9))
    for rank, (params, _, _) in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][0])), f"rank {rank} differs"
    words = [r[1] for r in results]
    assert any(words[k] != words[0] for k in range(1, world)), "messages should differ in size"
    assert all(0 < sum(w) for w in words)
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(results[0][0], FrameMLP(5, 7, hidden=16).parameters()))


def test_empty_messages_do_not_hang():
    results = run_workers(_train_mlp, 2, 5, dict(tau=1e6))
    for params, words, stats in results:
        assert words == [0] * 5
        assert stats["by_op"]["all_gather_v"]["bytes_sent"] == 5 * 8  # only the counts
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


def _random_gradients(rank, world, steps, gtc_kwargs):
    model = Tiny()
    sync = GTC(TorchCommunicator(), **gtc_kwargs)
    sync.setup(model)
    g = torch.Generator().manual_seed(rank)
    densities, taus = [], []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        sync.after_backward()
        sync.after_step()
        densities.append(sync.stats()["density_global"])
        taus.append(sync.tau)
    return densities, taus


def test_adaptive_tau_holds_the_density_band():
    every, band = 5, (0.05, 0.15)
    results = run_workers(_random_gradients, 2, 200, dict(tau=1e-3, adaptive=True, adapt_every=every,
                                                           density_min=band[0], density_max=band[1]))
    (densities, taus), (_, taus1) = results
    assert taus == taus1  # every rank takes the same tau
    assert densities[0] > band[1] and taus[-1] > 16 * taus[0]  # started far above the band
    windows = [sum(densities[i: i + every]) / every for i in range(100, 200, every)]
    assert all(band[0] <= d <= band[1] for d in windows), windows
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert max(ratios) <= 2.0 and min(ratios) >= 0.5  # bounded change
    assert all(r == 1.0 for j, r in enumerate(ratios) if (j + 2) % every)  # only after a full window


def _resume(rank, world, kwargs):
    def fresh():
        torch.manual_seed(0)
        model = FrameMLP(5, 7, hidden=16)
        return model, torch.optim.SGD(model.parameters(), lr=0.3), GTC(TorchCommunicator(), **kwargs)

    def loop(model, optimizer, steps, start):
        g = torch.Generator().manual_seed(1000 * rank + start)
        for _ in range(steps):
            x, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 7, (8, 3), generator=g)
            optimizer.zero_grad()
            frame_loss(model(x), y).backward()
            optimizer.step()

    model, optimizer, sync = fresh()
    with sync.attach(model, optimizer):
        loop(model, optimizer, 7, 0)
        loop(model, optimizer, 7, 7)
    straight = [p.detach().clone() for p in model.parameters()], sync.state_dict()

    model, optimizer, sync = fresh()
    with sync.attach(model, optimizer):
        loop(model, optimizer, 7, 0)
    saved = sync.state_dict(), model.state_dict(), optimizer.state_dict()
    model, optimizer, sync = fresh()
    sync.load_state_dict(saved[0])  # before attach: applied by setup
    model.load_state_dict(saved[1])
    optimizer.load_state_dict(saved[2])
    with sync.attach(model, optimizer):
        loop(model, optimizer, 7, 7)
    return straight, ([p.detach().clone() for p in model.parameters()], sync.state_dict())


def test_state_round_trip_is_bitwise():
    kwargs = dict(tau=1e-3, adaptive=True, adapt_every=3, density_min=0.01, density_max=0.05,
                  momentum_correction=0.9)
    for (params_a, state_a), (params_b, state_b) in run_workers(_resume, 2, kwargs):
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        for key, value in state_a.items():
            same = torch.equal(value, state_b[key]) if isinstance(value, torch.Tensor) else value == state_b[key]
            assert same, key
        assert state_a["window_steps"] == 14 % 3 and state_a["tau"] != 1e-3


def _capacity_and_clip(rank, world):
    out = {}
    for name, kwargs in (("capacity", dict(tau=TAU, capacity=3)), ("clip", dict(tau=TAU, clip=1.0, clip_every=1))):
        model = Tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        sync = GTC(TorchCommunicator(), **kwargs)
        words = []
        with sync.attach(model, optimizer):
            raw, moved = _drive(sync, model, optimizer, rank, 1)
            words.append(sync.stats()["words_last_step"])
            more_raw, more_moved = _drive(sync, model, optimizer, rank, 9, start=1)
            words.append(sync.stats()["words_last_step"])
        raw = [a + b for a, b in zip(raw, more_raw)]
        moved = [a + b for a, b in zip(moved, more_moved)]
        residual = [v.view(p.shape).double() for v, p in zip(sync.residual.views, model.parameters())]
        out[name] = raw, moved, residual, words, sync.stats()
    return out


def test_capacity_and_clipping():
    results = run_workers(_capacity_and_clip, 2)

    def conserved(name):
        return all(torch.equal(2 * results[0][name][1][i],
                               sum(r[name][0][i] for r in results) - sum(r[name][2][i] for r in results))
                   for i in range(2))

    for r in results:
        assert r["capacity"][3] == [3, 3]  # capped, and the overflow came back in later steps
        assert max(v.abs().max() for v in r["capacity"][2]) > 1  # it waited in the residual
        assert r["capacity"][4]["conserving"] is True
        assert max(v.abs().max() for v in r["clip"][2]) <= TAU
        assert r["clip"][4]["conserving"] is False
    assert conserved("capacity") and not conserved("clip")


def _warmup(rank, world, momentum, warmup):
    out = []
    for use_gtc in (True, False):
        torch.manual_seed(0)
        model = FrameMLP(5, 7, hidden=16)
        if use_gtc:  # momentum as DGC's correction, plain SGD
            optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
            sync = GTC(TorchCommunicator(), tau=1e-3, warmup_steps=warmup, momentum_correction=momentum,
                       bucket_mb=0.001)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
            sync = AllReduce(TorchCommunicator(), bucket_mb=0.001)
        g = torch.Generator().manual_seed(rank)
        params = []
        with sync.attach(model, optimizer):
            for _ in range(warmup + 1):
                x, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 7, (8, 3), generator=g)
                optimizer.zero_grad()
                frame_loss(model(x), y).backward()
                optimizer.step()
                params.append([p.detach().clone() for p in model.parameters()])
        out.append((params, sync.stats()))
    return out


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_warmup_equals_allreduce(momentum):
    warmup = 4
    for (gtc_params, gtc_stats), (dense_params, _) in run_workers(_warmup, 2, momentum, warmup):
        for step in range(warmup):
            assert all(torch.equal(a, b) for a, b in zip(gtc_params[step], dense_params[step])), step
        assert not all(torch.equal(a, b) for a, b in zip(gtc_params[warmup], dense_params[warmup]))
        assert gtc_stats["compressed_steps"] == 1


def _nan(rank, world, bad_rank):
    model = FrameMLP(5, 7, hidden=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    sync = GTC(TorchCommunicator(), tau=1e-3, momentum_correction=0.9)
    g = torch.Generator().manual_seed(rank)
    with sync.attach(model, optimizer):
        for step in range(1, 4):
            x, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 7, (8, 3), generator=g)
            optimizer.zero_grad()
            frame_loss(model(x), y).backward()
            if step == 3 and rank == bad_rank:
                model.net[2].weight.grad[3, 1] = float("nan")
            kept = sync.residual.data.clone(), sync.velocity.clone(), [p.detach().clone() for p in model.parameters()]
            try:
                optimizer.step()
            except NonFiniteGradientError as error:
                unchanged = (torch.equal(kept[0], sync.residual.data) and torch.equal(kept[1], sync.velocity)
                             and all(torch.equal(a, b) for a, b in zip(kept[2], model.parameters())))
                return str(error), unchanged
    return None


def test_nan_gradient_names_parameter_and_step_on_every_rank():
    (message0, _), (message1, unchanged) = run_workers(_nan, 2, 1)
    assert "net.2.weight" in message1 and "step 3" in message1 and "(3, 1)" in message1
    assert unchanged
    assert "rank 1" in message0 and "step 3" in message0  # the healthy rank stops too, no hang


@pytest.mark.parametrize("kwargs,key", [
    (dict(tau=0), "sync.tau"), (dict(tau=-1.0), "sync.tau"), (dict(tau=float("nan")), "sync.tau"),
    (dict(density_min=0.0), "sync.density_min"), (dict(density_max=1.0), "sync.density_min"),
    (dict(density_min=0.1, density_max=0.01), "sync.density_min"),
    (dict(capacity=0), "sync.capacity"), (dict(adapt_factor=1.0), "sync.adapt_factor"),
    (dict(clip=0.0), "sync.clip"), (dict(warmup_steps=-1), "sync.warmup_steps"),
    (dict(momentum_correction=1.0), "sync.momentum_correction"),
    (dict(domain="weights"), "sync.domain"),
    (dict(domain="update", momentum_correction=0.9), "sync.momentum_correction"),
])
def test_bad_settings(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GTC(LocalCommunicator(), **kwargs)


def test_momentum_twice_is_refused():
    model = Tiny()
    sync = GTC(LocalCommunicator(), momentum_correction=0.9)
    with pytest.raises(ValueError, match="optim.momentum=0"):
        sync.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _train_run(rank, world, run_dir):
    from disttrain.config import compose
    from disttrain.train import run

    cfg = compose(["sync=gtc", "model=mlp", "optim.momentum=0", "sync.tau=0.01", "train.steps=6",
                   "train.log_every=2", "train.eval_every=0", "train.batch_size=4", "train.progress=false",
                   "data.train_utts=64", "data.eval_utts=8", "data.utt_len=16"])
    return run(cfg, run_dir)


def test_training_loop_logs_gtc_figures(tmp_path):
    summaries = run_workers(_train_run, 2, str(tmp_path))
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"density", "density_mean", "tau", "words_sent", "words_last_step", "bytes_sent"} <= set(r)
        assert 0 < r["density"] < 1 and r["tau"] == pytest.approx(0.01)
    assert summaries[0]["sync"] == "gtc" and summaries[0]["stats"]["words_sent"] > 0
