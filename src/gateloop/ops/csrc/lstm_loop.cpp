// The LSTM loop (and the eight variants of Greff et al. 2015) as fused CPU loops: per step, one matrix
// product for the recurrent input and one pass over [B, N] for every gate, the cell and the output;
// backwards, one pass for every pre-activation's gradient and one product to carry dL/dy back. The
// PyTorch reference is gateloop/ops/lstm.py: _LSTMLoop (the same loop, its backward written out) and
// lstm_recurrent (autograd through every step); gateloop/ops/lstm_fused.py loads this file.
//
// A variant is a Spec: where each gate's block sits in the pre-activations (-1: the gate is fixed to
// 1), where each peephole's row sits in p (-1: none), and four switches (CIFG: f = 1 - i; NIAF: g is
// the identity; NOAF: h is the identity; FGR: the gates also see all gates' previous activations).
// Per step, with a = x_proj_t + R y_{t-1} (+ R_gates [i; f; o]_{t-1} for FGR):
//   i = sigma(a_i + p_i c_{t-1})   f = sigma(a_f + p_f c_{t-1})   z = g(a_z)
//   c_t = f c_{t-1} + i z          o = sigma(a_o + p_o c_t)       y_t = o h(c_t)
// The activations overwrite nothing: A [B, T, G, N] keeps each step's gates (z for the z block),
// C and Y the cells and outputs, which is all the backward pass needs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec8.h"

namespace {

struct Spec {
  int64_t ji, jf, jz, jo;  // gate blocks in a and A
  int64_t pi, pf, po;      // peephole rows in p
  bool cifg, niaf, noaf, fgr;
};

Spec spec_from(const std::vector<int64_t>& s) {
  TORCH_CHECK(s.size() == 11, "lstm kernel: the variant spec has 11 entries, got ", s.size());
  return {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] != 0, s[8] != 0, s[9] != 0, s[10] != 0};
}

// Every loop over a row of N units runs on Lanes<T>::W lanes at once (vec8.h: float32 in vectors of 8,
// float64 one at a time with libm), the row's tail padded, so N needs no multiple of W.
template <typename V>
inline V sigmoid(V x) {
  return 1.0f / (1.0f + exp_(-x));
}

// tanh x = 1 - 2 / (e^{2x} + 1): exact at the ends (+-1), absolute error about 1e-7 near 0.
inline f8 tanh_(f8 x) { return 1.0f - 2.0f / (exp_(2.0f * x) + 1.0f); }
inline double tanh_(double x) { return std::tanh(x); }

// The per-step products, [B, K] x [K, M] with B = 16 and K, M of a few hundred, are too small for
// a BLAS call to pay off: it repacks its right operand on every call, which cost more than the
// arithmetic. Packed is that operand packed once per loop: panels of 16 columns, each K x 16
// contiguous and zero-padded, so that the product's inner loop reads 64 bytes per k in order.
struct Packed {
  int64_t K, M, panels;
  std::vector<float> data;
};

// Packs the [K, M] matrix src[k * ks + j * js] (any strides: R, or R transposed, without a copy).
Packed pack(const float* src, int64_t K, int64_t M, int64_t ks, int64_t js) {
  Packed m{K, M, (M + 15) / 16, {}};
  m.data.assign(m.panels * K * 16, 0.0f);
  for (int64_t p = 0; p < m.panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = p * 16; j < std::min(M, p * 16 + 16); ++j)
        m.data[(p * K + k) * 16 + j - p * 16] = src[k * ks + j * js];
  return m;
}

// Rows [0, R) of out[r, j] = add[r, j] + sum_k a[r, k] m[k, j] in the columns of panel p, with the
// 2 R accumulators of 8 lanes in registers (add may be null: 0). Rows are lda / ldo / ldadd apart.
// R = 6 keeps 12 multiply-adds in flight, enough to hide their latency (5 cycles on Zen 2, 4 on
// recent Intel cores) at 2 per cycle.
template <int R>
void panel_rows(const float* a, int64_t lda, const Packed& m, int64_t p, float* out, int64_t ldo,
                const float* add, int64_t ldadd) {
  f8 acc[R][2] = {};
  const float* b = m.data.data() + p * m.K * 16;
  for (int64_t k = 0; k < m.K; ++k, b += 16) {
    f8 b0, b1;
    std::memcpy(&b0, b, sizeof b0), std::memcpy(&b1, b + 8, sizeof b1);
    // In registers: otherwise the compiler reloads them in every multiply-add, and the loads, not
    // the arithmetic, bound the loop.
    asm("" : "+x"(b0), "+x"(b1));
    for (int r = 0; r < R; ++r) {
      const float v = a[r * lda + k];
      const f8 ar = {v, v, v, v, v, v, v, v};
      acc[r][0] += ar * b0, acc[r][1] += ar * b1;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 && p * 16 + 8 * h < m.M; ++h) {
      const int64_t j = p * 16 + 8 * h;
      store(out + r * ldo, j, m.M, acc[r][h] + (add ? load(add + r * ldadd, j, m.M) : f8{}));
    }
}

// out[B, M] = add + a[B, K] x m, rows in blocks of 6 (the rest in one smaller block), panels spread
// over threads.
void packed_product(const float* a, int64_t B, int64_t lda, const Packed& m, float* out, int64_t ldo,
                    const float* add = nullptr, int64_t ldadd = 0) {
  at::parallel_for(0, m.panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t r = 0; r < B; r += 6) {
        const float *ar = a + r * lda, *dr = add ? add + r * ldadd : nullptr;
        float* o = out + r * ldo;
        switch (std::min<int64_t>(B - r, 6)) {
          case 6: panel_rows<6>(ar, lda, m, p, o, ldo, dr, ldadd); break;
          case 5: panel_rows<5>(ar, lda, m, p, o, ldo, dr, ldadd); break;
          case 4: panel_rows<4>(ar, lda, m, p, o, ldo, dr, ldadd); break;
          case 3: panel_rows<3>(ar, lda, m, p, o, ldo, dr, ldadd); break;
          case 2: panel_rows<2>(ar, lda, m, p, o, ldo, dr, ldadd); break;
          default: panel_rows<1>(ar, lda, m, p, o, ldo, dr, ldadd);
        }
      }
  });
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Rows of N constants for the parts a variant leaves out: a missing gate reads ones, a missing
// peephole or FGR term reads zeros, so one loop serves every variant.
template <typename T>
struct Rows {
  std::vector<T> ones, zeros;
  explicit Rows(int64_t N) : ones(N, T(1)), zeros(N, T(0)) {}
};

// out = sigma(a + e + p c), over one row of N units.
template <typename T>
void gate_row(T* out, const T* a, const T* e, const T* p, const T* c, int64_t N) {
  for (int64_t n = 0; n < N; n += Lanes<T>::W)
    store(out, n, N, sigmoid(load(a, n, N) + load(e, n, N) + load(p, n, N) * load(c, n, N)));
}

// One step forward for every batch row: reads the pre-activations `pre` [B, G N] (and FGR's `extra`
// [B, 3 N]), the old cell; writes A[:, t], C[:, t], Y[:, t], the new cell and output (and gates).
template <typename T>
void step_forward(const Spec& s, const Rows<T>& k, const T* pre, const T* extra, const T* p, T* c, T* y,
                  T* gates_ifo, T* A_t, T* C_t, T* Y_t, int64_t B, int64_t G, int64_t N, int64_t T_) {
  constexpr int64_t W = Lanes<T>::W;
  const T *zero = k.zeros.data(), *one = k.ones.data();
  const T *p_i = s.pi >= 0 ? p + s.pi * N : zero, *p_f = s.pf >= 0 ? p + s.pf * N : zero,
          *p_o = s.po >= 0 ? p + s.po * N : zero;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* a = pre + b * G * N;
      const T* e = s.fgr ? extra + b * 3 * N : nullptr;
      T* act = A_t + b * T_ * G * N;  // A_t points at A[0, t]; batch rows are T G N apart
      T *c_old = c + b * N, *c_new = C_t + b * T_ * N, *y_new = Y_t + b * T_ * N;
      const T *i = one, *f = one, *o = one;
      if (s.ji >= 0) gate_row(act + s.ji * N, a + s.ji * N, e ? e : zero, p_i, c_old, N), i = act + s.ji * N;
      if (s.jf >= 0) gate_row(act + s.jf * N, a + s.jf * N, e ? e + N : zero, p_f, c_old, N), f = act + s.jf * N;
      T* z = act + s.jz * N;
      const T* a_z = a + s.jz * N;
      for (int64_t n = 0; n < N; n += W) {
        const auto zn = s.niaf ? load(a_z, n, N) : tanh_(load(a_z, n, N)), in = load(i, n, N);
        const auto fn = s.cifg ? 1.0f - in : load(f, n, N);  // CIFG couples f to i
        store(z, n, N, zn);
        store(c_new, n, N, fn * load(c_old, n, N) + in * zn);
      }
      if (s.jo >= 0) gate_row(act + s.jo * N, a + s.jo * N, e ? e + 2 * N : zero, p_o, c_new, N), o = act + s.jo * N;
      for (int64_t n = 0; n < N; n += W) {
        const auto cn = load(c_new, n, N);
        store(y_new, n, N, load(o, n, N) * (s.noaf ? cn : tanh_(cn)));
      }
      std::copy(c_new, c_new + N, c_old);
      std::copy(y_new, y_new + N, y + b * N);
      if (s.fgr) {  // the next step's gates see these: [i; f; o]
        T* g = gates_ifo + b * 3 * N;
        std::copy(i, i + N, g), std::copy(f, f + N, g + N), std::copy(o, o + N, g + 2 * N);
      }
    }
  });
}

// One step backward for every batch row: from dL/dy_t (dY[:, t] + the carried dy) and the carried
// dL/dc_t, every pre-activation's gradient into dA[:, t] (and FGR's [di; df; do] into `dgates`), and
// dL/dc_{t-1} into dc. dprev is FGR's dL/d[i; f; o]_t, carried from step t + 1.
template <typename T>
void step_backward(const Spec& s, const Rows<T>& k, const T* A_t, const T* C_t, const T* c_prev,
                   int64_t c_prev_stride, const T* dY_t, const T* dy, const T* dprev, const T* p, T* dc,
                   T* dA_t, T* dgates, int64_t B, int64_t G, int64_t N, int64_t T_) {
  constexpr int64_t W = Lanes<T>::W;
  const T *zero = k.zeros.data(), *one = k.ones.data();
  const T *p_i = s.pi >= 0 ? p + s.pi * N : zero, *p_f = s.pf >= 0 ? p + s.pf * N : zero,
          *p_o = s.po >= 0 ? p + s.po * N : zero;
  // A gate a variant lacks reads ones (so its slope, o (1 - o), is 0) and writes its gradient into
  // `sink`; the switches pick the formulas that differ.
  const T has_i = s.ji >= 0, has_f = s.jf >= 0, has_o = s.jo >= 0;
  const T cifg = s.cifg, h_slope = !s.noaf, z_slope = !s.niaf;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sink(3 * N);
    for (int64_t b = begin; b < end; ++b) {
      const T* act = A_t + b * T_ * G * N;
      T* da = dA_t + b * T_ * G * N;
      const T* dp = s.fgr ? dprev + b * 3 * N : nullptr;
      const T *cn_ = C_t + b * T_ * N, *cp_ = c_prev + b * c_prev_stride, *dY_b = dY_t + b * T_ * N;
      const T *dy_b = dy + b * N, *z_ = act + s.jz * N;
      const T* i_ = s.ji >= 0 ? act + s.ji * N : one;
      const T* f_ = s.jf >= 0 ? act + s.jf * N : one;
      const T* o_ = s.jo >= 0 ? act + s.jo * N : one;
      const T *dp_i = dp ? dp : zero, *dp_f = dp ? dp + N : zero, *dp_o = dp ? dp + 2 * N : zero;
      T* da_i = s.ji >= 0 ? da + s.ji * N : sink.data();
      T* da_f = s.jf >= 0 ? da + s.jf * N : sink.data() + N;
      T* da_o = s.jo >= 0 ? da + s.jo * N : sink.data() + 2 * N;
      T *da_z = da + s.jz * N, *dc_b = dc + b * N;
      for (int64_t n = 0; n < N; n += W) {
        const auto cn = load(cn_, n, N), cp = load(cp_, n, N), i = load(i_, n, N), f = load(f_, n, N);
        const auto o = load(o_, n, N), z = load(z_, n, N);
        const auto hc = s.noaf ? cn : tanh_(cn);
        const auto dy_t = load(dY_b, n, N) + load(dy_b, n, N);
        auto dc_t = load(dc_b, n, N) + dy_t * o * (1.0f - h_slope * hc * hc);
        const auto so = has_o * o * (1.0f - o);
        const auto dao = dy_t * so * hc + load(dp_o, n, N) * so;
        dc_t += dao * load(p_o, n, N);
        const auto si = has_i * i * (1.0f - i);
        const auto dai = dc_t * si * (z - cifg * cp) + load(dp_i, n, N) * si;
        const auto sf = has_f * f * (1.0f - f);
        const auto daf = dc_t * sf * cp + load(dp_f, n, N) * sf;
        const auto keep = cifg * (1.0f - i) + (1.0f - cifg) * f;  // dc_t / dc_{t-1}
        store(da_o, n, N, dao), store(da_i, n, N, dai), store(da_f, n, N, daf);
        store(da_z, n, N, dc_t * (1.0f - z_slope * z * z) * i);
        store(dc_b, n, N, dc_t * keep + dai * load(p_i, n, N) + daf * load(p_f, n, N));
      }
      if (s.fgr) {
        T* g = dgates + b * 3 * N;
        std::copy(da_i, da_i + N, g), std::copy(da_f, da_f + N, g + N), std::copy(da_o, da_o + N, g + 2 * N);
      }
    }
  });
}

void check(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == shape,
              "lstm kernel: ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ",
              like.scalar_type(), "; got ", t.sizes(), " ", t.scalar_type());
}

// (A [B, T, G, N], C [B, T, N], Y [B, T, N], c_T [B, N], FGR: [i; f; o]_T [B, 3 N]). y_T is Y[:, -1].
std::vector<at::Tensor> forward(const at::Tensor& x_proj, const at::Tensor& R, const c10::optional<at::Tensor>& p,
                                const c10::optional<at::Tensor>& R_gates, const at::Tensor& y0,
                                const at::Tensor& c0, const c10::optional<at::Tensor>& prev0,
                                std::vector<int64_t> spec) {
  const Spec s = spec_from(spec);
  const int64_t B = x_proj.size(0), T_ = x_proj.size(1), N = R.size(1), G = R.size(0) / N;
  check(x_proj, x_proj, {B, T_, G * N}, "x_proj");
  check(R, x_proj, {G * N, N}, "R");
  check(y0, x_proj, {B, N}, "y0");
  check(c0, x_proj, {B, N}, "c0");
  TORCH_CHECK(s.fgr == (R_gates.has_value() && prev0.has_value()), "lstm kernel: FGR needs R_gates and prev0");
  if (p.has_value()) check(*p, x_proj, {p->size(0), N}, "p");
  if (s.fgr) {
    check(*R_gates, x_proj, {3 * N, 3 * N}, "R_gates");
    check(*prev0, x_proj, {B, 3 * N}, "prev0");
  }
  auto A = at::empty({B, T_, G, N}, x_proj.options()), C = at::empty({B, T_, N}, x_proj.options()),
       Y = at::empty({B, T_, N}, x_proj.options()), pre = at::empty({B, G * N}, x_proj.options());
  auto y = y0.clone(), c = c0.clone();
  auto gates = s.fgr ? prev0->clone() : at::Tensor(), extra = s.fgr ? at::empty({B, 3 * N}, x_proj.options()) : at::Tensor();
  const auto Rt = R.t(), Rgt = s.fgr ? R_gates->t() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x_proj.scalar_type(), "lstm_forward", [&] {
    const scalar_t* pp = ptr_or_null<scalar_t>(p);
    const Rows<scalar_t> rows(N);
    // float32: R^T (and R_gates^T) packed once; float64, the tests' algebra check: BLAS per step.
    constexpr bool packed = std::is_same_v<scalar_t, float>;
    Packed Rp, Rgp;
    if constexpr (packed) {
      Rp = pack(R.data_ptr<float>(), N, G * N, 1, N);
      if (s.fgr) Rgp = pack(R_gates->data_ptr<float>(), 3 * N, 3 * N, 1, 3 * N);
    }
    for (int64_t t = 0; t < T_; ++t) {
      if constexpr (packed) {
        packed_product(y.data_ptr<float>(), B, N, Rp, pre.data_ptr<float>(), G * N,
                       x_proj.data_ptr<float>() + t * G * N, T_ * G * N);
        if (s.fgr) packed_product(gates.data_ptr<float>(), B, 3 * N, Rgp, extra.data_ptr<float>(), 3 * N);
      } else {
        at::addmm_out(pre, x_proj.select(1, t), y, Rt);
        if (s.fgr) at::mm_out(extra, gates, Rgt);
      }
      step_forward<scalar_t>(s, rows, pre.data_ptr<scalar_t>(), s.fgr ? extra.data_ptr<scalar_t>() : nullptr, pp,
                             c.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             s.fgr ? gates.data_ptr<scalar_t>() : nullptr, A.data_ptr<scalar_t>() + t * G * N,
                             C.data_ptr<scalar_t>() + t * N, Y.data_ptr<scalar_t>() + t * N, B, G, N, T_);
    }
  });
  std::vector<at::Tensor> out{A, C, Y, c};
  if (s.fgr) out.push_back(gates);
  return out;
}

// (dA [B, T, G, N] = dL/d(pre-activations) = dL/dx_proj, dy0, dc0, FGR: d[i; f; o]_0 [B, 3 N]).
// The weight gradients are products over all steps, done by the caller from dA.
std::vector<at::Tensor> backward(const at::Tensor& dY, const at::Tensor& dy_T, const at::Tensor& dc_T,
                                 const c10::optional<at::Tensor>& dgates_T, const at::Tensor& R,
                                 const c10::optional<at::Tensor>& p, const c10::optional<at::Tensor>& R_gates,
                                 const at::Tensor& A, const at::Tensor& C, const at::Tensor& c0,
                                 std::vector<int64_t> spec) {
  const Spec s = spec_from(spec);
  const int64_t B = A.size(0), T_ = A.size(1), G = A.size(2), N = A.size(3);
  check(dY, A, {B, T_, N}, "dY");
  check(dy_T, A, {B, N}, "dy_T");
  check(dc_T, A, {B, N}, "dc_T");
  check(R, A, {G * N, N}, "R");
  check(C, A, {B, T_, N}, "C");
  check(c0, A, {B, N}, "c0");
  if (p.has_value()) check(*p, A, {p->size(0), N}, "p");
  TORCH_CHECK(s.fgr == (R_gates.has_value() && dgates_T.has_value()), "lstm kernel: FGR needs R_gates and dgates_T");
  if (s.fgr) check(*R_gates, A, {3 * N, 3 * N}, "R_gates");
  auto dA = at::empty_like(A);
  auto dy = dy_T.clone(), dc = dc_T.clone();
  auto dprev = s.fgr ? dgates_T->clone() : at::Tensor(), dgates = s.fgr ? at::empty({B, 3 * N}, A.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lstm_backward", [&] {
    const scalar_t* pp = ptr_or_null<scalar_t>(p);
    const Rows<scalar_t> rows(N);
    constexpr bool packed = std::is_same_v<scalar_t, float>;  // as in forward
    Packed Rp, Rgp;
    if constexpr (packed) {
      Rp = pack(R.data_ptr<float>(), G * N, N, N, 1);
      if (s.fgr) Rgp = pack(R_gates->data_ptr<float>(), 3 * N, 3 * N, 3 * N, 1);
    }
    for (int64_t t = T_ - 1; t >= 0; --t) {
      const scalar_t* c_prev = t ? C.data_ptr<scalar_t>() + (t - 1) * N : c0.data_ptr<scalar_t>();
      step_backward<scalar_t>(s, rows, A.data_ptr<scalar_t>() + t * G * N, C.data_ptr<scalar_t>() + t * N, c_prev,
                              t ? T_ * N : N, dY.data_ptr<scalar_t>() + t * N, dy.data_ptr<scalar_t>(),
                              s.fgr ? dprev.data_ptr<scalar_t>() : nullptr, pp, dc.data_ptr<scalar_t>(),
                              dA.data_ptr<scalar_t>() + t * G * N, s.fgr ? dgates.data_ptr<scalar_t>() : nullptr,
                              B, G, N, T_);
      if constexpr (packed) {
        packed_product(dA.data_ptr<float>() + t * G * N, B, T_ * G * N, Rp, dy.data_ptr<float>(), N);
        if (s.fgr) packed_product(dgates.data_ptr<float>(), B, 3 * N, Rgp, dprev.data_ptr<float>(), 3 * N);
      } else {
        at::mm_out(dy, dA.select(1, t).flatten(1), R);
        if (s.fgr) at::mm_out(dprev, dgates, *R_gates);
      }
    }
  });
  std::vector<at::Tensor> out{dA, dy, dc};
  if (s.fgr) out.push_back(dprev);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "LSTM loop forward (CPU)");
  m.def("backward", &backward, "LSTM loop backward (CPU)");
}
