// Arithmetic on lanes for the fused kernels (gateloop_scan.cpp, lstm_loop.cpp): float32 in GCC / Clang
// vectors of 8, which the compiler maps onto whatever SIMD the build targets, with the transcendental
// functions the kernels need written in plain arithmetic, because libm's expf, cosf and sinf are
// scalar calls that cost more than the rest of a kernel's step; float64, the dtype the tests check
// the algebra in, one lane at a time with libm. A loop written over Lanes<T> serves both.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

// To the nearest integer, for |x| < 2^22: adding 1.5 * 2^23 leaves no bits below the units.
inline f8 round8(f8 x) { return (x + 12582912.0f) - 12582912.0f; }

// e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial:
// relative error below 2e-7, about 2 ulp. Above 88 it is infinity, as in float32, and below -87 it is
// 0 where float32 would go through subnormals (slow, and below anything the kernels' sums resolve),
// so log a = -inf (a = 0) and the saturating forms of sigmoid and tanh stay exact; NaN stays NaN.
inline f8 exp8(const f8 x0) {
  const f8 lo = f8{} - 87.0f, hi = f8{} + 88.0f;
  f8 x = x0 < lo ? lo : x0;
  x = x > hi ? hi : x;
  const f8 n = round8(x * 1.44269504f);
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
  return x0 < lo ? f8{} : x0 > hi ? f8{} + INFINITY : y;
}

// sin and cos by Cody-Waite reduction to |r| <= pi/4 and Cephes' polynomials: absolute error about
// 1e-7 for |x| < 8192 (beyond that the reduction loses bits; callers check and use libm there).
inline void sincos8(f8 x, f8& s, f8& c) {
  const f8 n = round8(x * 0.636619772f);                                           // x = n pi/2 + r
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

// Lanes of (a, b) picked by index, 0-7 from a and 8-15 from b (GCC and Clang spell it differently).
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif

// The even and the odd lanes of the 16 values lo, hi: (real, imaginary) pairs split into two planes.
inline void deinterleave8(f8 lo, f8 hi, f8& even, f8& odd) {
  even = SHUFFLE8(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
  odd = SHUFFLE8(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
}

// Whether any lane of a comparison's result is set.
inline bool any8(i8 m) {
  int32_t lanes[8];
  std::memcpy(lanes, &m, sizeof lanes);
  int32_t acc = 0;
  for (int32_t lane : lanes) acc |= lane;
  return acc != 0;
}

// ---- One loop for both dtypes: Lanes<T>::V is f8 for float and double itself for double.

template <typename T> struct Lanes;
template <> struct Lanes<float> { using V = f8; static constexpr int64_t W = 8; };
template <> struct Lanes<double> { using V = double; static constexpr int64_t W = 1; };

// Lanes n, n + 1, ... of a row of N values; the tail of the row is padded with zeros on load and
// not written on store, so N needs no multiple of W.
template <typename T>
inline typename Lanes<T>::V load(const T* p, int64_t n, int64_t N) {
  typename Lanes<T>::V v{};
  if (N - n >= Lanes<T>::W)
    std::memcpy(&v, p + n, sizeof v);  // a fixed size: one unaligned vector load
  else
    std::memcpy(&v, p + n, sizeof(T) * (N - n));
  return v;
}

template <typename T>
inline void store(T* p, int64_t n, int64_t N, typename Lanes<T>::V v) {
  if (N - n >= Lanes<T>::W)
    std::memcpy(p + n, &v, sizeof v);
  else
    std::memcpy(p + n, &v, sizeof(T) * (N - n));
}

// Values n, n + 1, ... of a row of N complex values stored as (real, imaginary) pairs, as two planes.
inline std::pair<f8, f8> load_pairs(const float* p, int64_t n, int64_t N) {
  f8 v[2] = {};
  if (N - n >= 8)
    std::memcpy(v, p + 2 * n, sizeof v);  // a fixed size: two vector loads, not a call to memcpy
  else
    std::memcpy(v, p + 2 * n, sizeof(float) * 2 * (N - n));
  f8 re, im;
  deinterleave8(v[0], v[1], re, im);
  return {re, im};
}
inline std::pair<double, double> load_pairs(const double* p, int64_t n, int64_t) { return {p[2 * n], p[2 * n + 1]}; }

// The sum of a vector's lanes.
inline float lane_sum(f8 v) {
  float lanes[8];
  std::memcpy(lanes, &v, sizeof lanes);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
inline double lane_sum(double v) { return v; }

// out[r] = lane_sum(v[r]) for the n <= 8 vectors v: eight at once by a tree of shuffles and adds
// that transposes as it sums (7 adds for 8 sums, where one at a time takes 7 each).
inline void lane_sums(const f8* v, int64_t n, float* out) {
  if (n < 8) {
    for (int64_t r = 0; r < n; ++r) out[r] = lane_sum(v[r]);
    return;
  }
  f8 pair[4], quad[2];
  for (int r = 0; r < 4; ++r)  // lanes alternate v[2r], v[2r+1]
    pair[r] = SHUFFLE8(v[2 * r], v[2 * r + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
              SHUFFLE8(v[2 * r], v[2 * r + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int r = 0; r < 2; ++r)  // lanes cycle through v[4r] .. v[4r+3]
    quad[r] = SHUFFLE8(pair[2 * r], pair[2 * r + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
              SHUFFLE8(pair[2 * r], pair[2 * r + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 sums = SHUFFLE8(quad[0], quad[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(quad[0], quad[1], 4, 5, 6, 7, 12, 13, 14, 15);
  std::memcpy(out, &sums, sizeof sums);
}
inline void lane_sums(const double* v, int64_t n, double* out) { std::memcpy(out, v, sizeof(double) * n); }

inline f8 exp_(f8 x) { return exp8(x); }
inline double exp_(double x) { return std::exp(x); }

// e^(m + i th) = e^m (cos th + i sin th) as (real, imaginary). A vector with an angle beyond
// sincos8's range (or NaN) goes to libm lane by lane: rare, where angles are projections of
// normalised inputs.
inline std::pair<f8, f8> cexp_(f8 m, f8 th) {
  if (any8(~((th < 8192.0f) & (th > -8192.0f)))) {
    float mv[8], tv[8], re[8], im[8];
    std::memcpy(mv, &m, sizeof mv), std::memcpy(tv, &th, sizeof tv);
    for (int j = 0; j < 8; ++j) {
      const float mag = std::exp(mv[j]);
      re[j] = mag * std::cos(tv[j]), im[j] = mag * std::sin(tv[j]);
    }
    std::memcpy(&m, re, sizeof m), std::memcpy(&th, im, sizeof th);
    return {m, th};
  }
  f8 s, c;
  sincos8(th, s, c);
  const f8 mag = exp8(m);
  return {mag * c, mag * s};
}
inline std::pair<double, double> cexp_(double m, double th) {
  const double mag = std::exp(m);
  return {mag * std::cos(th), mag * std::sin(th)};
}
