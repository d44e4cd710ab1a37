"""GTC codec: C++ (disttrain._gtc_codec) against the pure-torch reference, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from disttrain import gtc
from disttrain.gtc import NonFiniteGradientError, reference_decode, reference_encode

cpp = pytest.mark.skipif(not gtc.HAVE_CPP, reason="C++ codec not built")
C = getattr(gtc, "_C", None)

# Sizes around the 64-element inner block and past the 2-thread split (2 * 65536 elements).
SIZES = [0, 1, 2, 63, 64, 65, 1000, 4099, 131_072 + 17, 300_001]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def rand_case(n: int, seed: int, density: float = 0.01):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=gen)
    residual = torch.randn(n, generator=gen) * 0.5
    # |r + g| has std ~1.12; pick tau so that roughly `density` of the entries qualify
    tau = float(np.float32(1.118 * abs(np.quantile(np.random.default_rng(seed).standard_normal(20000), density / 2))))
    return grad, residual, tau


def cpp_encode(grad, residual, tau, capacity=None, strategy=None):
    """encode through the C++ module directly (strategy None: the public wrapper)."""
    if strategy is None:
        return gtc.encode(grad, residual, tau, capacity)
    return gtc._encode_cpp(grad, residual, tau, capacity, strategy)


def check_against_reference(grad, residual, tau, capacity=None, strategies=(None, 0, 1)):
    r_ref = residual.clone()
    w_ref = reference_encode(grad, r_ref, tau, capacity)
    assert w_ref.dtype == torch.int32
    for s in strategies:
        if s == 0 and capacity is not None:
            continue  # strategy 0 has no capacity; C++ falls back to 1 anyway
        r = residual.clone()
        w = cpp_encode(grad, r, tau, capacity, s)
        assert torch.equal(w, w_ref), f"words differ (strategy {s})"
        assert same(r, r_ref), f"residual differs (strategy {s})"
    return w_ref, r_ref


# ------------------------------------------------------------------ encode: C++ == reference


@cpp
@pytest.mark.parametrize("n", SIZES)
def test_encode_matches_reference_random(n):
    grad, residual, tau = rand_case(n, seed=n)
    w, r = check_against_reference(grad, residual, tau)
    # the words really are the threshold crossings, in index order
    s = residual + grad
    expect = (s.abs() >= tau).nonzero().reshape(-1)
    idx, signs = gtc.words_to_indices_signs(w)
    assert torch.equal(idx, expect)
    assert torch.equal(signs, torch.where(s[expect] < 0, -1.0, 1.0))
    if n >= 1000:
        assert 0 < w.numel() < n


@cpp
@pytest.mark.parametrize("n", [1, 2, 64, 65, 300_001])
def test_encode_edges(n):
    tau = 0.5
    # index 0 and the last index above tau, nothing else
    g = torch.zeros(n)
    g[0] = -0.75
    g[-1] = 0.5  # exactly tau qualifies
    w, r = check_against_reference(g, torch.zeros(n), tau)
    idx, signs = gtc.words_to_indices_signs(w)
    assert idx.tolist() == sorted({0, n - 1})
    assert signs[0].item() == (1.0 if n == 1 else -1.0)
    # entries exactly at +-tau alone inside a 64-element block, and just below tau
    if n >= 64:
        g = torch.zeros(n)
        pos = torch.tensor(sorted({5, 130 % n, n // 2 + 3, n - 40}))
        g[pos] = torch.where(pos % 2 == 0, -0.5, 0.5)
        g[pos[:-1] + 1] = float(np.nextafter(np.float32(0.5), np.float32(0)))
        for cap in (None, 100):
            w, r = check_against_reference(g, torch.zeros(n), tau, capacity=cap)
            assert torch.equal(gtc.words_to_indices_signs(w)[0], pos)
            assert torch.count_nonzero(r) == pos.numel() - 1
    # nothing above tau
    w, r = check_against_reference(torch.full((n,), 0.49), torch.zeros(n), tau)
    assert w.numel() == 0
    # everything above tau, alternating signs
    g = torch.full((n,), 0.625)
    g[1::2] = -0.625
    w, r = check_against_reference(g, torch.zeros(n), tau)
    idx, signs = gtc.words_to_indices_signs(w)
    assert torch.equal(idx, torch.arange(n))
    assert torch.equal(signs, torch.sign(g))
    assert torch.equal(r, torch.sign(g) * 0.125)


@cpp
@pytest.mark.parametrize("n", [0, 1, 1000, 300_001])
def test_capacity(n):
    grad, residual, tau = rand_case(n, seed=7 + n, density=0.05)
    full = ((residual + grad).abs() >= tau).sum().item()
    for cap in sorted({0, 1, full // 2, max(full - 1, 0), full, full + 10}):
        w, r = check_against_reference(grad, residual, tau, capacity=cap)
        assert w.numel() == min(cap, full)
        s = residual + grad
        sent, _ = gtc.words_to_indices_signs(w)
        kept = torch.ones(n, dtype=torch.bool)
        kept[sent] = False
        assert same(r[kept], s[kept]), "unsent entries keep their full residual"
        if w.numel():
            # the sent entries are the first qualifying ones in index order
            first = (s.abs() >= tau).nonzero().reshape(-1)[: w.numel()]
            assert torch.equal(sent, first)


@cpp
def test_thread_count_does_not_change_output():
    n = 1_000_003
    grad, residual, tau = rand_case(n, seed=3, density=0.003)
    big = _random_words(n, 100_000, 4)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            r = residual.clone()
            w = gtc.encode(grad, r, tau)
            assert C.get_num_threads() == t
            r2 = residual.clone()
            w2 = gtc.encode(grad, r2, tau, capacity=1000)
            out = torch.randn(n, generator=torch.Generator().manual_seed(5))
            gtc.decode(out, [w, w2, big, w], tau, 1.0 / 3.0)  # big: parallel decode path
            outs.append((w, r, w2, r2, out))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert same(a, b)


# ------------------------------------------------------------------ decode


def _random_words(n, k, seed, sort=True, unique=True):
    gen = torch.Generator().manual_seed(seed)
    if unique:
        idx = torch.randperm(n, generator=gen)[:k]
    else:
        idx = torch.randint(0, n, (k,), generator=gen)
    if sort:
        idx = idx.sort().values
    neg = torch.rand(k, generator=gen) < 0.5
    return gtc.indices_signs_to_words(idx, neg)


@cpp
@pytest.mark.parametrize("n", [1, 100, 70_000])
def test_decode_matches_reference(n):
    gen = torch.Generator().manual_seed(n)
    msgs = [
        _random_words(n, min(n, 50_000), 1),  # sorted, unique: parallel path
        _random_words(n, min(n, 40), 2, sort=False),  # unsorted
        _random_words(n, 3 * n, 3, sort=False, unique=False),  # many repeats in one message
        torch.zeros(0, dtype=torch.int32),  # empty message
        _random_words(n, min(n, 50_000), 1),  # same as the first: repeats across messages
    ]
    base = torch.randn(n, generator=gen) * 3
    for scale, tau in ((1.0, 2.0**-5), (1.0 / 3.0, 0.0123), (-0.7, 0.0123)):
        ref = reference_decode(base.clone(), msgs, tau, scale)
        got = gtc.decode(base.clone(), msgs, tau, scale)
        assert same(got, ref)
        # one list == the same messages one by one
        one = base.clone()
        for m in msgs:
            gtc.decode(one, m, tau, scale)
        assert same(one, ref)
        # sequential plain-python semantics
        if n == 100 and scale == 1.0 / 3.0:
            step = np.float32(np.float32(tau) * np.float32(scale))
            exp = base.numpy().copy()
            for m in msgs:
                for w in m.numpy().astype(np.int64) & 0xFFFFFFFF:
                    exp[w >> 1] = np.float32(exp[w >> 1] + (-step if w & 1 else step))
            assert same(got, torch.from_numpy(exp))


def test_decode_shapes_and_returns_out():
    out = torch.zeros(2, 3)
    w = gtc.indices_signs_to_words(torch.tensor([0, 5]), torch.tensor([False, True]))
    assert gtc.decode(out, w, 0.5) is out
    assert out.tolist() == [[0.5, 0, 0], [0, 0, -0.5]]
    assert reference_decode(torch.zeros(2, 3), w, 0.5).tolist() == out.tolist()


@pytest.mark.parametrize("fn", [gtc.decode, reference_decode])
def test_decode_index_out_of_range(fn):
    out = torch.ones(10)
    good = gtc.indices_signs_to_words(torch.tensor([1, 2]), torch.tensor([False, False]))
    bad = gtc.indices_signs_to_words(torch.tensor([3, 10]), torch.tensor([False, False]))
    with pytest.raises(IndexError, match="index 10"):
        fn(out, [good, bad], 1.0)
    assert torch.equal(out, torch.ones(10)), "out untouched when a later message is bad"
    with pytest.raises(ValueError):
        fn(out, good.to(torch.int64), 1.0)
    with pytest.raises(ValueError):
        fn(out, good, 0.0)


def test_words_layout_high_indices():
    idx = torch.tensor([0, 1, 2**30, 2**31 - 1])
    neg = torch.tensor([True, False, True, False])
    w = gtc.indices_signs_to_words(idx, neg)
    assert w.dtype == torch.int32
    assert w.tolist() == [1, 2, -(2**31) + 1, -2]
    i2, s2 = gtc.words_to_indices_signs(w)
    assert torch.equal(i2, idx) and s2.tolist() == [-1.0, 1.0, -1.0, 1.0]


# ------------------------------------------------------------------ conservation and draining


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_conservation_exact_dyadic(impl):
    if impl == "cpp" and not gtc.HAVE_CPP:
        pytest.skip("C++ codec not built")
    enc = gtc.encode if impl == "cpp" else reference_encode
    dec = gtc.decode if impl == "cpp" else reference_decode
    n, workers, steps, tau = 5000, 4, 30, 2.0**-4
    gen = torch.Generator().manual_seed(11)
    residuals = [torch.zeros(n) for _ in range(workers)]
    decoded = torch.zeros(n)
    total = torch.zeros(n, dtype=torch.float64)
    sent = 0
    for step in range(steps):
        msgs = []
        for k in range(workers):
            g = torch.randint(-300, 301, (n,), generator=gen).float() * 2.0**-10  # dyadic
            total += g.double()
            msgs.append(enc(g, residuals[k], tau, capacity=200 if step % 3 == 0 else None))
        sent += sum(m.numel() for m in msgs)
        dec(decoded, msgs, tau)
    assert sent > 1000
    lhs = decoded.double() + sum(r.double() for r in residuals)
    assert torch.equal(lhs, total), "sent + residual must equal the sum of all gradients exactly"


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_large_entry_drains_over_steps(impl):
    if impl == "cpp" and not gtc.HAVE_CPP:
        pytest.skip("C++ codec not built")
    enc = gtc.encode if impl == "cpp" else reference_encode
    tau = 0.25
    r = torch.zeros(3)
    g = torch.tensor([0.0, -0.875, 0.125])  # -3.5 tau
    sent = []
    for _ in range(5):
        w = enc(g, r, tau)
        sent.append(gtc.words_to_indices_signs(w)[0].tolist())
        g = torch.zeros(3)
    assert sent == [[1], [1], [1], [], []]
    assert r.tolist() == [0.0, -0.125, 0.125]


# ------------------------------------------------------------------ errors


def _encoders():
    out = [("reference", lambda g, r, t, c=None: reference_encode(g, r, t, c))]
    if gtc.HAVE_CPP:
        out += [
            ("wrapper", lambda g, r, t, c=None: gtc.encode(g, r, t, c)),
            ("strategy0", lambda g, r, t, c=None: cpp_encode(g, r, t, c, 0)),
            ("strategy1", lambda g, r, t, c=None: cpp_encode(g, r, t, c, 1)),
        ]
    return out


@pytest.mark.parametrize("name,enc", _encoders())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 7777, 299_999])
def test_nonfinite_grad_raises_and_keeps_residual(name, enc, bad, where):
    grad, residual, tau = rand_case(300_000, seed=1, density=0.05)
    grad[where] = bad
    grad[where + 1 :: 50_000] = bad  # later bad entries must not be the one reported
    before = residual.clone()
    for cap in (None, 100):
        with pytest.raises(NonFiniteGradientError, match=f"index {where}") as ei:
            enc(grad, residual, tau, cap)
        assert isinstance(ei.value, FloatingPointError)
        assert ei.value.index == where and ei.value.what == "grad"
        assert same(residual, before), "residual must be untouched"


@pytest.mark.parametrize("name,enc", _encoders())
def test_nonfinite_sum(name, enc):
    grad = torch.zeros(1000)
    residual = torch.zeros(1000)
    grad[500] = 3e38
    residual[500] = 3e38  # finite inputs, float32 overflow of the sum
    before = residual.clone()
    for cap in (5, None):
        with pytest.raises(NonFiniteGradientError, match="index 500") as ei:
            enc(grad, residual, 1.0, cap)
        assert ei.value.index == 500 and ei.value.what == "sum"
        if name in ("wrapper", "strategy0") and cap is None:
            assert ei.value.residual_modified  # documented: the fast path notices it mid-pass
        else:
            assert same(residual, before)
            assert not ei.value.residual_modified


@pytest.mark.parametrize("enc", [gtc.encode, reference_encode])
def test_argument_errors(enc):
    g, r = torch.ones(4), torch.zeros(4)
    for tau in (0.0, -1.0, float("nan"), float("inf"), 1e-50, "x"):
        with pytest.raises(ValueError, match="tau"):
            enc(g, r, tau)
    with pytest.raises(ValueError, match="shape"):
        enc(torch.ones(5), r, 1.0)
    with pytest.raises(ValueError, match="float32"):
        enc(g.double(), r, 1.0)
    with pytest.raises(ValueError, match="float32"):
        enc(g, r.half(), 1.0)
    with pytest.raises(ValueError, match="capacity"):
        enc(g, r, 1.0, -1)
    assert torch.equal(r, torch.zeros(4))


def test_numel_limit_check():
    gtc.check_numel(2**31 - 1)
    with pytest.raises(ValueError, match="31 bits"):
        gtc.check_numel(2**31)
    if gtc.HAVE_CPP:
        C.check_numel(2**31 - 1)
        with pytest.raises(ValueError, match="31 bits"):
            C.check_numel(2**31)
        assert C.MAX_NUMEL == gtc.MAX_NUMEL


@cpp
def test_cpp_buffer_validation():
    g, r = np.ones(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="float32"):
        C.encode(g.astype(np.float64), r, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        C.encode(np.ones(16, np.float32)[::2], r, 1.0)
    with pytest.raises(ValueError, match="elements"):
        C.encode(g, np.zeros(9, np.float32), 1.0)
    with pytest.raises(ValueError, match="tau"):
        C.encode(g, r, 0.0)
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        C.encode(g, ro, 1.0)
    with pytest.raises(ValueError):
        C.set_num_threads(0)


def test_noncontiguous_and_shaped_tensors_use_reference_path():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(30, 40, generator=gen).t()  # 40 x 30, non-contiguous
    r = torch.zeros(30, 40).t()
    r_ref = torch.zeros(40, 30)
    assert not g.is_contiguous() and not r.is_contiguous()
    w = gtc.encode(g, r, 1.5)
    w_ref = reference_encode(g.contiguous(), r_ref, 1.5)
    assert torch.equal(w, w_ref) and same(r.contiguous(), r_ref)
    out = torch.zeros(30, 40).t()
    gtc.decode(out, w, 1.5)
    assert torch.equal(out.contiguous(), reference_decode(torch.zeros(40, 30), w, 1.5))
    assert torch.equal(out.contiguous().view(-1)[gtc.words_to_indices_signs(w)[0]].abs(),
                       torch.full((w.numel(),), 1.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_reference_matches_cpu():  # pragma: no cover - no GPU on the CPU machines
    grad, residual, tau = rand_case(100_000, seed=9)
    r_cpu = residual.clone()
    w_cpu = gtc.encode(grad, r_cpu, tau)
    r_gpu = residual.cuda()
    w_gpu = gtc.encode(grad.cuda(), r_gpu, tau)
    assert torch.equal(w_gpu.cpu(), w_cpu) and same(r_gpu.cpu(), r_cpu)
    out = torch.randn(100_000)
    assert same(gtc.decode(out.cuda(), [w_gpu, w_gpu], tau, 0.5).cpu(), gtc.decode(out.clone(), [w_cpu, w_cpu], tau, 0.5))
