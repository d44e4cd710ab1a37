"""The scaling tools: cost-model formulas, report generation, network emulation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from disttrain import costmodel, netem
from disttrain.bench import scaling
from disttrain.costmodel import Link, Profile
from disttrain.report import write_report

# A link of exactly 1e6 payload bytes/s: hand arithmetic stays exact.
MB_LINK = Link(bandwidth_bps=8e6, latency_s=0.0, payload_efficiency=1.0)


# -- cost model --------------------------------------------------------------
def test_ring_allreduce_matches_hand_computation():
    # 2 (N-1)/N * bytes / B + 2 (N-1) a: 2*3/4 * 8e6 / 1e6 = 12 s, plus 6 * 0.01 s of latency.
    link = Link(8e6, latency_s=0.01, payload_efficiency=1.0)
    assert costmodel.ring_allreduce_s(8e6, 4, link) == pytest.approx(12.06)
    # Three buckets pay the latency three times, the bandwidth term once.
    assert costmodel.ring_allreduce_s(8e6, 4, link, bucket_bytes=3e6) == pytest.approx(12.0 + 3 * 0.06)
    assert costmodel.ring_allreduce_s(8e6, 1, link) == 0.0


def test_all_gather_and_gtc_comm_match_hand_computation():
    link = Link(8e6, latency_s=0.5, payload_efficiency=1.0)
    # (N-1) m / B + (N-1) a = 4 * 2 + 4 * 0.5 = 10 s for a 2e6-byte message over 5 workers.
    assert costmodel.all_gather_s(2e6, 5, link) == pytest.approx(10.0)
    p = Profile("gtc", "gtc", compute_s=1.0, model_bytes=4_000, message_bytes=2e6)
    counts = 4 * 8 / 1e6 + 4 * 0.5
    assert costmodel.comm_time(p, 5, link) == pytest.approx(counts + 10.0)
    assert costmodel.step_time(p, 5, link) == pytest.approx(1.0 + counts + 10.0)


def test_bmuf_amortises_one_model_allreduce_over_its_block():
    p = Profile("bmuf", "bmuf", compute_s=0.5, model_bytes=4_000_000, sync_every=10)
    # (ring(16) + ring(4e6)) / 10 at N=2: (16 + 4e6) / 1e6 / 10.
    assert costmodel.comm_time(p, 2, MB_LINK) == pytest.approx((16 + 4e6) / 1e6 / 10)


def test_step_time_efficiency_and_cpu_sharing():
    p = Profile("allreduce", "allreduce", compute_s=2.0, model_bytes=2_000_000)
    # N=2: 2 * 1/2 * 2e6 / 1e6 = 2 s of comm; efficiency 2 / (2 + 2) = 0.5.
    assert costmodel.step_time(p, 2, MB_LINK) == pytest.approx(4.0)
    assert costmodel.efficiency(p, 2, MB_LINK) == pytest.approx(0.5)
    assert costmodel.throughput(p, 2, MB_LINK, batch_size=8) == pytest.approx(2 * 8 / 4.0)
    # 4 hosts on 2 cores: compute runs at half speed (2 * 2 s), comm 2 * 3/4 * 2 = 3 s.
    assert costmodel.step_time(p, 4, MB_LINK, cores=2) == pytest.approx(4.0 + 3.0)
    with pytest.raises(ValueError, match="allreduce, gtc, bmuf"):
        costmodel.comm_time(Profile("x", "dgc", 1.0, 4), 2, MB_LINK)


def test_default_link_takes_header_overhead():
    assert Link(1e9).bytes_per_s == pytest.approx(1.25e8 * 1448 / 1514)


# -- a stored sweep ------------------------------------------------------------
def _store_run(run_dir, sync, n, steps, wall_s, comm_s, bytes_per_step, by_op, losses, sync_cfg):
    os.makedirs(run_dir)
    batch = 4
    curve = [{"step": s, "samples": s * batch * n, "train_loss": l + 0.1, "wall_s": wall_s * s / steps,
              "eval_loss": l, "eval_acc": 0.5} for s, l in losses]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(c) for c in curve) + "\n")
    summary = {"sync": sync, "world_size": n, "steps": steps, "samples": steps * batch * n,
               "wall_s": wall_s, "samples_per_s": steps * batch * n / wall_s,
               "eval_loss": losses[-1][1], "eval_acc": 0.5, "bytes_sent_per_step": bytes_per_step,
               "comm_s": comm_s, "stats": {"bytes_sent": bytes_per_step * steps, "by_op": by_op},
               "config": {"train": {"batch_size": batch}, "model": {"_target_": "x.FrameMLP"},
                          "sync": sync_cfg}}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)


@pytest.fixture
def stored_sweep(tmp_path):
    """1 and 2 workers of all-reduce and GTC, as a sweep over an emulated 8 Mbit/s network leaves them."""
    out = tmp_path / "sweep"
    params = 250_000  # 1e6 bytes of float32
    net = {"rate": "8mbit", "rate_bps": 8e6, "burst_bytes": 3000}
    ar_ops = {"all_reduce": {"calls": 10, "bytes_sent": 10 * 1_000_000, "seconds": 12.0}}
    gtc_ops = {"all_gather_v": {"calls": 10, "bytes_sent": 10 * 10_008, "seconds": 0.2}}
    points = [  # point, wall_s, comm_s, bytes/step, by_op, (step, eval loss) pairs
        (scaling.Point("allreduce", 1), 10.0, 0.0, 0, {}, [(5, 2.0), (10, 1.6)]),
        (scaling.Point("allreduce", 2), 20.0, 10.0, 1_000_000, ar_ops, [(5, 1.8), (10, 1.5)]),
        (scaling.Point("gtc", 1, {"tau": 0.1}), 10.0, 0.0, 0, {}, [(5, 2.1), (10, 1.7)]),
        (scaling.Point("gtc", 2, {"tau": 0.1}), 10.0, 0.1, 10_008, gtc_ops, [(5, 1.9), (10, 1.4)]),
    ]
    rows = []
    for point, wall, comm, per_step, by_op, losses in points:
        run_dir = str(out / "runs" / point.name)
        _store_run(run_dir, point.sync, point.world_size, 10, wall, comm, per_step, by_op, losses,
                   {"bucket_mb": 25.0, **point.params})
        launch = {"returncodes": [0] * point.world_size, "net": net,
                  "tc_tx_bytes": [int(1.05 * 1.5e7)] * point.world_size}
        rows.append({**scaling.make_row(point, run_dir, launch, params), "cores": 2})
    rows.append({**scaling.make_row(scaling.Point("bmuf", 2, {"sync_every": 5}),
                                    str(out / "runs" / "missing"), {}, params)})
    scaling.write_table(str(out), rows)
    return out


def test_results_table_gathers_every_run(stored_sweep):
    rows = costmodel.load_rows(str(stored_sweep))
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"]
    ar2 = rows[1]
    assert ar2["steps_per_s"] == pytest.approx(0.5) and ar2["compute_s_per_step"] == pytest.approx(1.0)
    assert ar2["expected_wire_bytes_rank0"] == pytest.approx(1e7 * 2 * 1 / 2)  # ring: 2(N-1)/N
    assert [p["eval_loss"] for p in ar2["eval_curve"]] == [1.8, 1.5]
    csv_lines = (stored_sweep / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and "samples_per_s" in csv_lines[0] and "net_rate" in csv_lines[0]


def test_cost_model_check_against_stored_runs(stored_sweep):
    rows = costmodel.load_rows(str(stored_sweep))
    checked = {(c["variant"], c["world_size"]): c for c in costmodel.check(rows)}
    # all-reduce at 2: compute 1 s/step + 2*1/2 * 1e6 B / (1e6 B/s * 1448/1514) = 2.0456 s; measured 2 s.
    ar = checked[("allreduce", 2)]
    assert ar["predicted_s"] == pytest.approx(1.0 + 1514 / 1448)
    assert ar["error"] == pytest.approx((1.0 + 1514 / 1448 - 2.0) / 2.0)
    # GTC: message 10_008 - 8 bytes: (8 + 10_000) / B.
    assert checked[("gtc tau=0.1", 2)]["predicted_s"] == pytest.approx(1.0 + 10_008 / 1e6 * 1514 / 1448)


def test_latency_fitted_on_allreduce_runs(stored_sweep):
    rows = costmodel.load_rows(str(stored_sweep))
    # Make all-reduce at 2 workers pay exactly 2 latencies of 10 ms beyond the bandwidth model.
    rows[1]["wall_s"] = 10 * (1.0 + 1514 / 1448 + 2 * 0.01)
    assert costmodel.fit_latency(rows) == pytest.approx(0.01)
    checked = {c["variant"]: c for c in costmodel.check(rows, 0.01)}
    assert checked["allreduce"]["error"] == pytest.approx(0.0, abs=1e-12)
    # GTC pays 2 all-gathers of (N-1) = 1 message each.
    assert checked["gtc tau=0.1"]["predicted_s"] == pytest.approx(1.0 + 10_008 / 1e6 * 1514 / 1448 + 0.02)


def test_report_writes_tables_and_plots(stored_sweep, tmp_path):
    out = tmp_path / "report"
    path = write_report(str(stored_sweep), str(out))
    md = open(path).read()
    # All points: all-reduce at 2 workers runs at half its ideal throughput.
    assert "| allreduce | 2 | 0.50 | 4.0 | 0.50 | 1.5000 |" in md
    # Against all-reduce at 2 workers: GTC takes 1 step/s against 0.5.
    assert "| gtc tau=0.1 | 1.00 | 2.00x | 80 | 1.4000 | -0.1000 |" in md
    # Target = the worst final all-reduce eval loss (1.6): reached at the 2nd eval (1 worker, 10 s)
    # and at the first eval at or below it (2 workers: 1.5 at step 10, 20 s).
    assert "### Time to eval loss 1.6000" in md
    assert "| allreduce | 10.0 s | 20.0 s |" in md
    assert "| gtc tau=0.1 | not reached | 10.0 s |" in md
    assert "failed points (left out): bmuf-sync_every5-n2" in md
    assert "tc / expected" in md and "| allreduce | 2 | 10.000 | 10.000 | 15.750 | 1.575 |" in md
    assert "Projection to 1024 workers" in md and "Against the emulated measurements" in md
    assert "| allreduce | 2 | 2000.0 | 2045.6 | +2.3% |" in md  # a = 0: 1 + 1514/1448 s against 2 s
    for name in ("throughput", "efficiency", "loss_vs_samples", "loss_vs_time", "bytes_per_step",
                 "projection"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"{name}.png" in md


def test_report_of_an_empty_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        write_report(str(tmp_path))


# -- sweep arguments -----------------------------------------------------------
def test_sweep_points_and_argument_checks():
    points = scaling.make_points(["allreduce", "gtc", "bmuf"], [1, 4], [0.1, 0.2], [10])
    assert [p.name for p in points] == ["allreduce-n1", "allreduce-n4", "gtc-tau0.1-n1", "gtc-tau0.1-n4",
                                        "gtc-tau0.2-n1", "gtc-tau0.2-n4", "bmuf-sync_every10-n1",
                                        "bmuf-sync_every10-n4"]
    assert points[2].overrides() == ["sync=gtc", "optim.momentum=0", "sync.tau=0.1"]
    args = scaling.parse_args(["--net", "none", "--workers", "1", "2", "--", "train.steps=5"])
    assert args.net == "none" and args.workers == [1, 2] and args.overrides[-1] == "train.steps=5"
    for bad in (["--workers", "16"], ["--gtc-tau", "0"], ["--bmuf-sync-every", "0"], ["--net", "fast"]):
        with pytest.raises(SystemExit):
            scaling.parse_args(bad)


def test_parse_rate():
    assert netem.parse_rate("1gbit") == 1e9 and netem.parse_rate("100mbit") == 1e8
    with pytest.raises(ValueError, match="mbit"):
        netem.parse_rate("1gbps")


# -- network emulation ---------------------------------------------------------
def test_emulation_needs_root(monkeypatch, capsys):
    assert "needs root" in netem.unavailable_reason(euid=1000)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netem.NetemUnavailable, match="--net none"):
        netem.check_available()
    assert scaling.main(["--net", "1gbit", "--out", "/nonexistent/never-made"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_emulation_needs_iproute2(monkeypatch):
    monkeypatch.setattr(netem.shutil, "which", lambda tool: None)
    assert "iproute2" in netem.unavailable_reason(euid=0)


ROOT_REASON = netem.unavailable_reason()


@pytest.mark.skipif(ROOT_REASON is not None, reason=f"network emulation unavailable: {ROOT_REASON}")
def test_two_namespaces_talk_and_are_removed():
    server = ("import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 29555)); s.listen(1); "
              "s.settimeout(20); c,_=s.accept(); n=0\n"
              "while True:\n b=c.recv(65536)\n if not b: break\n n+=len(b)\nprint(n)")
    client = ("import socket,sys,time\nfor _ in range(100):\n try: s=socket.create_connection("
              "(sys.argv[1], 29555), timeout=5); break\n except OSError: time.sleep(0.05)\n"
              "s.sendall(b'x' * 200000); s.close()")
    with netem.EmulatedNetwork(2, "100mbit") as net:
        names = [h.namespace for h in net.hosts] + [net.bridge]
        assert set(names) <= set(netem.namespaces())
        addr = net.hosts[0].address
        assert addr.startswith("10.213.")
        srv = subprocess.Popen(net.exec_prefix(0) + [sys.executable, "-c", server, addr],
                               stdout=subprocess.PIPE, text=True)
        subprocess.run(net.exec_prefix(1) + [sys.executable, "-c", client, addr], check=True, timeout=30)
        assert srv.communicate(timeout=30)[0].strip() == "200000"
        # The sender's qdisc saw the payload plus TCP/IP headers.
        assert 200000 < net.tx_bytes(1) < 200000 * 1.2
    assert not set(names) & set(netem.namespaces())


@pytest.mark.skipif(ROOT_REASON is not None, reason=f"network emulation unavailable: {ROOT_REASON}")
def test_namespaces_are_removed_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with netem.EmulatedNetwork(2, "1gbit") as net:
            names = [h.namespace for h in net.hosts] + [net.bridge]
            raise RuntimeError("boom")
    assert not set(names) & set(netem.namespaces())
    # A failure half-way through building (a bad rate reaches tc) leaves nothing behind either.
    broken = netem.EmulatedNetwork(2, "1gbit")
    broken.rate = "nonsense"
    with pytest.raises(netem.NetemUnavailable, match="tc"):
        broken.__enter__()
    assert not any(n.startswith(broken.run_id) for n in netem.namespaces())
