// The intra-chunk decay of GateLoop's chunk form (one decay per head) as fused CPU loops: forward
// and backward each in one pass over the [G, C, C] score blocks, where PyTorch needs about eight
// (a difference, a mask, an exp, the phase's cos and sin, products) and each pass costs more in
// memory traffic than in arithmetic. The PyTorch reference is gateloop/ops/gateloop_chunk_head.py
// (ChunkPerHead, which computes the same planes as separate tensors); gateloop/ops/gateloop_fused.py
// loads this file.
//
// Per block g (one batch, head and chunk) and step pair s <= t, with rho, theta the cumulative
// log-magnitude and phase from the chunk's start:
//   W_ts = e^{rho_t - rho_s} cos(theta_t - theta_s),  Ws_ts = e^{rho_t - rho_s} sin(theta_t - theta_s)
//   forward:  AW = A * W (0 above the diagonal)
//   backward: dA = dP * W;  with dW = dP * A:  drho_t += dW W, drho_s -= dW W,
//             dtheta_t -= dW Ws, dtheta_s += dW Ws
// cos and sin of the difference come from the per-step cos and sin (cos t cos s + sin t sin s), so the
// only transcendental per pair is the exp, of an exponent <= 0 (no overflow) since s <= t.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrain = 8;  // blocks per parallel task

void check(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == shape,
              "gateloop chunk kernel: ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ",
              like.scalar_type(), "; got ", t.sizes(), " ", t.scalar_type());
}

// Per-step cos and sin of one block's phases (cos = 1, sin = 0 for a real decay).
template <typename T>
void phases(const T* theta, int64_t C, T* c, T* s) {
  for (int64_t i = 0; i < C; ++i) {
    c[i] = theta ? std::cos(theta[i]) : T(1);
    s[i] = theta ? std::sin(theta[i]) : T(0);
  }
}

template <typename T>
void forward_blocks(const T* A, const T* rho, const T* theta, T* AW, int64_t G, int64_t C) {
  at::parallel_for(0, G, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> c(C), s(C);
    for (int64_t g = begin; g < end; ++g) {
      const T* r = rho + g * C;
      phases(theta ? theta + g * C : nullptr, C, c.data(), s.data());
      for (int64_t t = 0; t < C; ++t) {
        const T* a = A + (g * C + t) * C;
        T* out = AW + (g * C + t) * C;
        for (int64_t j = 0; j <= t; ++j) out[j] = a[j] * std::exp(r[t] - r[j]) * (c[t] * c[j] + s[t] * s[j]);
        for (int64_t j = t + 1; j < C; ++j) out[j] = T(0);
      }
    }
  });
}

template <typename T>
void backward_blocks(T* dP, const T* A, const T* rho, const T* theta, T* drho, T* dtheta, int64_t G,
                     int64_t C) {
  at::parallel_for(0, G, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> c(C), s(C), col_r(C), col_t(C);
    for (int64_t g = begin; g < end; ++g) {
      const T* r = rho + g * C;
      phases(theta ? theta + g * C : nullptr, C, c.data(), s.data());
      std::fill(col_r.begin(), col_r.end(), T(0));
      std::fill(col_t.begin(), col_t.end(), T(0));
      T* dr = drho + g * C;
      T* dt = dtheta ? dtheta + g * C : nullptr;
      for (int64_t t = 0; t < C; ++t) {
        const T* a = A + (g * C + t) * C;
        T* d = dP + (g * C + t) * C;  // dP in, dA out
        T row_r = 0, row_t = 0;
        for (int64_t j = 0; j <= t; ++j) {
          const T e = std::exp(r[t] - r[j]);
          const T w = e * (c[t] * c[j] + s[t] * s[j]), ws = e * (s[t] * c[j] - c[t] * s[j]);
          const T dw = d[j] * a[j];
          d[j] *= w;
          row_r += dw * w;
          col_r[j] += dw * w;
          row_t += dw * ws;
          col_t[j] += dw * ws;
        }
        for (int64_t j = t + 1; j < C; ++j) d[j] = T(0);
        dr[t] = row_r;
        if (dt) dt[t] = -row_t;
      }
      for (int64_t j = 0; j < C; ++j) {
        dr[j] -= col_r[j];
        if (dt) dt[j] += col_t[j];
      }
    }
  });
}

// forward(A [G, C, C], rho [G, C], theta [G, C]?) -> AW [G, C, C]
at::Tensor forward(const at::Tensor& A, const at::Tensor& rho, const c10::optional<at::Tensor>& theta) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "chunk kernel: A must be [G, C, C]");
  const int64_t G = A.size(0), C = A.size(1);
  check(A, A, {G, C, C}, "A");
  check(rho, A, {G, C}, "rho");
  if (theta.has_value()) check(*theta, A, {G, C}, "theta");
  auto AW = at::empty_like(A);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "gateloop_chunk_forward", [&] {
    forward_blocks<scalar_t>(A.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
                             theta.has_value() ? theta->data_ptr<scalar_t>() : nullptr, AW.data_ptr<scalar_t>(), G, C);
  });
  return AW;
}

// backward(dP [G, C, C] (overwritten with dA), A, rho, theta?) -> [dA (= dP), drho, dtheta?]
std::vector<at::Tensor> backward(at::Tensor& dP, const at::Tensor& A, const at::Tensor& rho,
                                 const c10::optional<at::Tensor>& theta) {
  const int64_t G = A.size(0), C = A.size(1);
  check(A, A, {G, C, C}, "A");
  check(dP, A, {G, C, C}, "dP");
  check(rho, A, {G, C}, "rho");
  if (theta.has_value()) check(*theta, A, {G, C}, "theta");
  auto drho = at::empty_like(rho);
  at::Tensor dtheta = theta.has_value() ? at::empty_like(rho) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "gateloop_chunk_backward", [&] {
    backward_blocks<scalar_t>(dP.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
                              theta.has_value() ? theta->data_ptr<scalar_t>() : nullptr, drho.data_ptr<scalar_t>(),
                              dtheta.defined() ? dtheta.data_ptr<scalar_t>() : nullptr, G, C);
  });
  if (dtheta.defined()) return {dP, drho, dtheta};
  return {dP, drho};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GateLoop chunk, intra-chunk decay, forward");
  m.def("backward", &backward, "GateLoop chunk, intra-chunk decay, backward");
}
