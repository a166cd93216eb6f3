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
// All tensors are contiguous and of one real dtype; a complex state or initial state is two planes,
// a complex log_a (and its gradient) one tensor of (real, imaginary) pairs, torch.view_as_real's.
// The transitions a = exp(log_a) are computed a row at a time inside the loops, forward and again
// backward, and never stored, and the states only every kBlock steps (below): at the op's sizes a
// fresh tensor costs more in page faults and memory traffic than the arithmetic that fills it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "vec8.h"

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

// a = exp(log_a) for the n transitions of one row, into the planes re (and im): log_a holds n values,
// or n (real, imaginary) pairs for a complex decay. Float32 runs 8 at a time (vec8.h).
template <typename T, bool CPLX>
void transition_row(const T* log_a, int64_t n, T* re, T* im) {
  for (int64_t j = 0; j < n; j += Lanes<T>::W) {
    if constexpr (CPLX) {
      const auto [m, th] = load_pairs(log_a, j, n);
      const auto [a_re, a_im] = cexp_(m, th);
      store(re, j, n, a_re), store(im, j, n, a_im);
    } else {
      store(re, j, n, exp_(load(log_a, j, n)));
    }
  }
}

// The forward stores S_t only at the end of each block of C steps (and at t = T - 1); the backward
// recomputes a block's states (and transitions) from the one stored before it, into buffers that
// stay in cache, then runs the adjoint over the block. With every state stored, their writing,
// fresh pages and reading back cost more than the arithmetic: at HGRN2's K = V = 64 they are 16 KB
// per head and step. Recomputing repeats the forward's arithmetic exactly, so the states agree to
// the bit. Without gradients C = T: only the final state is kept.
constexpr int64_t kBlock = 16;

int64_t n_blocks(int64_t L, int64_t C) { return (L + C - 1) / C; }

// The inner loops below are branch-free (CPLX is a template parameter; a missing previous state
// or next transition points at a row of zeros or ones) so that the compiler vectorises them.

// One max-headed step for channels [lo, hi) of a row: S = a S_prev + k v, o = q Re(S). Every pointer
// is a row's base, indexed by channel.
template <typename T, bool CPLX>
inline void flat_step(const T* q, const T* k, const T* v, const T* ar, const T* ai, const T* pr, const T* pi,
                      T* sr, T* si, T* o, int64_t lo, int64_t hi) {
#pragma GCC ivdep
  for (int64_t h = lo; h < hi; ++h) {
    T s = ar[h] * pr[h] + k[h] * v[h];
    if constexpr (CPLX) {
      s -= ai[h] * pi[h];
      si[h] = ar[h] * pi[h] + ai[h] * pr[h];
    }
    sr[h] = s;
    o[h] = q[h] * s;
  }
}

// Max-headed (K = V = Kd = 1): the [B, T, H, 1] tensors are [B, T, H] planes, so the loops vectorise
// over heads, and threads split the B * H channels.
template <typename T, bool CPLX>
void forward_loop(const T* q, const T* k, const T* v, const T* log_a, const T* h0r, const T* h0i, T* o,
                  T* Sr, T* Si, int64_t B, int64_t L, int64_t H, int64_t C) {
  constexpr int64_t P = CPLX ? 2 : 1;  // log_a's values per transition
  const int64_t nC = n_blocks(L, C);
  at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> ar(H), ai(H), s(4 * H, T(0));  // a_t; two alternating states, real and imaginary
    for (int64_t b = begin / H; b * H < end; ++b) {
      const int64_t h_lo = std::max(begin - b * H, int64_t(0)), h_hi = std::min(end - b * H, H);
      T *pr = s.data(), *pi = pr + H, *cr = pi + H, *ci = cr + H;
      for (int64_t h = h_lo; h < h_hi; ++h) {
        pr[h] = h0r ? h0r[b * H + h] : T(0);
        pi[h] = h0i ? h0i[b * H + h] : T(0);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * H;
        transition_row<T, CPLX>(log_a + P * (row + h_lo), h_hi - h_lo, ar.data() + h_lo, ai.data() + h_lo);
        flat_step<T, CPLX>(q + row, k + row, v + row, ar.data(), ai.data(), pr, pi, cr, ci, o + row, h_lo, h_hi);
        if ((t + 1) % C == 0 || t == L - 1) {
          const int64_t stored = (b * nC + t / C) * H;
          std::copy(cr + h_lo, cr + h_hi, Sr + stored + h_lo);
          if (CPLX) std::copy(ci + h_lo, ci + h_hi, Si + stored + h_lo);
        }
        std::swap(pr, cr), std::swap(pi, ci);
      }
    }
  });
}

template <typename T, bool CPLX>
void backward_loop(const T* q, const T* k, const T* v, const T* log_a, const T* Sr, const T* Si,
                   const T* h0r, const T* h0i, const T* dout, const T* dSr, const T* dSi, T* dq, T* dk,
                   T* dv, T* dlog_a, T* dh0r, T* dh0i, int64_t B, int64_t L, int64_t H, int64_t C) {
  constexpr int64_t P = CPLX ? 2 : 1;
  const int64_t nC = n_blocks(L, C);
  at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
    // r_t, carried backwards; a block's states S_{t0 - 1} .. S_{t1 - 1} and transitions a_t0 ..
    // a_{t1 - 1}; a_{t1}, the first transition of the block after; a scratch row for the outputs.
    std::vector<T> r_re(H), r_im(H, T(0)), sb_re((C + 1) * H), sb_im((C + 1) * H, T(0));
    std::vector<T> ab_re(C * H), ab_im(C * H, T(0)), nr(H), ni(H), scratch(H);
    for (int64_t b = begin / H; b * H < end; ++b) {
      const int64_t h_lo = std::max(begin - b * H, int64_t(0)), h_hi = std::min(end - b * H, H);
      for (int64_t h = h_lo; h < h_hi; ++h) {  // r starts as dL/dS_T, which a "transition" a_T = 1 carries in
        r_re[h] = dSr[b * H + h];
        if (CPLX) r_im[h] = dSi[b * H + h];
        nr[h] = T(1), ni[h] = T(0);
      }
      for (int64_t c = nC - 1; c >= 0; --c) {
        const int64_t t0 = c * C, t1 = std::min(t0 + C, L);
        for (int64_t h = h_lo; h < h_hi; ++h) {  // S_{t0 - 1}: the state stored before the block, or S0
          const int64_t j = (b * nC + c - 1) * H + h;
          sb_re[h] = c ? Sr[j] : h0r ? h0r[b * H + h] : T(0);
          if (CPLX) sb_im[h] = c ? Si[j] : h0i ? h0i[b * H + h] : T(0);
        }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t row = (b * L + t) * H, j = (t - t0) * H;
          transition_row<T, CPLX>(log_a + P * (row + h_lo), h_hi - h_lo, ab_re.data() + j + h_lo,
                                  ab_im.data() + j + h_lo);
          flat_step<T, CPLX>(q + row, k + row, v + row, ab_re.data() + j, ab_im.data() + j, sb_re.data() + j,
                             sb_im.data() + j, sb_re.data() + j + H, sb_im.data() + j + H, scratch.data(), h_lo,
                             h_hi);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t row = (b * L + t) * H, j = (t - t0) * H;
          const T *q_ = q + row, *k_ = k + row, *v_ = v + row, *do_ = dout + row;
          const T *ar_ = ab_re.data() + j, *ai_ = ab_im.data() + j;
          const T *nr_ = t + 1 < t1 ? ar_ + H : nr.data(), *ni_ = t + 1 < t1 ? ai_ + H : ni.data();  // a_{t+1}
          const T *pr = sb_re.data() + j, *pi = sb_im.data() + j, *sr_ = pr + H;  // S_{t-1}, S_t
          T *dq_ = dq + row, *dk_ = dk + row, *dv_ = dv + row, *dl_ = dlog_a + P * row;
          T *rr = r_re.data(), *ri = r_im.data();
#pragma GCC ivdep
          for (int64_t h = h_lo; h < h_hi; ++h) {
            // r_t = q_t do_t + conj(a_{t+1}) r_{t+1}
            T re = nr_[h] * rr[h] + q_[h] * do_[h], im = T(0);
            if constexpr (CPLX) {
              re += ni_[h] * ri[h];
              im = nr_[h] * ri[h] - ni_[h] * rr[h];
              ri[h] = im;
            }
            rr[h] = re;
            dq_[h] = do_[h] * sr_[h];
            dk_[h] = re * v_[h];
            dv_[h] = re * k_[h];
            // dlog_a = r conj(u), u = a_t S_{t-1}
            if constexpr (CPLX) {
              const T u_re = ar_[h] * pr[h] - ai_[h] * pi[h], u_im = ar_[h] * pi[h] + ai_[h] * pr[h];
              dl_[2 * h] = re * u_re + im * u_im;
              dl_[2 * h + 1] = im * u_re - re * u_im;
            } else {
              dl_[h] = re * ar_[h] * pr[h];
            }
          }
        }
        std::copy(ab_re.begin() + h_lo, ab_re.begin() + h_hi, nr.begin() + h_lo);  // a_t0, the block before's a_{t1}
        std::copy(ab_im.begin() + h_lo, ab_im.begin() + h_hi, ni.begin() + h_lo);
      }
      if (dh0r) {  // dS0 = conj(a_0) r_0
        for (int64_t h = h_lo; h < h_hi; ++h) {
          dh0r[b * H + h] = nr[h] * r_re[h] + (CPLX ? ni[h] * r_im[h] : T(0));
          if (CPLX) dh0i[b * H + h] = nr[h] * r_im[h] - ni[h] * r_re[h];
        }
      }
    }
  });
}

// Heads with K, V >= 1: per (b, h) a [K, V] state, one decay per key channel (Kd = K) or per head
// (Kd = 1). The same equations with k_t v_t^T for x_t, o_t = Re(q_t^T S_t), and sums over V (and K
// for Kd = 1) in dq, dk, dv, dlog_a. Parallel over (b, h); the inner loops run over V.

// One step of one head: S = a S_prev + k v^T ([K, V], a per row i of S or one for all), o = Re(S)^T q.
template <typename T, bool CPLX>
inline void head_step(const T* q_, const T* k_, const T* v_, const T* ar, const T* ai, int64_t Kd, const T* pr,
                      const T* pi, T* sr, T* si, T* o_, int64_t K, int64_t V) {
  for (int64_t j = 0; j < V; ++j) o_[j] = T(0);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t d = Kd == 1 ? 0 : i;
    const T a_re = ar[d], a_im = CPLX ? ai[d] : T(0), k_i = k_[i], q_i = q_[i];
    const T *pr_i = pr + i * V, *pi_i = pi + i * V;
    T *sr_i = sr + i * V, *si_i = si + i * V;
#pragma GCC ivdep
    for (int64_t j = 0; j < V; ++j) {
      T s = a_re * pr_i[j] + k_i * v_[j];
      if constexpr (CPLX) {
        s -= a_im * pi_i[j];
        si_i[j] = a_re * pi_i[j] + a_im * pr_i[j];
      }
      sr_i[j] = s;
      o_[j] += q_i * s;
    }
  }
}

template <typename T, bool CPLX>
void head_forward_loop(const T* q, const T* k, const T* v, const T* log_a, const T* h0r, const T* h0i,
                       T* o, T* Sr, T* Si, int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t Kd,
                       int64_t C) {
  constexpr int64_t P = CPLX ? 2 : 1;
  const int64_t KV = K * V, nC = n_blocks(L, C);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ar(Kd), ai(Kd, T(0)), s(4 * KV, T(0));  // a_t; two alternating states
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      T *pr = s.data(), *pi = pr + KV, *cr = pi + KV, *ci = cr + KV;
      for (int64_t n = 0; n < KV; ++n) {
        pr[n] = h0r ? h0r[bh * KV + n] : T(0);
        pi[n] = h0i ? h0i[bh * KV + n] : T(0);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * L + t) * H + h;  // (b, t, h)
        transition_row<T, CPLX>(log_a + P * row * Kd, Kd, ar.data(), ai.data());
        head_step<T, CPLX>(q + row * K, k + row * K, v + row * V, ar.data(), ai.data(), Kd, pr, pi, cr, ci,
                           o + row * V, K, V);
        if ((t + 1) % C == 0 || t == L - 1) {
          const int64_t stored = ((b * nC + t / C) * H + h) * KV;
          std::copy(cr, cr + KV, Sr + stored);
          if (CPLX) std::copy(ci, ci + KV, Si + stored);
        }
        std::swap(pr, cr), std::swap(pi, ci);
      }
    }
  });
}

template <typename T, bool CPLX>
void head_backward_loop(const T* q, const T* k, const T* v, const T* log_a, const T* Sr, const T* Si,
                        const T* h0r, const T* h0i, const T* dout, const T* dSr, const T* dSi, T* dq, T* dk,
                        T* dv, T* dlog_a, T* dh0r, T* dh0i, int64_t B, int64_t L, int64_t H, int64_t K,
                        int64_t V, int64_t Kd, int64_t C) {
  constexpr int64_t P = CPLX ? 2 : 1;
  const int64_t KV = K * V, nC = n_blocks(L, C);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // As in backward_loop: r, the block's states and transitions, a_{t1}, and scratch.
    std::vector<T> rr(KV), ri(KV, T(0)), sb_re((C + 1) * KV), sb_im((C + 1) * KV, T(0));
    std::vector<T> ab_re(C * Kd), ab_im(C * Kd, T(0)), nr(Kd), ni(Kd), scratch(V);
    std::vector<T> dv_acc(V), da_re(K), da_im(K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t n = 0; n < KV; ++n) {  // r starts as dL/dS_T, carried in by a "transition" a_T = 1
        rr[n] = dSr[bh * KV + n];
        if (CPLX) ri[n] = dSi[bh * KV + n];
      }
      std::fill(nr.begin(), nr.end(), T(1)), std::fill(ni.begin(), ni.end(), T(0));
      for (int64_t c = nC - 1; c >= 0; --c) {
        const int64_t t0 = c * C, t1 = std::min(t0 + C, L);
        const int64_t stored = ((b * nC + c - 1) * H + h) * KV;
        for (int64_t n = 0; n < KV; ++n) {  // S_{t0 - 1}: the state stored before the block, or S0
          sb_re[n] = c ? Sr[stored + n] : h0r ? h0r[bh * KV + n] : T(0);
          if (CPLX) sb_im[n] = c ? Si[stored + n] : h0i ? h0i[bh * KV + n] : T(0);
        }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t row = (b * L + t) * H + h, j = t - t0;
          transition_row<T, CPLX>(log_a + P * row * Kd, Kd, ab_re.data() + j * Kd, ab_im.data() + j * Kd);
          head_step<T, CPLX>(q + row * K, k + row * K, v + row * V, ab_re.data() + j * Kd, ab_im.data() + j * Kd,
                             Kd, sb_re.data() + j * KV, sb_im.data() + j * KV, sb_re.data() + (j + 1) * KV,
                             sb_im.data() + (j + 1) * KV, scratch.data(), K, V);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t row = (b * L + t) * H + h, j = t - t0;
          const T *q_ = q + row * K, *k_ = k + row * K, *v_ = v + row * V, *do_ = dout + row * V;
          const T *ar = ab_re.data() + j * Kd, *ai = ab_im.data() + j * Kd;
          const T *nr_ = t + 1 < t1 ? ar + Kd : nr.data(), *ni_ = t + 1 < t1 ? ai + Kd : ni.data();  // a_{t+1}
          const T *pr = sb_re.data() + j * KV, *pi = sb_im.data() + j * KV, *sr = pr + KV;  // S_{t-1}, S_t
          for (int64_t jv = 0; jv < V; ++jv) dv_acc[jv] = T(0);
          // Over V in explicit lanes (vec8.h): dq, dk and dlog_a are sums over V, which a compiler
          // keeps in order, one lane at a time, unless told it may reassociate; each row's partial
          // sums wait in acc, and eight rows are summed at once.
          using Vec = typename Lanes<T>::V;
          Vec acc[4][8];  // dq, dk, Re and Im of dlog_a, for rows i0 .. i0 + 7
          for (int64_t i0 = 0; i0 < K; i0 += 8) {
            const int64_t rows = std::min<int64_t>(8, K - i0);
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = i0 + r, d = Kd == 1 ? 0 : i;
              const T n_re = nr_[d], n_im = CPLX ? ni_[d] : T(0);
              const T a_re = ar[d], a_im = CPLX ? ai[d] : T(0), q_i = q_[i], k_i = k_[i];
              const T *sr_i = sr + i * V, *pr_i = pr + i * V, *pi_i = pi + i * V;
              T *rr_i = rr.data() + i * V, *ri_i = ri.data() + i * V;
              Vec dq_v{}, dk_v{}, g_re_v{}, g_im_v{};
              for (int64_t jv = 0; jv < V; jv += Lanes<T>::W) {
                // r_t = q_t do_t^T + conj(a_{t+1}) r_{t+1}
                const Vec r_re = load(rr_i, jv, V), r_im = CPLX ? load(ri_i, jv, V) : Vec{};
                const Vec d_o = load(do_, jv, V);
                Vec re = n_re * r_re + q_i * d_o, im{};
                if constexpr (CPLX) {
                  re += n_im * r_im;
                  im = n_re * r_im - n_im * r_re;
                  store(ri_i, jv, V, im);
                }
                store(rr_i, jv, V, re);
                dq_v += load(sr_i, jv, V) * d_o;
                dk_v += re * load(v_, jv, V);
                store(dv_acc.data(), jv, V, load(dv_acc.data(), jv, V) + re * k_i);
                // dlog_a: sum_j r conj(a S_{t-1}) (u = a S_{t-1})
                const Vec p_re = load(pr_i, jv, V), p_im = CPLX ? load(pi_i, jv, V) : Vec{};
                const Vec u_re = a_re * p_re - a_im * p_im, u_im = a_re * p_im + a_im * p_re;
                g_re_v += re * u_re + im * u_im;
                g_im_v += im * u_re - re * u_im;
              }
              acc[0][r] = dq_v, acc[1][r] = dk_v, acc[2][r] = g_re_v, acc[3][r] = g_im_v;
            }
            lane_sums(acc[0], rows, dq + row * K + i0);
            lane_sums(acc[1], rows, dk + row * K + i0);
            lane_sums(acc[2], rows, da_re.data() + i0);
            if (CPLX) lane_sums(acc[3], rows, da_im.data() + i0);
          }
          for (int64_t jv = 0; jv < V; ++jv) dv[row * V + jv] = dv_acc[jv];
          T* dl = dlog_a + P * row * Kd;
          if (Kd == 1) {
            T s_re = T(0), s_im = T(0);
            for (int64_t i = 0; i < K; ++i) s_re += da_re[i], s_im += da_im[i];
            dl[0] = s_re;
            if (CPLX) dl[1] = s_im;
          } else {
            for (int64_t i = 0; i < K; ++i) {
              dl[P * i] = da_re[i];
              if (CPLX) dl[P * i + 1] = da_im[i];
            }
          }
        }
        std::copy(ab_re.begin(), ab_re.begin() + Kd, nr.begin());  // a_t0, the block before's a_{t1}
        std::copy(ab_im.begin(), ab_im.begin() + Kd, ni.begin());
      }
      if (dh0r) {  // dS0 = conj(a_0) r_0
        for (int64_t i = 0; i < K; ++i) {
          const int64_t d = Kd == 1 ? 0 : i;
          for (int64_t jv = 0; jv < V; ++jv) {
            const int64_t n = i * V + jv;
            dh0r[bh * KV + n] = nr[d] * rr[n] + (CPLX ? ni[d] * ri[n] : T(0));
            if (CPLX) dh0i[bh * KV + n] = nr[d] * ri[n] - ni[d] * rr[n];
          }
        }
      }
    }
  });
}

// One entry per direction for both pairs of loops: K = V = Kd = 1 (max-headed; the [B, T, H, 1]
// tensors are [B, T, H] planes in memory) takes the loops vectorised over heads, any other head size
// the [K, V]-state ones.

// log_a [B, T, H, Kd] (real) or [B, T, H, Kd, 2] (complex: torch.view_as_real's pairs), checked
// against q: -> (Kd, complex).
std::pair<int64_t, bool> check_log_a(const at::Tensor& log_a, const at::Tensor& q) {
  TORCH_CHECK(log_a.dim() == 4 || (log_a.dim() == 5 && log_a.size(4) == 2),
              "scan kernel: log_a must be [B, T, H, Kd], or [B, T, H, Kd, 2] for a complex decay; got ",
              log_a.sizes());
  const int64_t Kd = log_a.size(3);
  TORCH_CHECK(Kd == 1 || Kd == q.size(3), "scan kernel: one decay per head or per key channel");
  const bool cplx = log_a.dim() == 5;
  std::vector<int64_t> shape = {q.size(0), q.size(1), q.size(2), Kd};
  if (cplx) shape.push_back(2);
  check(log_a, q, shape, "log_a");
  return {Kd, cplx};
}

// forward(q, k, v, log_a, h0r?, h0i?, keep_states) with q, k [B, T, H, K], v [B, T, H, V], h0
// [B, H, K, V] -> [o [B, T, H, V], Sr [B, n, H, K, V], Si?]: the states at the ends of the blocks of
// kBlock steps (n = ceil(T / kBlock), for the backward) or, without keep_states, the final state
// alone (n = 1); either way the final state is the last row.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& log_a, const c10::optional<at::Tensor>& h0r,
                                const c10::optional<at::Tensor>& h0i, bool keep_states) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "scan kernel: q and v must be 4-d");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const auto [Kd, cplx] = check_log_a(log_a, q);
  check(q, q, {B, L, H, K}, "q");
  check(k, q, {B, L, H, K}, "k");
  check(v, q, {B, L, H, V}, "v");
  check(h0r, q, {B, H, K, V}, "h0r");
  check(h0i, q, {B, H, K, V}, "h0i");
  const int64_t C = keep_states ? kBlock : std::max<int64_t>(L, 1);
  const bool flat = K == 1 && V == 1 && Kd == 1;
  auto o = at::empty({B, L, H, V}, q.options()), Sr = at::empty({B, n_blocks(L, C), H, K, V}, q.options());
  at::Tensor Si = cplx ? at::empty_like(Sr) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gateloop_scan_forward", [&] {
    const scalar_t *q_ = q.data_ptr<scalar_t>(), *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>();
    const scalar_t* la_ = log_a.data_ptr<scalar_t>();
    const scalar_t *h0r_ = ptr_or_null<scalar_t>(h0r), *h0i_ = ptr_or_null<scalar_t>(h0i);
    scalar_t *o_ = o.data_ptr<scalar_t>(), *sr_ = Sr.data_ptr<scalar_t>();
    scalar_t* si_ = Si.defined() ? Si.data_ptr<scalar_t>() : nullptr;
    if (flat) {
      auto run = cplx ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(q_, k_, v_, la_, h0r_, h0i_, o_, sr_, si_, B, L, H, C);
    } else {
      auto run = cplx ? head_forward_loop<scalar_t, true> : head_forward_loop<scalar_t, false>;
      run(q_, k_, v_, la_, h0r_, h0i_, o_, sr_, si_, B, L, H, K, V, Kd, C);
    }
  });
  if (Si.defined()) return {o, Sr, Si};
  return {o, Sr};
}

// backward(q, k, v, log_a, Sr, Si?, h0r?, h0i?, do, dSr, dSi?) -> [dq, dk, dv, dlog_a (log_a's
// layout), dh0r?, dh0i?], with Sr, Si the block-end states of a forward with keep_states
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& log_a, const at::Tensor& Sr, const c10::optional<at::Tensor>& Si,
                                 const c10::optional<at::Tensor>& h0r, const c10::optional<at::Tensor>& h0i,
                                 const at::Tensor& dout, const at::Tensor& dSr,
                                 const c10::optional<at::Tensor>& dSi) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "scan kernel: q and v must be 4-d");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const auto [Kd, cplx] = check_log_a(log_a, q);
  check(q, q, {B, L, H, K}, "q");
  check(k, q, {B, L, H, K}, "k");
  check(v, q, {B, L, H, V}, "v");
  check(dout, q, {B, L, H, V}, "do");
  check(Sr, q, {B, n_blocks(L, kBlock), H, K, V}, "Sr");
  check(Si, q, {B, n_blocks(L, kBlock), H, K, V}, "Si");
  check(h0r, q, {B, H, K, V}, "h0r");
  check(h0i, q, {B, H, K, V}, "h0i");
  check(dSr, q, {B, H, K, V}, "dSr");
  check(dSi, q, {B, H, K, V}, "dSi");
  TORCH_CHECK(cplx == Si.has_value() && cplx == dSi.has_value(),
              "scan kernel: Si and dSi come with a complex decay, and only with one");
  const bool flat = K == 1 && V == 1 && Kd == 1;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dlog_a = at::empty_like(log_a);
  at::Tensor dh0r = h0r.has_value() ? at::empty_like(*h0r) : at::Tensor();
  at::Tensor dh0i = h0r.has_value() && cplx ? at::empty_like(*h0r) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gateloop_scan_backward", [&] {
    auto p = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    const scalar_t *q_ = q.data_ptr<scalar_t>(), *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>();
    const scalar_t* la_ = log_a.data_ptr<scalar_t>();
    const scalar_t *sr_ = Sr.data_ptr<scalar_t>(), *si_ = ptr_or_null<scalar_t>(Si);
    const scalar_t *h0r_ = ptr_or_null<scalar_t>(h0r), *h0i_ = ptr_or_null<scalar_t>(h0i);
    const scalar_t *do_ = dout.data_ptr<scalar_t>(), *dsr_ = dSr.data_ptr<scalar_t>();
    const scalar_t* dsi_ = ptr_or_null<scalar_t>(dSi);
    if (flat) {
      auto run = cplx ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(q_, k_, v_, la_, sr_, si_, h0r_, h0i_, do_, dsr_, dsi_, p(dq), p(dk), p(dv), p(dlog_a), p(dh0r),
          p(dh0i), B, L, H, kBlock);
    } else {
      auto run = cplx ? head_backward_loop<scalar_t, true> : head_backward_loop<scalar_t, false>;
      run(q_, k_, v_, la_, sr_, si_, h0r_, h0i_, do_, dsr_, dsi_, p(dq), p(dk), p(dv), p(dlog_a), p(dh0r),
          p(dh0i), B, L, H, K, V, Kd, kBlock);
    }
  });
  std::vector<at::Tensor> out = {dq, dk, dv, dlog_a};
  if (dh0r.defined()) out.push_back(dh0r);
  if (dh0i.defined()) out.push_back(dh0i);
  return out;
}

// transition(log_a) -> [ar, ai]: a = exp(log_a) for a complex log_a [..., 2], as the loops compute
// it; for the tests of its accuracy.
std::vector<at::Tensor> transition(const at::Tensor& log_a) {
  TORCH_CHECK(log_a.device().is_cpu() && log_a.is_contiguous() && log_a.dim() >= 1 && log_a.size(-1) == 2,
              "scan kernel: transition takes a contiguous CPU tensor [..., 2] (real, imaginary); got ",
              log_a.sizes());
  auto shape = log_a.sizes().vec();
  shape.pop_back();
  auto ar = at::empty(shape, log_a.options()), ai = at::empty(shape, log_a.options());
  AT_DISPATCH_FLOATING_TYPES(log_a.scalar_type(), "gateloop_transition", [&] {
    transition_row<scalar_t, true>(log_a.data_ptr<scalar_t>(), ar.numel(), ar.data_ptr<scalar_t>(),
                                   ai.data_ptr<scalar_t>());
  });
  return {ar, ai};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GateLoop scan, forward");
  m.def("backward", &backward, "GateLoop scan, backward");
  m.def("transition", &transition, "a = exp(log_a), complex, as (real, imaginary) planes");
}
