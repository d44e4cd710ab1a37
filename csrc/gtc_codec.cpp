// Gradient threshold compression (Strom, Interspeech 2015): encode / decode kernels.
//
// Built as ``disttrain._gtc_codec`` (see setup.py).  pybind11 over raw buffers only:
// no libtorch, so there is no torch ABI to match.  The Python side
// (disttrain/gtc/__init__.py) hands in zero-copy numpy views of CPU tensors.
//
// Word layout: uint32 word = (index << 1) | sign_bit, sign_bit = 1 for a negative step;
// stored in an int32 array (indices >= 2^30 give negative int32 values; read them as
// uint32).  Hence a tensor must have fewer than 2^31 elements.
//
// encode(grad, residual, tau, capacity=-1) -> int32 words
//     residual += grad; for every i (in index order) with |residual[i]| >= tau emit
//     word(i, sign) and residual[i] -= sign * tau (only tau, never the whole value).
//     capacity >= 0: only the first `capacity` qualifying indices are emitted and
//     drained; the others keep their full residual (grad still added).
//
//     Non-finite values.  Nothing is stored before the whole input has been checked, so
//     on error the residual is left bit-for-bit untouched.  Two strategies:
//       * strategy 1 "checked" (what the raw ``encode`` here does; disttrain.gtc.encode uses it
//         when a capacity is given): pass 1 reads grad and residual, forms
//         s = residual + grad in registers without storing, counts the qualifying
//         entries per thread chunk and finds the first index where grad or s is not
//         finite (covers NaN/Inf gradients, a residual that already holds NaN/Inf, and
//         float32 overflow of the sum).  Prefix sum of the counts gives every thread its
//         output offset (and its share of `capacity`); pass 2 re-reads, stores the
//         residual and writes the words straight into the output array.  Output order
//         is index order for any thread count.
//       * strategy 0 "fast" (what disttrain.gtc.encode uses without capacity; reach it here via
//         ``_encode_strategy(..., strategy=0)``): pass 1 reads only grad (finiteness check, 4 bytes/element);
//         pass 2 is one fused pass (residual += grad, threshold, drain) that collects
//         words in per-thread buffers, concatenated in thread order.  Cheaper, but a
//         non-finite *sum* (residual already non-finite or overflow) is only noticed
//         during pass 2, when the residual has been partly updated; that case raises
//         too, with the residual state documented as updated.  capacity is not
//         supported by this strategy (it falls back to "checked").
//       Measured on the 2-core CPU box, 25M elements, 0.1% density, one thread: "fast" ~0.9x and
//       "checked" ~0.7x the bandwidth of a preallocated copy_ (counting 12 resp. 8 bytes/element).
//     Errors raise FloatingPointError(message, flat_index, what) where what is
//     "grad" or "sum".
//
// decode(out, words, tau, scale=1.0) / decode_many(out, [words...], tau, scale=1.0)
//     out[idx] += (sign ? -step : +step), step = float(tau) * float(scale) computed once
//     in float32.  Words are applied in order, messages in list order, so every rank
//     gets bitwise identical results.  All messages are validated (index < out size)
//     before anything is written.  A message whose indices are strictly increasing (all
//     encode output is) is applied by several threads over disjoint word ranges, which
//     touch disjoint entries, so the result does not depend on the thread count; any
//     other message is applied serially in word order.
//
// The GIL is released while kernels run.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef DISTTRAIN_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxNumel = int64_t(1) << 31;  // indices must fit in 31 bits
constexpr int64_t kBlock = 64;                   // inner vector block (elements)
constexpr int64_t kMinPerThread = int64_t(1) << 16;
constexpr int64_t kMinWordsPerThread = int64_t(1) << 14;

int g_num_threads = 1;

struct NonFinite {
    int64_t index;
    std::string what;  // "grad" or "sum"
    std::string message;
};

void check_numel(int64_t n) {
    if (n < 0) throw py::value_error("gtc: negative size");
    if (n >= kMaxNumel)
        throw py::value_error(
            "gtc: tensor has " + std::to_string(n) +
            " elements; GTC words are 32-bit (index << 1 | sign), so the flat index must fit in 31 "
            "bits: at most 2^31 - 1 = 2147483647 elements per encoded tensor. Split the "
            "parameter into smaller tensors.");
}

float checked_tau(double tau) {
    float t = static_cast<float>(tau);
    if (!(tau > 0.0) || !std::isfinite(tau) || !(t > 0.0f) || !std::isfinite(t))
        throw py::value_error("gtc: tau must be a finite positive number representable in float32, got " +
                              std::to_string(tau));
    return t;
}

int threads_for(int64_t work, int64_t min_per_thread) {
    int64_t t = std::max<int64_t>(1, work / min_per_thread);
    return static_cast<int>(std::min<int64_t>(t, std::max(1, g_num_threads)));
}

// Contiguous chunk [begin, end) of thread t of T, chunk starts aligned to kBlock.
inline void chunk(int64_t n, int t, int T, int64_t &b, int64_t &e) {
    int64_t per = (n + T - 1) / T;
    per = (per + kBlock - 1) / kBlock * kBlock;
    b = std::min<int64_t>(n, per * t);
    e = std::min<int64_t>(n, b + per);
}

// Run fn(t) for t in [0, T) on T threads (OpenMP), or inline when T == 1 (no parallel region at
// all, so a forked child that set one thread never touches the parent's thread pool).
template <class F>
void run_threads(int T, F &&fn) {
#ifdef DISTTRAIN_OPENMP
    if (T > 1) {
#pragma omp parallel num_threads(T)
        fn(omp_get_thread_num());
        return;
    }
#endif
    for (int t = 0; t < T; ++t) fn(t);
}

inline uint32_t make_word(int64_t i, float s) {
    return (static_cast<uint32_t>(i) << 1) | (s < 0.0f ? 1u : 0u);
}

inline bool finite(float x) { return std::fabs(x) <= FLT_MAX; }

// Only tau leaves the residual, never the whole value: a large entry drains over several steps.
inline float drain(float s, float tau) { return s < 0.0f ? s + tau : s - tau; }

// ---------------------------------------------------------------- buffers

struct F32 {
    float *ptr;
    int64_t n;
};

F32 f32_buffer(py::buffer &b, const char *name, bool writable) {
    py::buffer_info info = b.request(writable);
    if (info.format != py::format_descriptor<float>::format() || info.itemsize != 4)
        throw py::value_error(std::string("gtc: ") + name + " must be float32, got format '" + info.format + "'");
    if (info.ndim != 1) throw py::value_error(std::string("gtc: ") + name + " must be 1-D");
    if (info.size > 1 && info.strides[0] != 4) throw py::value_error(std::string("gtc: ") + name + " must be contiguous");
    return {static_cast<float *>(info.ptr), static_cast<int64_t>(info.size)};
}

struct Words {
    const uint32_t *ptr;
    int64_t n;
};

Words word_buffer(py::buffer &b) {
    py::buffer_info info = b.request(false);
    bool ok = info.itemsize == 4 && (info.format == py::format_descriptor<int32_t>::format() ||
                                     info.format == py::format_descriptor<uint32_t>::format());
    if (!ok) throw py::value_error("gtc: words must be int32 (or uint32), got format '" + info.format + "'");
    if (info.ndim != 1) throw py::value_error("gtc: words must be 1-D");
    if (info.size > 1 && info.strides[0] != 4) throw py::value_error("gtc: words must be contiguous");
    return {static_cast<const uint32_t *>(info.ptr), static_cast<int64_t>(info.size)};
}

// ---------------------------------------------------------------- encode kernels

// Pass 1 of "checked": count qualifying entries of s = r + g in [b, e), no stores.
// Returns the count; *bad = first index in [b, e) where g or s is not finite (else e).
int64_t scan_chunk(const float *__restrict g, const float *__restrict r, int64_t b, int64_t e, float tau,
                   int64_t *bad) {
    int64_t count = 0;
    int64_t i = b;
    for (; i + kBlock <= e; i += kBlock) {
        int c = 0, nf = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
            float gv = g[i + j];
            float s = r[i + j] + gv;
            c += std::fabs(s) >= tau;
            nf |= !(std::fabs(s) <= FLT_MAX) | !(std::fabs(gv) <= FLT_MAX);
        }
        if (nf) {
            for (int64_t j = 0; j < kBlock; ++j)
                if (!finite(g[i + j]) || !finite(r[i + j] + g[i + j])) {
                    *bad = i + j;
                    return count;
                }
        }
        count += c;
    }
    for (; i < e; ++i) {
        float s = r[i] + g[i];
        if (!finite(g[i]) || !finite(s)) {
            *bad = i;
            return count;
        }
        count += std::fabs(s) >= tau;
    }
    *bad = e;
    return count;
}

// Pass 2 of "checked": r = g + r, drain and emit the first `limit` qualifying entries.
void apply_chunk(const float *__restrict g, float *__restrict r, int64_t b, int64_t e, float tau, int64_t limit,
                 uint32_t *__restrict out) {
    int64_t k = 0;
    int64_t i = b;
    for (; i + kBlock <= e; i += kBlock) {
        int any = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
            float s = r[i + j] + g[i + j];
            r[i + j] = s;
            any |= std::fabs(s) >= tau;
        }
        if (any && k < limit) {
            for (int64_t j = 0; j < kBlock && k < limit; ++j) {
                float s = r[i + j];
                if (std::fabs(s) >= tau) {
                    r[i + j] = drain(s, tau);
                    out[k++] = make_word(i + j, s);
                }
            }
        }
    }
    for (; i < e; ++i) {
        float s = r[i] + g[i];
        if (k < limit && std::fabs(s) >= tau) {
            out[k++] = make_word(i, s);
            s = drain(s, tau);
        }
        r[i] = s;
    }
}

// Strategy 0, pass 1: first non-finite grad index in [b, e) (e if none).
int64_t grad_check_chunk(const float *__restrict g, int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + 4 * kBlock <= e; i += 4 * kBlock) {
        int nf = 0;
        for (int64_t j = 0; j < 4 * kBlock; ++j) nf |= !(std::fabs(g[i + j]) <= FLT_MAX);
        if (nf) break;
    }
    for (; i < e; ++i)
        if (!finite(g[i])) return i;
    return e;
}

// Strategy 0, pass 2: fused r += g, threshold, drain, words into `out`.
// Returns the first index with a non-finite sum (e if none); continues past it.
int64_t fused_chunk(const float *__restrict g, float *__restrict r, int64_t b, int64_t e, float tau,
                    std::vector<uint32_t> &out) {
    int64_t bad = e;
    int64_t i = b;
    for (; i + kBlock <= e; i += kBlock) {
        int any = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
            float s = r[i + j] + g[i + j];
            r[i + j] = s;
            any |= !(std::fabs(s) < tau);  // qualifying, NaN or Inf
        }
        if (any) {
            for (int64_t j = 0; j < kBlock; ++j) {
                float s = r[i + j];
                if (!finite(s)) {
                    if (bad == e) bad = i + j;
                } else if (std::fabs(s) >= tau) {
                    r[i + j] = drain(s, tau);
                    out.push_back(make_word(i + j, s));
                }
            }
        }
    }
    for (; i < e; ++i) {
        float s = r[i] + g[i];
        if (!finite(s)) {
            if (bad == e) bad = i;
        } else if (std::fabs(s) >= tau) {
            out.push_back(make_word(i, s));
            s = drain(s, tau);
        }
        r[i] = s;
    }
    return bad;
}

[[noreturn]] void throw_nonfinite(int64_t index, const std::string &what, const std::string &state) {
    std::string msg;
    if (what == "grad")
        msg = "gtc.encode: gradient is not finite (NaN or Inf) at flat index " + std::to_string(index) + "; " + state;
    else
        msg = "gtc.encode: residual + gradient is not finite at flat index " + std::to_string(index) +
              " (the residual already held NaN/Inf or the sum overflowed float32); " + state;
    throw NonFinite{index, what, msg};
}

py::array_t<int32_t> encode_impl(py::buffer grad_b, py::buffer res_b, double tau_d, int64_t capacity, int strategy) {
    F32 g = f32_buffer(grad_b, "grad", false);
    F32 r = f32_buffer(res_b, "residual", true);
    if (g.n != r.n)
        throw py::value_error("gtc.encode: grad has " + std::to_string(g.n) + " elements but residual has " +
                              std::to_string(r.n));
    check_numel(g.n);
    const float tau = checked_tau(tau_d);
    const int64_t n = g.n;
    if (g.ptr == r.ptr && n > 0) throw py::value_error("gtc.encode: grad and residual must not share memory");
    if (n == 0) return py::array_t<int32_t>(0);
    if (capacity >= 0 || strategy != 0) strategy = 1;
    const int T = threads_for(n, kMinPerThread);

    if (strategy == 0) {
        std::vector<int64_t> bad(T, n);
        std::vector<std::vector<uint32_t>> local(T);
        int64_t first_bad = n;
        {
            py::gil_scoped_release nogil;
            run_threads(T, [&](int t) {
                int64_t b, e;
                chunk(n, t, T, b, e);
                int64_t x = grad_check_chunk(g.ptr, b, e);
                bad[t] = x < e ? x : n;
            });
            for (int t = 0; t < T; ++t) first_bad = std::min(first_bad, bad[t]);
            if (first_bad == n) {
                run_threads(T, [&](int t) {
                    int64_t b, e;
                    chunk(n, t, T, b, e);
                    local[t].reserve(static_cast<size_t>((e - b) / 256 + 64));
                    int64_t x = fused_chunk(g.ptr, r.ptr, b, e, tau, local[t]);
                    bad[t] = x < e ? x : n;
                });
            }
        }
        if (first_bad < n) throw_nonfinite(first_bad, "grad", "residual left unchanged");
        for (int t = 0; t < T; ++t) first_bad = std::min(first_bad, bad[t]);
        if (first_bad < n)
            throw_nonfinite(first_bad, "sum",
                            "the residual HAS been updated (residual += grad, finite entries drained)");
        int64_t total = 0;
        for (auto &v : local) total += static_cast<int64_t>(v.size());
        py::array_t<int32_t> words(total);
        int32_t *w = words.mutable_data();
        {
            py::gil_scoped_release nogil;
            for (auto &v : local) {
                if (!v.empty()) std::memcpy(w, v.data(), v.size() * sizeof(uint32_t));
                w += v.size();
            }
        }
        return words;
    }

    // strategy 1: scan (no stores), prefix sum, apply.
    std::vector<int64_t> count(T, 0), bad(T, n);
    {
        py::gil_scoped_release nogil;
        run_threads(T, [&](int t) {
            int64_t b, e, x;
            chunk(n, t, T, b, e);
            count[t] = scan_chunk(g.ptr, r.ptr, b, e, tau, &x);
            bad[t] = x < e ? x : n;
        });
    }
    int64_t first_bad = n;
    for (int t = 0; t < T; ++t) first_bad = std::min(first_bad, bad[t]);
    if (first_bad < n)
        throw_nonfinite(first_bad, finite(g.ptr[first_bad]) ? "sum" : "grad", "residual left unchanged");
    std::vector<int64_t> offset(T + 1, 0), limit(T, 0);
    for (int t = 0; t < T; ++t) offset[t + 1] = offset[t] + count[t];
    const int64_t total = capacity >= 0 ? std::min(capacity, offset[T]) : offset[T];
    for (int t = 0; t < T; ++t) limit[t] = std::max<int64_t>(0, std::min(count[t], total - offset[t]));
    py::array_t<int32_t> words(total);
    uint32_t *w = reinterpret_cast<uint32_t *>(words.mutable_data());
    {
        py::gil_scoped_release nogil;
        run_threads(T, [&](int t) {
            int64_t b, e;
            chunk(n, t, T, b, e);
            apply_chunk(g.ptr, r.ptr, b, e, tau, limit[t], w + offset[t]);
        });
    }
    return words;
}

// ---------------------------------------------------------------- decode

float checked_step(double tau_d, double scale_d) {
    float tau = checked_tau(tau_d);
    float scale = static_cast<float>(scale_d);
    if (!std::isfinite(scale_d) || !std::isfinite(scale))
        throw py::value_error("gtc.decode: scale must be finite, got " + std::to_string(scale_d));
    float step = tau * scale;  // one float32 product; the Python reference does the same
    if (!std::isfinite(step)) throw py::value_error("gtc.decode: tau * scale overflows float32");
    return step;
}

// Max index in the message and whether indices are strictly increasing.
void scan_words(const Words &m, uint32_t *max_idx, bool *increasing) {
    const int T = threads_for(m.n, kMinWordsPerThread);
    std::vector<uint32_t> mx(T, 0);
    std::vector<int> inc(T, 1);
    run_threads(T, [&](int t) {
        int64_t b = m.n * t / T, e = m.n * (t + 1) / T;
        uint32_t hi = 0;
        int ok = 1;
        uint32_t prev = b > 0 ? (m.ptr[b - 1] >> 1) : 0;
        bool have_prev = b > 0;
        for (int64_t i = b; i < e; ++i) {
            uint32_t idx = m.ptr[i] >> 1;
            hi = std::max(hi, idx);
            ok &= !have_prev || idx > prev;
            prev = idx;
            have_prev = true;
        }
        mx[t] = hi;
        inc[t] = ok;
    });
    *max_idx = 0;
    *increasing = true;
    for (int t = 0; t < T; ++t) {
        *max_idx = std::max(*max_idx, mx[t]);
        *increasing = *increasing && inc[t];
    }
}

inline void apply_words(float *__restrict out, const uint32_t *__restrict w, int64_t b, int64_t e, float step) {
    // Words of a sparse message hit scattered cache lines (typically a new page each): prefetch
    // the target a few words ahead so the misses overlap.  Prefetching never changes results.
    const float neg = -step;
    constexpr int64_t kAhead = 16;
    int64_t i = b;
    for (; i + kAhead < e; ++i) {
        __builtin_prefetch(out + (w[i + kAhead] >> 1), 1, 0);
        uint32_t x = w[i];
        out[x >> 1] += (x & 1u) ? neg : step;
    }
    for (; i < e; ++i) {
        uint32_t x = w[i];
        out[x >> 1] += (x & 1u) ? neg : step;
    }
}

void decode_messages(F32 out, const std::vector<Words> &msgs, float step) {
    std::vector<char> inc(msgs.size(), 0);
    for (size_t k = 0; k < msgs.size(); ++k) {
        if (msgs[k].n == 0) continue;
        uint32_t hi;
        bool increasing;
        scan_words(msgs[k], &hi, &increasing);
        if (static_cast<int64_t>(hi) >= out.n)
            throw std::out_of_range("gtc.decode: message " + std::to_string(k) + " holds index " + std::to_string(hi) +
                                    " but out has only " + std::to_string(out.n) +
                                    " elements (wrong tensor, or words from another layout); out left unchanged");
        inc[k] = increasing;
    }
    for (size_t k = 0; k < msgs.size(); ++k) {
        const Words &m = msgs[k];
        if (m.n == 0) continue;
        const int T = inc[k] ? threads_for(m.n, kMinWordsPerThread) : 1;
        if (T == 1) {
            apply_words(out.ptr, m.ptr, 0, m.n, step);
            continue;
        }
        run_threads(T, [&](int t) { apply_words(out.ptr, m.ptr, m.n * t / T, m.n * (t + 1) / T, step); });
    }
}

void decode_many_impl(py::buffer out_b, py::list messages, double tau, double scale) {
    F32 out = f32_buffer(out_b, "out", true);
    const float step = checked_step(tau, scale);
    std::vector<py::buffer> keep;
    std::vector<Words> msgs;
    keep.reserve(py::len(messages));
    for (auto item : messages) {
        keep.push_back(py::reinterpret_borrow<py::buffer>(item));
        msgs.push_back(word_buffer(keep.back()));
    }
    std::string err;
    {
        py::gil_scoped_release nogil;
        try {
            decode_messages(out, msgs, step);
        } catch (const std::out_of_range &e) {
            err = e.what();
        }
    }
    if (!err.empty()) throw py::index_error(err);
}

void decode_impl(py::buffer out_b, py::buffer words_b, double tau, double scale) {
    py::list l;
    l.append(words_b);
    decode_many_impl(out_b, l, tau, scale);
}

}  // namespace

PYBIND11_MODULE(_gtc_codec, m) {
    m.doc() = "GTC (Strom 2015) threshold encode/decode over raw float32/int32 buffers; see csrc/gtc_codec.cpp";
#ifdef DISTTRAIN_OPENMP
    g_num_threads = std::max(1, omp_get_max_threads());
    m.attr("HAVE_OPENMP") = true;
#else
    m.attr("HAVE_OPENMP") = false;
#endif
    m.attr("MAX_NUMEL") = py::int_(kMaxNumel - 1);

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const NonFinite &e) {
            py::tuple args = py::make_tuple(e.message, e.index, e.what);
            PyErr_SetObject(PyExc_FloatingPointError, args.ptr());
        }
    });

    m.def(
        "encode",
        [](py::buffer grad, py::buffer residual, double tau, int64_t capacity) {
            return encode_impl(grad, residual, tau, capacity, 1);
        },
        py::arg("grad"), py::arg("residual"), py::arg("tau"), py::arg("capacity") = -1,
        "residual += grad; emit (i << 1 | sign) for |residual[i]| >= tau and subtract sign*tau there "
        "(first `capacity` indices only when capacity >= 0). Returns int32 words in index order. "
        "Raises FloatingPointError(msg, index, 'grad'|'sum') with the residual untouched on NaN/Inf.");
    m.def("_encode_strategy", &encode_impl, py::arg("grad"), py::arg("residual"), py::arg("tau"),
          py::arg("capacity") = -1, py::arg("strategy") = 1,
          "encode with an explicit strategy: 1 = checked two-pass (default of encode), 0 = grad pre-check + "
          "fused pass (see the file header for the difference on non-finite sums)");
    m.def("decode", &decode_impl, py::arg("out"), py::arg("words"), py::arg("tau"), py::arg("scale") = 1.0,
          "out[idx] += (sign ? -1 : 1) * (float(tau) * float(scale)) for each word, in word order.");
    m.def("decode_many", &decode_many_impl, py::arg("out"), py::arg("messages"), py::arg("tau"),
          py::arg("scale") = 1.0, "decode a list of word arrays in list order (all validated first).");
    m.def("check_numel", [](int64_t n) { check_numel(n); }, py::arg("n"),
          "raise ValueError if a tensor of n elements cannot be encoded in 32-bit words");
    m.def(
        "set_num_threads",
        [](int n) {
            if (n < 1) throw py::value_error("gtc: set_num_threads needs n >= 1");
            g_num_threads = n;
#ifdef DISTTRAIN_OPENMP
            omp_set_num_threads(n);
#endif
        },
        py::arg("n"));
    m.def("get_num_threads", []() { return g_num_threads; });
}
