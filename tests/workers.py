"""Run a function on several real worker processes joined by a gloo process group.

Workers are forked (about 0.1 s for 4), so the function may be a closure or a
local; each child calls ``torch.set_num_threads(1)`` first because forking
after a multi-threaded op otherwise hangs the child in its first parallel
region.  Results travel back through ``torch.save`` bytes.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    pass


def _child(fn, rank, world_size, store_path, timeout_s, args, queue, env):
    try:
        torch.set_num_threads(1)
        os.environ.update(env)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        if world_size > 0:
            dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        queue.close()
        queue.join_thread()  # the result must be flushed before the hard exit below
    os._exit(0)


def run_workers(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 120.0,
                collective_timeout_s: float = 60.0, env: dict | None = None,
                allow_failures: bool = False) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process.

    Raises ``WorkerError`` with the child's traceback if any worker raised
    (unless ``allow_failures``, then that rank's entry is the traceback text),
    and if the workers do not all finish within ``timeout_s``.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, store, collective_timeout_s,
                                                  args, queue, env or {}), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, tuple[bool, Any]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        try:
            while len(results) < world_size:
                remaining = (deadline - datetime.datetime.now()).total_seconds()
                if remaining <= 0:
                    raise WorkerError(f"workers {sorted(set(range(world_size)) - set(results))} "
                                      f"did not finish within {timeout_s} s")
                try:
                    rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
                except Exception:
                    if any(p.is_alive() for p in procs) or not queue.empty():
                        continue
                    for r, p in enumerate(procs):  # everyone is gone; some said nothing
                        if r not in results:
                            results[r] = (False, f"died with exit code {p.exitcode} and no result")
                    if not allow_failures:
                        dead = [r for r, (ok, _) in results.items() if not ok]
                        raise WorkerError(f"workers {dead} died without a result")
                results[rank] = (ok, payload)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    out = []
    for rank in range(world_size):
        ok, payload = results[rank]
        if ok:
            out.append(torch.load(io.BytesIO(payload), weights_only=False))
        elif allow_failures:
            out.append(payload)
        else:
            raise WorkerError(f"rank {rank} failed:\n{payload}")
    return out
