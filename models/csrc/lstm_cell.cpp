// The pointwise halves of one LSTM step, forward and backward, as two fused CPU kernels.
//
// The fused LSTM layer (models/lstm.py) runs its time loop in TorchScript: per step one matmul
// and one call of a kernel below. Written as TorchScript ops, the pointwise block is 8-17 ops per
// step, each a pass over memory and an interpreter dispatch; here it is one pass. Registered as
// torch.ops.palgan.* so that TorchScript can call them; float32 and float64, contiguous rows.
//
// Activations (float): sigma(x) = 1 / (1 + e^-x) and tanh(x) = 2 sigma(2x) - 1, with e^x from
// the Cephes polynomial (max. relative error about 2e-7); written as plain loops that the
// compiler vectorises (AVX-512, AVX2 or NEON, whichever the build flags allow). NaN propagates.
// float64 uses std::exp, so that gradcheck sees exact derivatives.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace palgan {
namespace {

inline float exp_approx(float x) {
  x = 88.0f < x ? 88.0f : x;     // clamp so that 2^n stays a normal float; the order keeps NaN
  x = -87.0f > x ? -87.0f : x;
  // e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2; 1.5 * 2^23 rounds and leaves n in the low bits
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
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

// One step, one batch row. z: (4H) pre-activations [g|i|f|o] without the bias, overwritten with
// the activations; c_prev, c, tanh_c, h: (H).
template <typename T>
void forward_row(T* __restrict z, const T* __restrict bias, const T* __restrict c_prev, T* __restrict c,
                 T* __restrict tanh_c, T* __restrict h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) z[j] = tanh_(z[j] + bias[j]);                   // g  (1)
  for (int64_t j = H; j < 4 * H; ++j) z[j] = sigmoid(z[j] + bias[j]);             // i, f, o  (2-4)
  const T* g = z; const T* i = z + H; const T* f = z + 2 * H; const T* o = z + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const T cj = f[j] * c_prev[j] + i[j] * g[j];                                   // (5)
    const T tc = tanh_(cj);
    c[j] = cj;
    tanh_c[j] = tc;
    h[j] = o[j] * tc;                                                               // (6)
  }
}

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

// Batch rows are split over torch's intra-op threads, at least this many per task.
constexpr int64_t kRowsPerTask = 16;

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), name, ": dtype or device differs");
}

// Step t of the forward loop, on the layer's whole buffers (so that the TorchScript loop makes one
// call per step and no slices). x (L, B, D): the input (any strides, contiguous rows).
// acts (L, B, 4H): acts[t] holds the step's pre-activations and receives the activations;
// c (L+1, B, H): c[t] is read, c[t+1] written; tanh_c (L, B, H); row t+1 of xh (L+1, B, D+H)
// receives the next matmul's input [x_{t+1} | h_t] (x_{t+1} only when t+1 < L).
// Without a backward to feed, the buffers may be rings instead: acts and tanh_c with one row,
// c and xh with two; step t then uses row t modulo their length, and everything stays in cache.
void lstm_cell_forward(const at::Tensor& acts, const at::Tensor& bias, const at::Tensor& c, const at::Tensor& tanh_c,
                       const at::Tensor& xh, const at::Tensor& x, int64_t t) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x: expected (L, B, D) with contiguous rows, got ", x.sizes());
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "acts: expected (L, B, 4H), got ", acts.sizes());
  const int64_t L = x.size(0), B = x.size(1), D = x.size(2), H = acts.size(2) / 4, DH = D + H;
  TORCH_CHECK(0 <= t && t < L, "step ", t, " out of range for L = ", L);
  TORCH_CHECK(x.scalar_type() == acts.scalar_type() && x.device().is_cpu(), "x: dtype or device differs");
  const int64_t A = acts.size(0), T = tanh_c.size(0), C = c.size(0), R = xh.size(0);
  TORCH_CHECK((A == L && T == L && C == L + 1 && R == L + 1) || (A == 1 && T == 1 && C == 2 && R == 2),
              "buffers: expected all steps (L, L, L+1, L+1 rows) or rings (1, 1, 2, 2 rows)");
  check_shape(acts, {A, B, 4 * H}, acts, "acts");
  check_shape(bias, {4 * H}, acts, "bias");
  check_shape(c, {C, B, H}, acts, "c");
  check_shape(tanh_c, {T, B, H}, acts, "tanh_c");
  check_shape(xh, {R, B, DH}, acts, "xh");
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_cell_forward", [&] {
    scalar_t* a = acts.data_ptr<scalar_t>() + (t % A) * B * 4 * H;
    const scalar_t* b_ptr = bias.data_ptr<scalar_t>();
    const scalar_t* c_prev = c.data_ptr<scalar_t>() + (t % C) * B * H;
    scalar_t* c_next = c.data_ptr<scalar_t>() + ((t + 1) % C) * B * H;
    scalar_t* tc = tanh_c.data_ptr<scalar_t>() + (t % T) * B * H;
    scalar_t* next_row = xh.data_ptr<scalar_t>() + ((t + 1) % R) * B * DH;
    const scalar_t* x_next = t + 1 < L ? x.data_ptr<scalar_t>() + (t + 1) * x.stride(0) : nullptr;
    const int64_t x_row = x.stride(1);
    at::parallel_for(0, B, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xh_r = next_row + r * DH;
        forward_row<scalar_t>(a + r * 4 * H, b_ptr, c_prev + r * H, c_next + r * H, tc + r * H, xh_r + D, H);
        if (x_next != nullptr) std::memcpy(xh_r, x_next + r * x_row, D * sizeof(scalar_t));
      }
    });
  });
}

// Step t of the backward loop: dh (B, H) is the gradient reaching h_t, dc_carry (B, H) the one
// reaching c_t through c_{t+1} (zero at t = L-1), updated in place. Writes the gate gradients of
// step t into row t % Z of dz (Z, B, 4H), a ring of the last Z steps (Z = L: all of them), and
// adds them into db_parts (P, 4H): the batch rows are cut into P fixed chunks, one partial sum
// each, so that the bias gradient is the same for any number of threads.
void lstm_cell_backward(const at::Tensor& acts, const at::Tensor& c, const at::Tensor& tanh_c, const at::Tensor& dh,
                        const at::Tensor& dc_carry, const at::Tensor& dz, const at::Tensor& db_parts, int64_t t) {
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "acts: expected (L, B, 4H), got ", acts.sizes());
  const int64_t L = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  TORCH_CHECK(0 <= t && t < L, "step ", t, " out of range for L = ", L);
  check_shape(acts, {L, B, 4 * H}, acts, "acts");
  check_shape(c, {L + 1, B, H}, acts, "c");
  check_shape(tanh_c, {L, B, H}, acts, "tanh_c");
  check_shape(dh, {B, H}, acts, "dh");
  check_shape(dc_carry, {B, H}, acts, "dc_carry");
  TORCH_CHECK(dz.dim() == 3 && dz.size(0) >= 1 && dz.size(0) <= L, "dz: expected (Z, B, 4H) with 1 <= Z <= L");
  check_shape(dz, {dz.size(0), B, 4 * H}, acts, "dz");
  TORCH_CHECK(db_parts.dim() == 2 && db_parts.size(0) >= 1, "db_parts: expected (P, 4H)");
  const int64_t P = db_parts.size(0), rows_per_part = (B + P - 1) / P;
  check_shape(db_parts, {P, 4 * H}, acts, "db_parts");
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_cell_backward", [&] {
    const scalar_t* a = acts.data_ptr<scalar_t>() + t * B * 4 * H;
    const scalar_t* c_prev = c.data_ptr<scalar_t>() + t * B * H;
    const scalar_t* tc = tanh_c.data_ptr<scalar_t>() + t * B * H;
    const scalar_t* d_h = dh.data_ptr<scalar_t>();
    scalar_t* carry = dc_carry.data_ptr<scalar_t>();
    scalar_t* out = dz.data_ptr<scalar_t>() + (t % dz.size(0)) * B * 4 * H;
    at::parallel_for(0, P, 1, [&](int64_t p_begin, int64_t p_end) {
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

}  // namespace
}  // namespace palgan

TORCH_LIBRARY(palgan, m) {
  m.def("lstm_cell_forward(Tensor(a!) acts, Tensor bias, Tensor(b!) c, Tensor(c!) tanh_c, Tensor(d!) xh, "
        "Tensor x, int t) -> ()");
  m.def("lstm_cell_backward(Tensor(a!) acts, Tensor c, Tensor tanh_c, Tensor dh, Tensor(b!) dc_carry, "
        "Tensor(c!) dz, Tensor(d!) db_parts, int t) -> ()");
}

TORCH_LIBRARY_IMPL(palgan, CPU, m) {
  m.impl("lstm_cell_forward", &palgan::lstm_cell_forward);
  m.impl("lstm_cell_backward", &palgan::lstm_cell_backward);
}
