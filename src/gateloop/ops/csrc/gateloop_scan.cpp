// GateLoop's scan as fused CPU loops: the forward recurrence with its output, and the adjoint
// recurrence with every gradient. The PyTorch reference is gateloop/ops/gateloop.py: _GateLoopScan;
// gateloop/ops/gateloop_fused.py loads this file and documents it. Two pairs of loops:
//   forward_loop / backward_loop:           max-headed (K = V = 1), vectorised over heads;
//   head_forward_loop / head_backward_loop: a [K, V] state per head, vectorised over V;
// behind one pair of entry points, forward and backward, at the end of the file.
//
// Per state entry, with a_t = ar_t + i ai_t (ai absent for a real decay) and x_t = k_t v_t:
//   forward:  S_t = a_t S_{t-1} + x_t,  o_t = q_t Re(S_t)            (summed over K for K > 1)
//   backward: r_t = q_t do_t + conj(a_{t+1}) r_{t+1}   (r_{T-1} also gets dL/dS_T)
//             dq_t = do_t Re(S_t),  dk_t = Re(r_t) v_t,  dv_t = Re(r_t) k_t,
//             dlog_a_t = r_t conj(a_t S_{t-1}),  dS0 = conj(a_0) r_0   (each summed over the
//             state entries its variable touches)
// All tensors are contiguous planes of one real dtype (a complex value is two planes).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 256;  // channels per parallel task

// The loops index raw memory: every plane must be a contiguous CPU tensor of q's dtype and shape.
void check(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == shape,
              "gateloop scan kernel: ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ",
              like.scalar_type(), "; got ", t.sizes(), " ", t.scalar_type());
}

void check(const c10::optional<at::Tensor>& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  if (t.has_value()) check(*t, like, shape, name);
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The inner loops below are branch-free (CPLX is a template parameter; a missing previous state
// or next transition points at a row of zeros or ones) so that the compiler vectorises them.
template <typename T, bool CPLX>
void forward_loop(const T* q, const T* k, const T* v, const T* ar, const T* ai, const T* h0r,
                  const T* h0i, T* o, T* Sr, T* Si, int64_t B, int64_t L, int64_t H, int64_t Ls) {
  const std::vector<T> zeros(H, T(0));
  at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin / H; b * H < end; ++b) {
      const int64_t h_lo = std::max(begin - b * H, int64_t(0)), h_hi = std::min(end - b * H, H);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * H;
        // States live at step t % Ls: every step (Ls = L, for the backward) or two alternating rows.
        const int64_t state = (b * Ls + t % Ls) * H, prev = (b * Ls + (t + Ls - 1) % Ls) * H;
        const T* pr = t ? Sr + prev : h0r ? h0r + b * H : zeros.data();
        const T* pi = CPLX ? (t ? Si + prev : h0i ? h0i + b * H : zeros.data()) : nullptr;
        const T *q_ = q + row, *k_ = k + row, *v_ = v + row, *ar_ = ar + row;
        const T* ai_ = CPLX ? ai + row : nullptr;
        T *o_ = o + row, *sr_ = Sr + state;
        T* si_ = CPLX ? Si + state : nullptr;
#pragma GCC ivdep
        for (int64_t h = h_lo; h < h_hi; ++h) {
          T sr = ar_[h] * pr[h] + k_[h] * v_[h];
          if constexpr (CPLX) {
            sr -= ai_[h] * pi[h];
            si_[h] = ar_[h] * pi[h] + ai_[h] * pr[h];
          }
          sr_[h] = sr;
          o_[h] = q_[h] * sr;
        }
      }
    }
  });
}

template <typename T, bool CPLX>
void backward_loop(const T* q, const T* k, const T* v, const T* ar, const T* ai, const T* Sr,
                   const T* Si, const T* h0r, const T* h0i, const T* dout, const T* dSr, const T* dSi,
                   T* dq, T* dk, T* dv, T* dlr, T* dli, T* dh0r, T* dh0i, int64_t B, int64_t L,
                   int64_t H) {
  const std::vector<T> zeros(H, T(0)), ones(H, T(1));
  at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> rr(end - begin), ri(end - begin);  // r_t of this task's channels, carried backwards
    for (int64_t b = begin / H; b * H < end; ++b) {
      const int64_t h_lo = std::max(begin - b * H, int64_t(0)), h_hi = std::min(end - b * H, H);
      T* r_re = rr.data() + b * H - begin;  // r of channel h at r_re[h]
      T* r_im = ri.data() + b * H - begin;
      for (int64_t h = h_lo; h < h_hi; ++h) {  // r starts as dL/dS_T, which a "transition" of 1 carries in
        r_re[h] = dSr[b * H + h];
        r_im[h] = CPLX ? dSi[b * H + h] : T(0);
      }
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t row = (b * L + t) * H;
        const T* pr = t ? Sr + row - H : h0r ? h0r + b * H : zeros.data();
        const T* pi = CPLX ? (t ? Si + row - H : h0i ? h0i + b * H : zeros.data()) : nullptr;
        const T* nr = t < L - 1 ? ar + row + H : ones.data();  // a_{t+1}
        const T* ni = CPLX ? (t < L - 1 ? ai + row + H : zeros.data()) : nullptr;
        const T *q_ = q + row, *k_ = k + row, *v_ = v + row, *ar_ = ar + row, *sr_ = Sr + row;
        const T* ai_ = CPLX ? ai + row : nullptr;
        const T* do_ = dout + row;
        T *dq_ = dq + row, *dk_ = dk + row, *dv_ = dv + row, *dlr_ = dlr + row;
        T* dli_ = CPLX ? dli + row : nullptr;
#pragma GCC ivdep
        for (int64_t h = h_lo; h < h_hi; ++h) {
          // r_t = q_t do_t + conj(a_{t+1}) r_{t+1}
          T re = nr[h] * r_re[h] + q_[h] * do_[h], im = T(0);
          if constexpr (CPLX) {
            re += ni[h] * r_im[h];
            im = nr[h] * r_im[h] - ni[h] * r_re[h];
            r_im[h] = im;
          }
          r_re[h] = re;
          dq_[h] = do_[h] * sr_[h];
          dk_[h] = re * v_[h];
          dv_[h] = re * k_[h];
          // dlog_a = r conj(u), u = a_t S_{t-1}
          if constexpr (CPLX) {
            const T u_re = ar_[h] * pr[h] - ai_[h] * pi[h], u_im = ar_[h] * pi[h] + ai_[h] * pr[h];
            dlr_[h] = re * u_re + im * u_im;
            dli_[h] = im * u_re - re * u_im;
          } else {
            dlr_[h] = re * ar_[h] * pr[h];
          }
        }
      }
      if (dh0r) {  // dS0 = conj(a_0) r_0
        for (int64_t h = h_lo; h < h_hi; ++h) {
          const int64_t j = b * L * H + h;
          dh0r[b * H + h] = ar[j] * r_re[h] + (CPLX ? ai[j] * r_im[h] : T(0));
          if (CPLX) dh0i[b * H + h] = ar[j] * r_im[h] - ai[j] * r_re[h];
        }
      }
    }
  });
}

// Heads with K, V >= 1: per (b, h) a [K, V] state, one decay per key channel (Kd = K) or per head
// (Kd = 1). The same equations with k_t v_t^T for x_t, o_t = Re(q_t^T S_t), and sums over V (and K
// for Kd = 1) in dq, dk, dv, dlog_a. Parallel over (b, h); the inner loops run over V.
template <typename T, bool CPLX>
void head_forward_loop(const T* q, const T* k, const T* v, const T* ar, const T* ai, const T* h0r,
                       const T* h0i, T* o, T* Sr, T* Si, int64_t B, int64_t L, int64_t H, int64_t K,
                       int64_t V, int64_t Kd, int64_t Ls) {
  const std::vector<T> zeros(K * V, T(0));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * H + h;  // (b, t, h)
        // States live at step t % Ls: every step (Ls = L, for the backward) or two alternating rows.
        const int64_t state = ((b * Ls + t % Ls) * H + h) * K * V;
        const int64_t prev = ((b * Ls + (t + Ls - 1) % Ls) * H + h) * K * V;
        const T* pr = t ? Sr + prev : h0r ? h0r + bh * K * V : zeros.data();
        const T* pi = CPLX ? (t ? Si + prev : h0i ? h0i + bh * K * V : zeros.data()) : nullptr;
        const T *q_ = q + row * K, *k_ = k + row * K, *v_ = v + row * V;
        T* o_ = o + row * V;
        for (int64_t j = 0; j < V; ++j) o_[j] = T(0);
        for (int64_t i = 0; i < K; ++i) {
          const int64_t d = row * Kd + (Kd == 1 ? 0 : i);
          const T a_re = ar[d], a_im = CPLX ? ai[d] : T(0), k_i = k_[i], q_i = q_[i];
          const T *pr_i = pr + i * V, *pi_i = CPLX ? pi + i * V : nullptr;
          T *sr_i = Sr + state + i * V, *si_i = CPLX ? Si + state + i * V : nullptr;
#pragma GCC ivdep
          for (int64_t j = 0; j < V; ++j) {
            T sr = a_re * pr_i[j] + k_i * v_[j];
            if constexpr (CPLX) {
              sr -= a_im * pi_i[j];
              si_i[j] = a_re * pi_i[j] + a_im * pr_i[j];
            }
            sr_i[j] = sr;
            o_[j] += q_i * sr;
          }
        }
      }
    }
  });
}

template <typename T, bool CPLX>
void head_backward_loop(const T* q, const T* k, const T* v, const T* ar, const T* ai, const T* Sr,
                        const T* Si, const T* h0r, const T* h0i, const T* dout, const T* dSr,
                        const T* dSi, T* dq, T* dk, T* dv, T* dlr, T* dli, T* dh0r, T* dh0i, int64_t B,
                        int64_t L, int64_t H, int64_t K, int64_t V, int64_t Kd) {
  const std::vector<T> zeros(K * V, T(0));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rr(K * V), ri(K * V), dv_acc(V), da_re(K), da_im(K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t n = 0; n < K * V; ++n) {  // r starts as dL/dS_T, carried in by a "transition" of 1
        rr[n] = dSr[bh * K * V + n];
        ri[n] = CPLX ? dSi[bh * K * V + n] : T(0);
      }
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t row = (b * L + t) * H + h;
        const int64_t state = row * K * V, prev = state - H * K * V;
        const T* pr = t ? Sr + prev : h0r ? h0r + bh * K * V : zeros.data();
        const T* pi = CPLX ? (t ? Si + prev : h0i ? h0i + bh * K * V : zeros.data()) : nullptr;
        const T *q_ = q + row * K, *k_ = k + row * K, *v_ = v + row * V, *do_ = dout + row * V;
        for (int64_t j = 0; j < V; ++j) dv_acc[j] = T(0);
        for (int64_t i = 0; i < K; ++i) {
          const int64_t d = row * Kd + (Kd == 1 ? 0 : i), dn = d + H * Kd;  // a_t, a_{t+1}
          const T n_re = t < L - 1 ? ar[dn] : T(1), n_im = CPLX && t < L - 1 ? ai[dn] : T(0);
          const T a_re = ar[d], a_im = CPLX ? ai[d] : T(0), q_i = q_[i], k_i = k_[i];
          const T *sr_i = Sr + state + i * V, *pr_i = pr + i * V, *pi_i = CPLX ? pi + i * V : nullptr;
          T *rr_i = rr.data() + i * V, *ri_i = ri.data() + i * V;
          T dq_i = T(0), dk_i = T(0), g_re = T(0), g_im = T(0);
#pragma GCC ivdep
          for (int64_t j = 0; j < V; ++j) {
            // r_t = q_t do_t^T + conj(a_{t+1}) r_{t+1}
            T re = n_re * rr_i[j] + q_i * do_[j], im = T(0);
            if constexpr (CPLX) {
              re += n_im * ri_i[j];
              im = n_re * ri_i[j] - n_im * rr_i[j];
              ri_i[j] = im;
            }
            rr_i[j] = re;
            dq_i += sr_i[j] * do_[j];
            dk_i += re * v_[j];
            dv_acc[j] += re * k_i;
            // dlog_a: sum_j r conj(a S_{t-1}) (u = a S_{t-1})
            const T u_re = a_re * pr_i[j] - (CPLX ? a_im * pi_i[j] : T(0));
            const T u_im = CPLX ? a_re * pi_i[j] + a_im * pr_i[j] : T(0);
            g_re += re * u_re + im * u_im;
            g_im += im * u_re - re * u_im;
          }
          dq[row * K + i] = dq_i;
          dk[row * K + i] = dk_i;
          da_re[i] = g_re;
          da_im[i] = g_im;
        }
        for (int64_t j = 0; j < V; ++j) dv[row * V + j] = dv_acc[j];
        if (Kd == 1) {
          T s_re = T(0), s_im = T(0);
          for (int64_t i = 0; i < K; ++i) s_re += da_re[i], s_im += da_im[i];
          dlr[row] = s_re;
          if (CPLX) dli[row] = s_im;
        } else {
          for (int64_t i = 0; i < K; ++i) {
            dlr[row * K + i] = da_re[i];
            if (CPLX) dli[row * K + i] = da_im[i];
          }
        }
      }
      if (dh0r) {  // dS0 = conj(a_0) r_0
        for (int64_t i = 0; i < K; ++i) {
          const int64_t d = (b * L * H + h) * Kd + (Kd == 1 ? 0 : i);
          const T a_re = ar[d], a_im = CPLX ? ai[d] : T(0);
          for (int64_t j = 0; j < V; ++j) {
            const int64_t n = i * V + j;
            dh0r[bh * K * V + n] = a_re * rr[n] + a_im * ri[n];
            if (CPLX) dh0i[bh * K * V + n] = a_re * ri[n] - a_im * rr[n];
          }
        }
      }
    }
  });
}

// The complex transition a = exp(log_a) = e^m (cos th + i sin th), log_a = m + i th, in one pass
// over 8 lanes at a time: in PyTorch it is three transcendental passes and two products over fresh
// tensors, which took more than half of the max-headed forward. e^x as in lstm_loop.cpp (2^n e^r,
// degree-6 Taylor, about 2 ulp); cos and sin by Cody-Waite reduction to |r| <= pi/4 with Cephes'
// polynomials (absolute error about 1e-7), exact to that for |th| < 8192; a vector with a larger
// angle is done with libm instead (rare: angles are projections of normalised inputs).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

inline f8 round_(f8 x) { return (x + 12582912.0f) - 12582912.0f; }  // 1.5 * 2^23: to the nearest integer

inline f8 exp8(const f8 x0) {
  const f8 lo = f8{} - 87.0f, hi = f8{} + 88.0f;
  f8 x = x0 < lo ? lo : x0;
  x = x > hi ? hi : x;
  const f8 n = round_(x * 1.44269504f);
  const f8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts: r is exact
  f8 p = f8{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const f8 y = p * scale;
  return x0 < lo ? f8{} : x0 > hi ? f8{} + INFINITY : y;  // log_a = -inf (a = 0) stays exact
}

inline void sincos8(f8 x, f8& s, f8& c) {
  const f8 n = round_(x * 0.636619772f);  // x = n pi/2 + r
  const f8 r = ((x - n * 1.5703125f) - n * 4.83751297e-4f) - n * 7.54978995e-8f;  // pi/2 in three parts
  const f8 r2 = r * r;
  const f8 sr = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const f8 cr = ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 -
                0.5f * r2 + 1.0f;
  const i8 q = __builtin_convertvector(n, i8);  // quadrant: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr)
  const i8 swap = (q & 1) != 0, neg_s = (q & 2) != 0, neg_c = ((q + 1) & 2) != 0;
  const f8 s0 = swap ? cr : sr, c0 = swap ? sr : cr;
  s = neg_s ? -s0 : s0;
  c = neg_c ? -c0 : c0;
}

// transition(log_a) with log_a [..., 2] (torch.view_as_real of a complex tensor) -> [ar, ai], each
// of log_a's shape without the last dimension.
std::vector<at::Tensor> transition(const at::Tensor& log_a) {
  TORCH_CHECK(log_a.device().is_cpu() && log_a.is_contiguous() && log_a.dim() >= 1 && log_a.size(-1) == 2,
              "scan kernel: transition takes a contiguous CPU tensor [..., 2] (real, imaginary); got ",
              log_a.sizes());
  auto shape = log_a.sizes().vec();
  shape.pop_back();
  auto ar = at::empty(shape, log_a.options()), ai = at::empty(shape, log_a.options());
  const int64_t N = ar.numel();
  AT_DISPATCH_FLOATING_TYPES(log_a.scalar_type(), "gateloop_transition", [&] {
    const scalar_t* x = log_a.data_ptr<scalar_t>();
    scalar_t *re = ar.data_ptr<scalar_t>(), *im = ai.data_ptr<scalar_t>();
    at::parallel_for(0, (N + 7) / 8, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin * 8; n < std::min(end * 8, N); n += 8) {
        const int64_t w = std::min<int64_t>(8, N - n);
        bool exact = !std::is_same_v<scalar_t, float>;  // float64 (the tests' algebra): libm
        float m[8] = {}, th[8] = {};
        for (int64_t j = 0; j < w; ++j) {
          m[j] = float(x[2 * (n + j)]), th[j] = float(x[2 * (n + j) + 1]);
          exact |= !(std::fabs(th[j]) < 8192.0f);  // also NaN
        }
        if (exact) {
          for (int64_t j = 0; j < w; ++j) {
            const scalar_t mag = std::exp(x[2 * (n + j)]), angle = x[2 * (n + j) + 1];
            re[n + j] = mag * std::cos(angle), im[n + j] = mag * std::sin(angle);
          }
          continue;
        }
        f8 mv, tv, sv, cv;
        std::memcpy(&mv, m, sizeof mv), std::memcpy(&tv, th, sizeof tv);
        sincos8(tv, sv, cv);
        const f8 mag = exp8(mv), rv = mag * cv, iv = mag * sv;
        float rs[8], is[8];
        std::memcpy(rs, &rv, sizeof rs), std::memcpy(is, &iv, sizeof is);
        for (int64_t j = 0; j < w; ++j) re[n + j] = rs[j], im[n + j] = is[j];
      }
    });
  });
  return {ar, ai};
}

// One entry per direction for both pairs of loops: K = V = Kd = 1 (max-headed; the [B, T, H, 1]
// tensors are [B, T, H] planes in memory) takes the loops vectorised over heads, any other head size
// the [K, V]-state ones.

// forward(q, k, v, ar, ai?, h0r?, h0i?, keep_states) with q, k [B, T, H, K], v [B, T, H, V],
// a [B, T, H, Kd], h0 [B, H, K, V] -> [o [B, T, H, V], Sr [B, T or 2, H, K, V], Si?]: every state
// (for the backward) or, without keep_states, two alternating rows (the last state at (T - 1) % 2).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ar, const c10::optional<at::Tensor>& ai,
                                const c10::optional<at::Tensor>& h0r, const c10::optional<at::Tensor>& h0i,
                                bool keep_states) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4 && ar.dim() == 4, "scan kernel: q, v and a must be 4-d");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3), Kd = ar.size(3);
  TORCH_CHECK(Kd == 1 || Kd == K, "scan kernel: one decay per head or per key channel");
  check(q, q, {B, L, H, K}, "q");
  check(k, q, {B, L, H, K}, "k");
  check(v, q, {B, L, H, V}, "v");
  check(ar, q, {B, L, H, Kd}, "ar");
  check(ai, q, {B, L, H, Kd}, "ai");
  check(h0r, q, {B, H, K, V}, "h0r");
  check(h0i, q, {B, H, K, V}, "h0i");
  const int64_t Ls = keep_states ? L : 2;
  const bool flat = K == 1 && V == 1 && Kd == 1;
  auto o = at::empty({B, L, H, V}, q.options()), Sr = at::empty({B, Ls, H, K, V}, q.options());
  at::Tensor Si = ai.has_value() ? at::empty_like(Sr) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gateloop_scan_forward", [&] {
    const scalar_t *q_ = q.data_ptr<scalar_t>(), *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>();
    const scalar_t *ar_ = ar.data_ptr<scalar_t>(), *ai_ = ptr_or_null<scalar_t>(ai);
    const scalar_t *h0r_ = ptr_or_null<scalar_t>(h0r), *h0i_ = ptr_or_null<scalar_t>(h0i);
    scalar_t *o_ = o.data_ptr<scalar_t>(), *sr_ = Sr.data_ptr<scalar_t>();
    scalar_t* si_ = Si.defined() ? Si.data_ptr<scalar_t>() : nullptr;
    if (flat) {
      auto run = ai_ ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(q_, k_, v_, ar_, ai_, h0r_, h0i_, o_, sr_, si_, B, L, H, Ls);
    } else {
      auto run = ai_ ? head_forward_loop<scalar_t, true> : head_forward_loop<scalar_t, false>;
      run(q_, k_, v_, ar_, ai_, h0r_, h0i_, o_, sr_, si_, B, L, H, K, V, Kd, Ls);
    }
  });
  if (Si.defined()) return {o, Sr, Si};
  return {o, Sr};
}

// backward(q, k, v, ar, ai?, Sr, Si?, h0r?, h0i?, do, dSr, dSi?) -> [dq, dk, dv, dlr, dli?, dh0r?, dh0i?]
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& ar, const c10::optional<at::Tensor>& ai,
                                 const at::Tensor& Sr, const c10::optional<at::Tensor>& Si,
                                 const c10::optional<at::Tensor>& h0r, const c10::optional<at::Tensor>& h0i,
                                 const at::Tensor& dout, const at::Tensor& dSr,
                                 const c10::optional<at::Tensor>& dSi) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4 && ar.dim() == 4, "scan kernel: q, v and a must be 4-d");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3), Kd = ar.size(3);
  check(q, q, {B, L, H, K}, "q");
  check(k, q, {B, L, H, K}, "k");
  check(v, q, {B, L, H, V}, "v");
  check(dout, q, {B, L, H, V}, "do");
  check(ar, q, {B, L, H, Kd}, "ar");
  check(ai, q, {B, L, H, Kd}, "ai");
  check(Sr, q, {B, L, H, K, V}, "Sr");
  check(Si, q, {B, L, H, K, V}, "Si");
  check(h0r, q, {B, H, K, V}, "h0r");
  check(h0i, q, {B, H, K, V}, "h0i");
  check(dSr, q, {B, H, K, V}, "dSr");
  check(dSi, q, {B, H, K, V}, "dSi");
  TORCH_CHECK(ai.has_value() == Si.has_value() && (!ai.has_value() || dSi.has_value()),
              "scan kernel: ai, Si and dSi come together (a complex decay)");
  const bool cplx = ai.has_value(), flat = K == 1 && V == 1 && Kd == 1;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dlr = at::empty_like(ar);
  at::Tensor dli = cplx ? at::empty_like(ar) : at::Tensor();
  at::Tensor dh0r = h0r.has_value() ? at::empty_like(*h0r) : at::Tensor();
  at::Tensor dh0i = h0r.has_value() && cplx ? at::empty_like(*h0r) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gateloop_scan_backward", [&] {
    auto p = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    const scalar_t *q_ = q.data_ptr<scalar_t>(), *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>();
    const scalar_t *ar_ = ar.data_ptr<scalar_t>(), *ai_ = ptr_or_null<scalar_t>(ai);
    const scalar_t *sr_ = Sr.data_ptr<scalar_t>(), *si_ = ptr_or_null<scalar_t>(Si);
    const scalar_t *h0r_ = ptr_or_null<scalar_t>(h0r), *h0i_ = ptr_or_null<scalar_t>(h0i);
    const scalar_t *do_ = dout.data_ptr<scalar_t>(), *dsr_ = dSr.data_ptr<scalar_t>();
    const scalar_t* dsi_ = ptr_or_null<scalar_t>(dSi);
    if (flat) {
      auto run = cplx ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(q_, k_, v_, ar_, ai_, sr_, si_, h0r_, h0i_, do_, dsr_, dsi_, p(dq), p(dk), p(dv), p(dlr), p(dli),
          p(dh0r), p(dh0i), B, L, H);
    } else {
      auto run = cplx ? head_backward_loop<scalar_t, true> : head_backward_loop<scalar_t, false>;
      run(q_, k_, v_, ar_, ai_, sr_, si_, h0r_, h0i_, do_, dsr_, dsi_, p(dq), p(dk), p(dv), p(dlr), p(dli),
          p(dh0r), p(dh0i), B, L, H, K, V, Kd);
    }
  });
  std::vector<at::Tensor> out = {dq, dk, dv, dlr};
  if (cplx) out.push_back(dli);
  if (dh0r.defined()) out.push_back(dh0r);
  if (dh0i.defined()) out.push_back(dh0i);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GateLoop scan, forward");
  m.def("backward", &backward, "GateLoop scan, backward");
  m.def("transition", &transition, "a = exp(log_a), complex, as (real, imaginary) planes");
}
