"""The MPI communicator under a real ``mpiexec``: collectives, parity with torch.distributed, failures.

Every multi-rank check launches ``mpiexec -n N python tests/test_mpi.py MODE ...``:
the ``__main__`` block at the bottom is the worker, and the test reads what
each rank wrote.  Each launch pays ``import torch`` on every rank (seconds on
2 cores), so one launch does as much as it can.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The mpiexec installed with mpi4py's MPI (the mpich wheel puts it next to python), else PATH's.
_VENV_MPIEXEC = Path(sys.executable).with_name("mpiexec")
MPIEXEC = str(_VENV_MPIEXEC) if _VENV_MPIEXEC.exists() else shutil.which("mpiexec")
SYNCS = {  # synchronizer -> overrides its parity run needs
    "allreduce": [],
    # DGC momentum replaces the optimizer's; tau 0.1 gives ~8% density; no dense warm-up steps
    "gtc": ["optim.momentum=0", "sync.tau=0.1", "sync.warmup_steps=0"],
    "bmuf": ["sync.sync_every=10"],
}
TRAIN = ["model=mlp", "data.train_utts=256", "data.eval_utts=64", "train.steps=30", "train.batch_size=8",
         "train.eval_every=0", "train.log_every=10", "train.progress=false", "train.checkpoint_every=0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed (pip install -e '.[mpi]')"),
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec next to python or on PATH (pip install mpich)"),
]


def _mpiexec(n: int, *args: str, timeout_s: float = 60.0) -> tuple[int, str, float]:
    """Run this file's worker on ``n`` ranks; (exit code, stdout+stderr, seconds). Never hangs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, __file__, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} still running after {timeout_s} s:\n{output}")
    return proc.returncode, output, time.perf_counter() - start


def test_bad_settings_are_rejected_before_mpi_starts():
    from disttrain.comm.mpi import MPICommunicator

    with pytest.raises(ValueError, match="comm.timeout_s"):
        MPICommunicator(timeout_s=0)
    with pytest.raises(ValueError, match="comm.cuda_aware"):
        MPICommunicator(cuda_aware="maybe")


def test_master_address_is_one_other_hosts_can_reach(monkeypatch):
    from disttrain.comm import mpi

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert mpi._master_address(single_host=True) == "127.0.0.1"
    monkeypatch.setattr(mpi.socket, "gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        mpi._master_address(single_host=False)
    monkeypatch.setattr(mpi.socket, "gethostbyname", lambda name: "10.1.2.3")
    assert mpi._master_address(single_host=False) == "10.1.2.3"
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    assert mpi._master_address(single_host=False) == "10.9.9.9"


# -- collectives ----------------------------------------------------------------------------
def _random(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1000 + rank))


def _message(rank: int) -> torch.Tensor:
    return torch.arange(rank * 3, dtype=torch.int32) + 100 * rank  # rank 0 sends nothing


SMALL, LARGE = 100, 20_000  # 400 B and 80 KB: MPICH picks its allreduce algorithm by size


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def mpi_job(request, tmp_path_factory):
    """One mpiexec launch per world size: the collectives, every available synchronizer
    trained with comm=mpi and with comm=torch, then the command line with comm=mpi."""
    syncs = [s for s in SYNCS if (REPO / "conf" / "sync" / f"{s}.yaml").exists()]
    out = tmp_path_factory.mktemp(f"mpi{request.param}")
    code, output, _ = _mpiexec(request.param, "job", str(out), *syncs, timeout_s=150)
    assert code == 0, output
    (out / "output.txt").write_text(output)
    return request.param, out


def test_collectives_and_accounting(mpi_job):
    world, out = mpi_job
    results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    expected_sum = sum(range(1, world + 1))
    for rank, res in enumerate(results):
        for dtype, summed in res["sum"].items():
            assert summed.dtype == dtype and summed.tolist() == [expected_sum] * 5
        for got, n in zip(res["random"], (SMALL, LARGE)):
            reference = sum(_random(r, n).double() for r in range(world))
            torch.testing.assert_close(got.double(), reference, rtol=0, atol=1e-5)
            assert torch.equal(got, results[0]["random"][[SMALL, LARGE].index(n)])  # same bits everywhere
        assert res["bcast"].tolist() == [world - 1.0] * 3
        assert res["bcast_bf16"].dtype == torch.bfloat16 and res["bcast_bf16"].tolist() == [1.5] * 4
        assert [g.tolist() for g in res["gather"]] == [_message(r).tolist() for r in range(world)]
        assert all(g.dtype == torch.int32 for g in res["gather"])
        assert [g.tolist() for g in res["gather_f64"]] == [[r + 0.25] * (world - r) for r in range(world)]
        assert res["empty"] == [0] * world
        assert [g.tolist() for g in res["torch_gather"]] == [g.tolist() for g in res["gather"]]
        assert res["master"] == results[0]["master"] and res["master"][0] == "127.0.0.1"
        assert "complex64" in res["dtype_error"] and "float32" in res["dtype_error"]
        assert res["path"] == "cpu"
        assert res["cuda_aware"] is False  # the mpich wheel has no CUDA support, and says so

        ops = res["stats"]["by_op"]
        assert ops["all_reduce"]["calls"] == 6  # the uncounted one and the rejected dtype are not there
        assert ops["all_reduce"]["bytes_sent"] == 5 * (4 + 8 + 4 + 8) + 4 * (SMALL + LARGE)
        assert ops["broadcast"]["bytes_sent"] == (12 if rank == world - 1 else 0) + (8 if rank == 1 else 0)
        # count words + exactly this rank's message (no padding), then the all-empty exchange
        assert ops["all_gather_v"]["calls"] == 3
        assert ops["all_gather_v"]["bytes_sent"] == 8 + 4 * 3 * rank + 8 + 8 * (world - rank) + 8
        assert ops["barrier"] == {"calls": 1, "bytes_sent": 0, "seconds": ops["barrier"]["seconds"]}


def _collectives_worker(out_dir: str) -> None:
    from disttrain.comm import TorchCommunicator
    from disttrain.comm.mpi import MPICommunicator, mpi_cuda_aware

    comm = MPICommunicator()
    rank, world = comm.rank, comm.world_size
    res = {"path": comm.path, "cuda_aware": mpi_cuda_aware()}
    res["sum"] = {dt: comm.all_reduce_(torch.full((5,), rank + 1, dtype=dt))
                  for dt in (torch.float32, torch.float64, torch.int32, torch.int64)}
    res["random"] = [comm.all_reduce_(_random(rank, n)) for n in (SMALL, LARGE)]
    res["bcast"] = comm.broadcast_(torch.full((3,), float(rank)), src=world - 1)
    res["bcast_bf16"] = comm.broadcast_(torch.full((4,), rank + 0.5, dtype=torch.bfloat16), src=1)
    res["gather"] = [g.clone() for g in comm.all_gather_v(_message(rank))]
    res["gather_f64"] = [g.clone() for g in comm.all_gather_v(torch.full((world - rank,), rank + 0.25, dtype=torch.float64))]
    res["empty"] = [e.numel() for e in comm.all_gather_v(torch.empty(0, dtype=torch.int32))]
    with comm.uncounted():
        comm.all_reduce_(torch.ones(1000))
    comm.barrier()
    try:
        comm.all_reduce_(torch.zeros(2, dtype=torch.complex64))
    except ValueError as error:
        res["dtype_error"] = str(error)
    res["stats"] = comm.stats.as_dict()
    # torch.distributed in the same processes, its address shared over MPI
    torch_comm = TorchCommunicator(backend="gloo", device="cpu")
    res["torch_gather"] = [g.clone() for g in torch_comm.all_gather_v(_message(rank))]
    res["master"] = (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    torch_comm.close()
    comm.close()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


# -- training parity: comm=mpi against comm=torch -------------------------------------------
@pytest.mark.parametrize("sync", list(SYNCS))
def test_mpi_and_torch_train_the_same_model(mpi_job, sync):
    world, out = mpi_job
    if not (REPO / "conf" / "sync" / f"{sync}.yaml").exists():
        pytest.skip(f"conf/sync/{sync}.yaml does not exist yet")
    by_mpi = torch.load(out / f"{sync}-mpi" / "model.pt")
    by_torch = torch.load(out / f"{sync}-torch" / "model.pt")
    assert by_mpi.keys() == by_torch.keys()
    # Summation order: two addends commute exactly, so 2 ranks agree bitwise whatever the
    # algorithm; with 4, gloo's ring and MPICH's tree-like algorithms add in different orders
    # (2e-7 to 4e-7 apart after 30 steps).  GTC only all-gathers and decodes in rank order.
    if world == 2 or sync == "gtc":
        for key in by_mpi:
            assert torch.equal(by_mpi[key], by_torch[key]), key
    else:
        for key in by_mpi:
            torch.testing.assert_close(by_mpi[key], by_torch[key], rtol=0, atol=1e-6)
    summaries = {c: json.loads((out / f"{sync}-{c}" / "summary.json").read_text()) for c in ("mpi", "torch")}
    assert summaries["mpi"]["world_size"] == world and summaries["mpi"]["bytes_sent_per_step"] > 0
    if sync == "gtc":  # Allgatherv sends each message at its length; gloo pads to the longest
        assert summaries["mpi"]["bytes_sent_per_step"] <= summaries["torch"]["bytes_sent_per_step"]
    else:
        assert summaries["mpi"]["bytes_sent_per_step"] == summaries["torch"]["bytes_sent_per_step"]


def _parity_worker(out_dir: str, *syncs: str) -> None:
    import torch.distributed as dist

    from disttrain.config import compose
    from disttrain.train import run

    def no_process_group(*args, **kwargs):
        raise AssertionError("comm=mpi must not create a torch.distributed process group")

    init_process_group = dist.init_process_group
    for sync in syncs:
        for comm in ("mpi", "torch"):
            # Each TorchCommunicator leaves RANK/MASTER_* behind; start every run as mpiexec did.
            for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)
            dist.init_process_group = init_process_group if comm == "torch" else no_process_group
            run_dir = Path(out_dir) / f"{sync}-{comm}"
            run_dir.mkdir(exist_ok=True)
            run(compose([f"comm={comm}", f"sync={sync}", *TRAIN, *SYNCS[sync]]), str(run_dir))
            assert not dist.is_initialized()


def _job_worker(out_dir: str, *syncs: str) -> None:
    from disttrain.train import main

    _collectives_worker(out_dir)
    _parity_worker(out_dir, *syncs)
    sys.argv = ["disttrain.train", f"hydra.run.dir={out_dir}/cli", "comm=mpi", "sync=allreduce", *TRAIN]
    main()


def test_train_cli_with_comm_mpi(mpi_job):
    """``python -m disttrain.train comm=mpi`` through Hydra's main, last in the job's launch."""
    world, out = mpi_job
    assert f"MPI communicator: {world} ranks" in (out / "output.txt").read_text()
    assert json.loads((out / "cli" / "summary.json").read_text())["world_size"] == world
    assert (out / "cli" / "model.pt").exists()


# -- failures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, shown", [
    ("raise", ["RuntimeError: rank 1 fails on purpose", "rank 1 of 2 failed"]),
    ("exit", ["disttrain: error: sync.tau", "rank 1 of 2 is exiting before closing"]),
    ("hang", ["rank 0: MPI all_reduce waited more than comm.timeout_s=2 s"]),
    ("kill", ["signal 9"]),
])
def test_a_failing_rank_ends_the_job(mode, shown):
    code, output, seconds = _mpiexec(2, "fail", mode, timeout_s=60)
    assert code != 0, output
    for text in shown:
        assert text in output, output
    assert "rank 0 finished" not in output  # rank 0 was stopped inside its all-reduce
    assert seconds < 60


def _fail_worker(mode: str) -> None:
    from disttrain.comm.mpi import MPICommunicator

    comm = MPICommunicator(timeout_s=2)
    if comm.rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        if mode == "exit":  # what train.main does with a ValueError
            print("disttrain: error: sync.tau must be > 0", file=sys.stderr, flush=True)
            sys.exit(2)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(30)
    comm.all_reduce_(torch.ones(4))
    comm.close()
    print(f"rank {comm.rank} finished", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"job": _job_worker, "fail": _fail_worker}[sys.argv[1]](*sys.argv[2:])
