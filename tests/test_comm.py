"""The torch.distributed communicator with real gloo workers: results, byte accounting, failures."""
import time

import pytest
import torch

from disttrain.comm import CommError, LocalCommunicator, TorchCommunicator
from disttrain.launch import detect_world
from workers import run_workers


def _collectives(rank, world):
    comm = TorchCommunicator()
    summed = comm.all_reduce_(torch.full((5,), float(rank + 1)))
    sent = comm.broadcast_(torch.full((3,), float(rank)), src=1)
    # Uneven messages, rank 0's empty: exercises counts-then-padding.
    gathered = comm.all_gather_v(torch.arange(rank * 3, dtype=torch.int32) + 100 * rank)
    empty = comm.all_gather_v(torch.empty(0, dtype=torch.int32))
    with comm.uncounted():
        comm.all_reduce_(torch.ones(1000))
    return summed, sent, [g.clone() for g in gathered], [e.numel() for e in empty], comm.stats.as_dict()


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_and_accounting(world):
    results = run_workers(_collectives, world)
    expected_sum = sum(range(1, world + 1))
    longest = (world - 1) * 3
    for rank, (summed, sent, gathered, empty, stats) in enumerate(results):
        assert summed.tolist() == [expected_sum] * 5
        assert sent.tolist() == [1.0] * 3
        assert [g.tolist() for g in gathered] == [
            [100 * r + i for i in range(r * 3)] for r in range(world)]
        assert empty == [0] * world
        ops = stats["by_op"]
        assert ops["all_reduce"] == {"calls": 1, "bytes_sent": 20, "seconds": pytest.approx(ops["all_reduce"]["seconds"])}
        assert ops["broadcast"]["bytes_sent"] == (12 if rank == 1 else 0)
        # count word + padded message, then the all-empty exchange: count word only.
        assert ops["all_gather_v"]["calls"] == 2
        assert ops["all_gather_v"]["bytes_sent"] == 8 + 4 * longest + 8
        assert stats["collectives"] == 4  # the uncounted all-reduce is not there


def _die_or_wait(rank, world):
    if rank == 1:
        import os
        os._exit(3)  # a peer that dies without a word
    comm = TorchCommunicator(timeout_s=5)
    start = time.perf_counter()
    try:
        comm.all_reduce_(torch.ones(4))
    except CommError as e:  # gloo reports the lost peer (or the timeout); we say what it means
        return "error", time.perf_counter() - start, str(e)
    return "no error", time.perf_counter() - start, ""


def test_dead_peer_ends_with_error_not_hang():
    results = run_workers(_die_or_wait, 2, collective_timeout_s=5, timeout_s=60, allow_failures=True)
    outcome, seconds, message = results[0]
    assert outcome == "error"
    assert seconds < 30, message
    assert message.startswith("all_reduce failed on rank 0") and "comm.timeout_s=5" in message


def test_world_of_one_sends_nothing():
    comm = LocalCommunicator()
    t = torch.ones(3)
    comm.all_reduce_(t)
    assert t.tolist() == [1, 1, 1]
    assert comm.all_gather_v(t)[0] is t
    assert comm.stats.as_dict()["bytes_sent"] == 0


def test_collectives_take_flat_tensors():
    with pytest.raises(ValueError, match="1-D"):
        LocalCommunicator().all_reduce_(torch.ones(2, 2))


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, "none")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (2, 8, 2, "mpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 1, "mpi")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}, (5, 6, 1, "slurm")),
    # torchrun inside a Slurm allocation: torchrun's variables describe the group.
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 2, 0, "torchrun")),
])
def test_detect_world(env, expected):
    w = detect_world(env)
    assert (w.rank, w.world_size, w.local_rank, w.launcher) == expected


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2"),
])
def test_detect_world_rejects_nonsense(env, message):
    with pytest.raises(ValueError, match=message):
        detect_world(env)


def test_bad_communicator_settings():
    with pytest.raises(ValueError, match="comm.timeout_s"):
        TorchCommunicator(timeout_s=0)
    with pytest.raises(ValueError, match="comm.backend"):
        TorchCommunicator(backend="tcp")
    with pytest.raises(ValueError, match="comm.device"):
        TorchCommunicator(device="tpu")
