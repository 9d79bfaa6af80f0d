// One LSTM step, forward and backward, as two CPU ops: the step's matmul and its pointwise block.
//
// The fused LSTM layer (models/lstm_fused.py) runs its time loops in TorchScript and calls one of these
// ops per step. Written as TorchScript ops, the pointwise block is 8-17 ops per step, each a pass
// over memory and an interpreter dispatch; here it is one pass, run by each thread on its own batch
// rows right after its share of the matmul. Registered as torch.ops.palgan.* so that TorchScript can
// call them; float32 and float64, contiguous buffers.
//
// Activations (float): sigma(x) = 1 / (1 + e^-x) and tanh(x) = 2 sigma(2x) - 1, with e^x from
// a degree-5 polynomial (max. relative error about 2e-7); written as plain loops that the
// compiler vectorises (AVX2 or NEON, whichever the build flags allow), and with AVX-512 the same
// formulas written with intrinsics (vscalefps for 2^n; about 20% faster than the compiler's
// version on a 2-core AVX-512 x86 VM). NaN propagates. float64 uses std::exp, so that gradcheck sees
// exact derivatives.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace palgan {
namespace {

// e^r = 1 + r + r^2 (kExp0 + kExp1 r + kExp2 r^2 + kExp3 r^3) on |r| <= ln2 / 2: a degree-5
// polynomial fitted for least relative error (Lawson's iteration; max. relative error 1.0e-7, or
// 2e-7 evaluated in float). Cephes' degree-7 polynomial is exact to the last bit, which nothing
// here needs, at two more FMAs per value.
constexpr float kExp0 = 0.4999923174913354f, kExp1 = 0.16667114445981193f, kExp2 = 0.041890117608443446f,
                kExp3 = 0.008312527909357603f;

inline float exp_approx(float x) {
  x = 88.0f < x ? 88.0f : x;     // clamp so that 2^n stays a normal float; the order keeps NaN
  x = -87.0f > x ? -87.0f : x;
  // e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2; 1.5 * 2^23 rounds and leaves n in the low bits
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = kExp3;
  p = p * r + kExp2;
  p = p * r + kExp1;
  p = p * r + kExp0;
  p = p * (r * r) + (r + 1.0f);
  int32_t ti, pi;
  std::memcpy(&ti, &t, 4);
  std::memcpy(&pi, &p, 4);
  pi += ti << 23;                // times 2^n
  std::memcpy(&p, &pi, 4);
  return p;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
template <typename T> inline T tanh_(T x) { return T(2) * sigmoid(x + x) - T(1); }
inline double tanh_(double x) { return std::tanh(x); }

// The input part of one batch row's pre-activations, x W_x (x: D entries, W_x (D, 4H)), for small
// D: when x has at most one nonzero entry (one-hot digits: always), returns that row of W_x and
// its factor in *scale, for the pointwise pass to add as it loads z; otherwise adds x W_x into z
// here, skipping zero entries, and returns nullptr.
template <typename T>
const T* input_row(T* __restrict z, const T* __restrict x, const T* __restrict W_x, int64_t D, int64_t n,
                   T* scale) {
  int64_t nonzero = 0, last = -1;
  for (int64_t d = 0; d < D; ++d) {
    if (x[d] != T(0)) { ++nonzero; last = d; }
  }
  *scale = nonzero == 1 ? x[last] : T(0);
  if (nonzero <= 1) return nonzero == 1 ? W_x + last * n : nullptr;
  for (int64_t d = 0; d < D; ++d) {
    const T v = x[d];
    if (v == T(0)) continue;
    const T* w = W_x + d * n;
    for (int64_t j = 0; j < n; ++j) z[j] += v * w[j];
  }
  return nullptr;
}

// One step, one batch row. z: (4H) the matmul's part of the pre-activations [g|i|f|o], to which
// the bias and, if w_row is given, scale * w_row are added as they are read; a: (4H) receives the
// activations; c_prev, c, tanh_c, h: (H).
template <typename T>
void forward_row(const T* __restrict z, const T* __restrict bias, const T* __restrict w_row, T scale,
                 T* __restrict a, const T* __restrict c_prev, T* __restrict c, T* __restrict tanh_c,
                 T* __restrict h, int64_t H) {
  if (w_row != nullptr) {
    for (int64_t j = 0; j < H; ++j) a[j] = tanh_(z[j] + bias[j] + scale * w_row[j]);         // g  (1)
    for (int64_t j = H; j < 4 * H; ++j) a[j] = sigmoid(z[j] + bias[j] + scale * w_row[j]);   // i, f, o  (2-4)
  } else {
    for (int64_t j = 0; j < H; ++j) a[j] = tanh_(z[j] + bias[j]);
    for (int64_t j = H; j < 4 * H; ++j) a[j] = sigmoid(z[j] + bias[j]);
  }
  const T* g = a; const T* i = a + H; const T* f = a + 2 * H; const T* o = a + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const T cj = f[j] * c_prev[j] + i[j] * g[j];                                   // (5)
    const T tc = tanh_(cj);
    c[j] = cj;
    tanh_c[j] = tc;
    h[j] = o[j] * tc;                                                               // (6)
  }
}

#if defined(__AVX512F__)
// e^x for 16 floats: the same reduction and polynomial as exp_approx.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);              // x second: a NaN passes through
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kExp3);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp0));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
inline __m512 tanh16(__m512 x) {
  return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), sigmoid16(_mm512_add_ps(x, x)), _mm512_set1_ps(1.0f));
}
inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// z + bias (+ scale * w_row) for 16 lanes.
inline __m512 pre16(const float* z, const float* bias, const float* w_row, __m512 scale, int64_t j, __mmask16 m) {
  const __m512 p = _mm512_add_ps(_mm512_maskz_loadu_ps(m, z + j), _mm512_maskz_loadu_ps(m, bias + j));
  return w_row == nullptr ? p : _mm512_fmadd_ps(scale, _mm512_maskz_loadu_ps(m, w_row + j), p);
}

template <>
void forward_row<float>(const float* __restrict z, const float* __restrict bias, const float* __restrict w_row,
                        float scale, float* __restrict a, const float* __restrict c_prev, float* __restrict c,
                        float* __restrict tanh_c, float* __restrict h, int64_t H) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < H; j += 16) {                                             // g  (1)
    const __mmask16 m = lanes(H - j);
    _mm512_mask_storeu_ps(a + j, m, tanh16(pre16(z, bias, w_row, s, j, m)));
  }
  for (int64_t j = H; j < 4 * H; j += 16) {                                         // i, f, o  (2-4)
    const __mmask16 m = lanes(4 * H - j);
    _mm512_mask_storeu_ps(a + j, m, sigmoid16(pre16(z, bias, w_row, s, j, m)));
  }
  for (int64_t j = 0; j < H; j += 16) {
    const __mmask16 m = lanes(H - j);
    const __m512 g = _mm512_maskz_loadu_ps(m, a + j), i = _mm512_maskz_loadu_ps(m, a + H + j);
    const __m512 f = _mm512_maskz_loadu_ps(m, a + 2 * H + j), o = _mm512_maskz_loadu_ps(m, a + 3 * H + j);
    const __m512 cj = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c_prev + j), _mm512_mul_ps(i, g));   // (5)
    const __m512 tc = tanh16(cj);
    _mm512_mask_storeu_ps(c + j, m, cj);
    _mm512_mask_storeu_ps(tanh_c + j, m, tc);
    _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(o, tc));                                               // (6)
  }
}
#endif

// One step back, one element, from the forward's activations (nothing else is stored):
//   dc   = dc_carry + dh o (1 - tanh^2 c_t)          dz_o = dh tanh(c_t) o (1 - o)
//   dz_g = dc i (1 - g^2)   dz_i = dc g i (1 - i)    dz_f = dc c_{t-1} f (1 - f)
//   dc_carry <- dc f  (what reaches c_{t-1})
template <typename T>
inline void backward_element(T g, T i, T f, T o, T tc, T c_prev, T dh, T& dc_carry, T& dz_g, T& dz_i, T& dz_f,
                             T& dz_o) {
  const T dc = dc_carry + dh * o * (T(1) - tc * tc);
  dz_g = dc * i * (T(1) - g * g);
  dz_i = dc * g * i * (T(1) - i);
  dz_f = dc * c_prev * f * (T(1) - f);
  dz_o = dh * tc * o * (T(1) - o);
  dc_carry = dc * f;
}

// One batch row: a (4H) = [g|i|f|o] of step t, dz (4H) its gradient; c_prev, tanh_c, dh, dc_carry (H).
template <typename T>
void backward_row(const T* __restrict a, const T* __restrict c_prev, const T* __restrict tanh_c,
                  const T* __restrict dh, T* __restrict dc_carry, T* __restrict dz, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    backward_element<T>(a[j], a[H + j], a[2 * H + j], a[3 * H + j], tanh_c[j], c_prev[j], dh[j], dc_carry[j],
                        dz[j], dz[H + j], dz[2 * H + j], dz[3 * H + j]);
  }
}

template <typename T>
void add_row(T* __restrict sum, const T* __restrict row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += row[j];
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), name, ": dtype or device differs");
}

// C (M, N) = A (M, K) @ B (K, N) (+ C with add), row-major with leading dimensions. For float, the
// oneDNN micro-kernel behind at::native::cpublas::brgemm: on an AVX-512 x86 VM it ran these shapes
// 15-25% faster than at::mm (MKL), and it takes raw pointers, so a step makes no tensor views.
// Where it is missing or refuses this CPU, and for double, at::mm_out / addmm_ on wrapped pointers.
bool brgemm_float_works() {
  static const bool works = [] {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    const char* off = std::getenv("PALGAN_LSTM_BRGEMM");   // "0": at::mm instead, to compare
    if (off != nullptr && std::string(off) == "0") return false;
    try {
      float a[16 * 16], b[16 * 16], c[16 * 16];
      for (int k = 0; k < 16 * 16; ++k) { a[k] = float(k % 7) - 3.0f; b[k] = float(k % 5) - 2.0f; }
      at::native::cpublas::brgemm(16, 16, 16, 16, 16, 16, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 16; ++j) {
          float ref = 0.0f;
          for (int k = 0; k < 16; ++k) ref += a[i * 16 + k] * b[k * 16 + j];
          if (std::abs(c[i * 16 + j] - ref) > 1e-3f) return false;
        }
      }
      return true;
    } catch (...) {
      return false;
    }
#else
    return false;
#endif
  }();
  return works;
}

template <typename T>
void matmul_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                 int64_t ldc, bool add) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_float_works()) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
      return;
    }
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (add) c.addmm_(a, b); else at::mm_out(c, a, b);
}

void release_matmul() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (brgemm_float_works()) at::native::cpublas::brgemm_release(false);
#endif
}

// Rows [begin, end) of the batch for this thread: each thread runs the step's matmul on its own
// rows (matmul_rows: single-threaded inside the parallel region), then their pointwise
// block, with no hand-off in between. Batch rows are independent, so the split needs no sync
// but the one at the end of the step.
constexpr int64_t kMinRowsPerThread = 16;

// One step of the forward loop on the layer's whole buffers, so that the TorchScript loop makes
// one call per step and no slices. xh (L+1, B, D+H) holds [x_t | h_{t-1}] in row t. Two forms:
//   W = W_h (H, 4H), W_x (D, 4H):  z = h_{t-1} W_h, then + b + x_t W_x per row, skipping zeros
//                                   of x_t (small D, e.g. one-hot digits: one row of W_x)
//   W = [W_x; W_h] (D+H, 4H), W_x empty:  z = [x_t | h_{t-1}] W, then + b
// then acts[t] = [g, i, f, o], c[t+1], tanh_c[t] (eqs 1-6), and h_t and x_{t+1} into xh[t+1],
// the next step's input row (x (L, B, D): any strides, contiguous rows). z (B, 4H) is scratch.
// Without a backward to feed, the buffers may be rings instead: acts and tanh_c with one row, c
// and xh with two; step t then uses row t modulo their length, and everything stays in cache.
void lstm_step_forward(const at::Tensor& W, const at::Tensor& W_x, const at::Tensor& z, const at::Tensor& acts,
                       const at::Tensor& bias, const at::Tensor& c, const at::Tensor& tanh_c, const at::Tensor& xh,
                       const at::Tensor& x, int64_t t) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x: expected (L, B, D) with contiguous rows, got ", x.sizes());
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "acts: expected (L, B, 4H), got ", acts.sizes());
  const int64_t L = x.size(0), B = x.size(1), D = x.size(2), H = acts.size(2) / 4, DH = D + H;
  TORCH_CHECK(0 <= t && t < L, "step ", t, " out of range for L = ", L);
  TORCH_CHECK(x.scalar_type() == acts.scalar_type() && x.device().is_cpu(), "x: dtype or device differs");
  const int64_t A = acts.size(0), T = tanh_c.size(0), C = c.size(0), R = xh.size(0);
  TORCH_CHECK((A == L && T == L && C == L + 1 && R == L + 1) || (A == 1 && T == 1 && C == 2 && R == 2),
              "buffers: expected all steps (L, L, L+1, L+1 rows) or rings (1, 1, 2, 2 rows)");
  const bool split = W_x.numel() != 0;                 // W = W_h, x W_x added per row
  if (split) check_shape(W_x, {D, 4 * H}, acts, "W_x");
  check_shape(W, {split ? H : DH, 4 * H}, acts, "W");
  check_shape(z, {B, 4 * H}, acts, "z");
  check_shape(acts, {A, B, 4 * H}, acts, "acts");
  check_shape(bias, {4 * H}, acts, "bias");
  check_shape(c, {C, B, H}, acts, "c");
  check_shape(tanh_c, {T, B, H}, acts, "tanh_c");
  check_shape(xh, {R, B, DH}, acts, "xh");
  brgemm_float_works();                                // decided once, outside the parallel region
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_step_forward", [&] {
    scalar_t* z_ptr = z.data_ptr<scalar_t>();
    scalar_t* a = acts.data_ptr<scalar_t>() + (t % A) * B * 4 * H;
    const scalar_t* b_ptr = bias.data_ptr<scalar_t>();
    const scalar_t* w = W.data_ptr<scalar_t>();
    const scalar_t* wx = split ? W_x.data_ptr<scalar_t>() : nullptr;
    const scalar_t* x_now = xh.data_ptr<scalar_t>() + (t % R) * B * DH;   // [x_t | h_{t-1}] rows
    const scalar_t* lhs = split ? x_now + D : x_now;                     // h_{t-1}, or [x_t | h_{t-1}]
    const int64_t K_in = split ? H : DH;
    const scalar_t* c_prev = c.data_ptr<scalar_t>() + (t % C) * B * H;
    scalar_t* c_next = c.data_ptr<scalar_t>() + ((t + 1) % C) * B * H;
    scalar_t* tc = tanh_c.data_ptr<scalar_t>() + (t % T) * B * H;
    scalar_t* next_row = xh.data_ptr<scalar_t>() + ((t + 1) % R) * B * DH;
    const scalar_t* x_next = t + 1 < L ? x.data_ptr<scalar_t>() + (t + 1) * x.stride(0) : nullptr;
    const int64_t x_row = x.stride(1);
    at::parallel_for(0, B, kMinRowsPerThread, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;   // the pool's threads do not inherit the caller's grad mode
      matmul_rows<scalar_t>(end - begin, 4 * H, K_in, lhs + begin * DH, DH, w, 4 * H, z_ptr + begin * 4 * H, 4 * H,
                            false);                                                      // eqs 1-4, inside
      release_matmul();
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* z_r = z_ptr + r * 4 * H;
        scalar_t scale = 0;
        const scalar_t* w_row = split ? input_row<scalar_t>(z_r, x_now + r * DH, wx, D, 4 * H, &scale) : nullptr;
        scalar_t* xh_r = next_row + r * DH;
        forward_row<scalar_t>(z_r, b_ptr, w_row, scale, a + r * 4 * H, c_prev + r * H, c_next + r * H, tc + r * H,
                              xh_r + D, H);
        if (x_next != nullptr) std::memcpy(xh_r, x_next + r * x_row, D * sizeof(scalar_t));
      }
    });
  });
}

// One step of the backward loop. dh (B, H) is the gradient reaching h_t: for t < L-1 it is formed
// here, dh = dz_{t+1} W_h^T (+ dh_out, the gradient from outside, (B, H) any strides, or empty);
// at t = L-1 the caller sets it. dc_carry (B, H) is the gradient reaching c_t through c_{t+1}
// (zero at t = L-1), updated in place. The gate gradients of step t go to row t % K of dz
// (K, B, 4H), a ring of the last K steps, and are added into db_parts (P, 4H): the batch rows are
// cut into P fixed chunks with one partial sum each, so the bias gradient does not depend on the
// number of threads.
void lstm_step_backward(const at::Tensor& W_hT, const at::Tensor& dz, const at::Tensor& dh, const at::Tensor& dh_out,
                        const at::Tensor& acts, const at::Tensor& c, const at::Tensor& tanh_c,
                        const at::Tensor& dc_carry, const at::Tensor& db_parts, int64_t t) {
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "acts: expected (L, B, 4H), got ", acts.sizes());
  const int64_t L = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  TORCH_CHECK(0 <= t && t < L, "step ", t, " out of range for L = ", L);
  check_shape(W_hT, {4 * H, H}, acts, "W_hT");
  check_shape(acts, {L, B, 4 * H}, acts, "acts");
  check_shape(c, {L + 1, B, H}, acts, "c");
  check_shape(tanh_c, {L, B, H}, acts, "tanh_c");
  check_shape(dh, {B, H}, acts, "dh");
  check_shape(dc_carry, {B, H}, acts, "dc_carry");
  TORCH_CHECK(dz.dim() == 3 && dz.size(0) >= 1 && dz.size(0) <= L, "dz: expected (K, B, 4H) with 1 <= K <= L");
  const int64_t K = dz.size(0);
  check_shape(dz, {K, B, 4 * H}, acts, "dz");
  const bool has_out = dh_out.numel() != 0;
  if (has_out) {
    TORCH_CHECK(dh_out.sizes() == dh.sizes() && dh_out.scalar_type() == acts.scalar_type(), "dh_out: expected (B, H)");
  }
  TORCH_CHECK(db_parts.dim() == 2 && db_parts.size(0) >= 1, "db_parts: expected (P, 4H)");
  const int64_t P = db_parts.size(0), rows_per_part = (B + P - 1) / P;
  check_shape(db_parts, {P, 4 * H}, acts, "db_parts");
  brgemm_float_works();                                // decided once, outside the parallel region
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_step_backward", [&] {
    const scalar_t* a = acts.data_ptr<scalar_t>() + t * B * 4 * H;
    const scalar_t* c_prev = c.data_ptr<scalar_t>() + t * B * H;
    const scalar_t* tc = tanh_c.data_ptr<scalar_t>() + t * B * H;
    scalar_t* d_h = dh.data_ptr<scalar_t>();
    scalar_t* carry = dc_carry.data_ptr<scalar_t>();
    const scalar_t* dz_next = dz.data_ptr<scalar_t>() + ((t + 1) % K) * B * 4 * H;
    const scalar_t* w_hT = W_hT.data_ptr<scalar_t>();
    scalar_t* out = dz.data_ptr<scalar_t>() + (t % K) * B * 4 * H;
    const int64_t parts_per_thread = std::max<int64_t>(1, (kMinRowsPerThread + rows_per_part - 1) / rows_per_part);
    at::parallel_for(0, P, parts_per_thread, [&](int64_t p_begin, int64_t p_end) {
      const int64_t r0 = std::min(B, p_begin * rows_per_part), r1 = std::min(B, p_end * rows_per_part);
      if (r1 <= r0) return;
      at::NoGradGuard no_grad;   // the pool's threads do not inherit the caller's grad mode
      if (t + 1 < L) {                                   // dh_t = dz_{t+1} W_h^T (+ from outside)
        if (has_out) dh.narrow(0, r0, r1 - r0).copy_(dh_out.narrow(0, r0, r1 - r0));
        matmul_rows<scalar_t>(r1 - r0, H, 4 * H, dz_next + r0 * 4 * H, 4 * H, w_hT, H, d_h + r0 * H, H, has_out);
        release_matmul();
      }
      for (int64_t p = p_begin; p < p_end; ++p) {
        scalar_t* db = db_parts.data_ptr<scalar_t>() + p * 4 * H;
        for (int64_t r = p * rows_per_part; r < std::min(B, (p + 1) * rows_per_part); ++r) {
          backward_row<scalar_t>(a + r * 4 * H, c_prev + r * H, tc + r * H, d_h + r * H, carry + r * H,
                                 out + r * 4 * H, H);
          add_row<scalar_t>(db, out + r * 4 * H, 4 * H);
        }
      }
    });
  });
}

// The weight gradient of a run of steps: dW (D+H, 4H) (+ dW with add) = xh^T dz, for the rows
// xh (N, D+H) = [x_t | h_{t-1}] and dz (N, 4H) of those steps (N = steps x batch), both contiguous.
// The micro-kernel multiplies row-major operands only, so xh is first transposed into the
// scratch xhT (D+H, N); then each thread takes its own columns of dW. On an AVX-512 x86 VM this
// ran at 103-108 GFLOP/s on one thread against MKL's 93-98 for xh.t() @ dz, and at 157-205
// against 150-177 on two (benchmarks/lstm_weight_grad.py). float64, or without the
// micro-kernel: addmm_ / mm_out.
void lstm_weight_grad(const at::Tensor& xh, const at::Tensor& dz, const at::Tensor& dW, const at::Tensor& xhT,
                      bool add) {
  TORCH_CHECK(xh.dim() == 2 && dz.dim() == 2 && xh.size(0) == dz.size(0),
              "xh, dz: expected (N, D+H) and (N, 4H), got ", xh.sizes(), " and ", dz.sizes());
  const int64_t N = xh.size(0), M = xh.size(1), G = dz.size(1);
  check_shape(xh, {N, M}, dz, "xh");
  check_shape(dz, {N, G}, dz, "dz");
  check_shape(dW, {M, G}, dz, "dW");
  check_shape(xhT, {M, N}, dz, "xhT");
  at::NoGradGuard no_grad;
  if (!(dz.scalar_type() == at::kFloat && brgemm_float_works())) {
    at::Tensor out = dW;
    if (add) out.addmm_(xh.t(), dz); else at::mm_out(out, xh.t(), dz);
    return;
  }
  const float* x = xh.data_ptr<float>();
  const float* d = dz.data_ptr<float>();
  float* a = xhT.data_ptr<float>();
  float* C = dW.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {             // a[m][n] = x[n][m], in tiles
    constexpr int64_t kTile = 32;
    for (int64_t n0 = 0; n0 < N; n0 += kTile) {
      const int64_t n1 = std::min(N, n0 + kTile);
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t n = n0; n < n1; ++n) a[m * N + n] = x[n * M + m];
      }
    }
  });
  constexpr int64_t kCols = 32;                                       // columns of dW per task
  at::parallel_for(0, (G + kCols - 1) / kCols, 1, [&](int64_t j0, int64_t j1) {
    at::NoGradGuard no_grad_here;
    const int64_t c0 = j0 * kCols, c1 = std::min(G, j1 * kCols);
    matmul_rows<float>(M, c1 - c0, N, a, N, d + c0, G, C + c0, G, add);
    release_matmul();
  });
}

}  // namespace
}  // namespace palgan

TORCH_LIBRARY(palgan, m) {
  m.def("lstm_step_forward(Tensor W, Tensor W_x, Tensor(a!) z, Tensor(b!) acts, Tensor bias, Tensor(c!) c, "
        "Tensor(d!) tanh_c, Tensor(e!) xh, Tensor x, int t) -> ()");
  m.def("lstm_step_backward(Tensor W_hT, Tensor(a!) dz, Tensor(b!) dh, Tensor dh_out, Tensor acts, Tensor c, "
        "Tensor tanh_c, Tensor(c!) dc_carry, Tensor(d!) db_parts, int t) -> ()");
  m.def("lstm_weight_grad(Tensor xh, Tensor dz, Tensor(a!) dW, Tensor(b!) xhT, bool add) -> ()");
}

TORCH_LIBRARY_IMPL(palgan, CPU, m) {
  m.impl("lstm_step_forward", &palgan::lstm_step_forward);
  m.impl("lstm_step_backward", &palgan::lstm_step_backward);
  m.impl("lstm_weight_grad", &palgan::lstm_weight_grad);
}
