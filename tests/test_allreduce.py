"""The dense all-reduce synchronizer against DistributedDataParallel, with real gloo workers."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm import TorchCommunicator
from disttrain.models import LSTMAcousticModel, frame_loss
from disttrain.sync import AllReduce
from workers import run_workers

STEPS = 20


def _batches(rank):
    # Different data on every rank: a test that cannot pass with the sync switched off.
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 6, 5, generator=g), torch.randint(0, 7, (4, 6), generator=g))
            for _ in range(STEPS)]


def _train(rank, world, use_ddp, bucket_mb):
    torch.manual_seed(0)
    model = LSTMAcousticModel(5, 7, hidden=8, layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    batches = _batches(rank)
    if use_ddp:
        ddp = DistributedDataParallel(model)
        for x, y in batches:
            optimizer.zero_grad()
            frame_loss(ddp(x), y).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], None
    sync = AllReduce(TorchCommunicator(), bucket_mb=bucket_mb)
    with sync.attach(model, optimizer):  # the user's loop, unchanged
        for x, y in batches:
            optimizer.zero_grad()
            frame_loss(model(x), y).backward()
            optimizer.step()
    return [p.detach().clone() for p in model.parameters()], sync.stats()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_ddp(world):
    # 0.001 MB buckets split the 1.4k-parameter model over several collectives.
    ours = run_workers(_train, world, False, 0.001)
    ddp = run_workers(_train, world, True, 0.0)
    for rank in range(world):
        for a, b in zip(ours[rank][0], ddp[rank][0]):
            assert (a - b).norm() <= 1e-6 * b.norm(), f"rank {rank} differs from DDP"
        # replicas are bitwise identical to rank 0
        assert all(torch.equal(a, b) for a, b in zip(ours[rank][0], ours[0][0]))
    numel = sum(p.numel() for p in ours[0][0])
    stats = ours[0][1]
    assert stats["bytes_sent"] == STEPS * numel * 4 + (numel * 4)  # gradients + initial broadcast from rank 0
    assert stats["by_op"]["all_reduce"]["calls"] == STEPS * -(-numel * 4 // int(0.001 * 2**20))


def test_without_sync_replicas_drift():
    # The control for the test above: the same loop with no exchange ends apart.
    def alone(rank, world):
        torch.manual_seed(0)
        model = LSTMAcousticModel(5, 7, hidden=8, layers=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        for x, y in _batches(rank):
            optimizer.zero_grad()
            frame_loss(model(x), y).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    a, b = run_workers(alone, 2)
    assert any((x - y).abs().max() > 1e-3 for x, y in zip(a, b))


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="sync.bucket_mb"):
        AllReduce(TorchCommunicator(), bucket_mb=0)
