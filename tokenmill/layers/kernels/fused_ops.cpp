// Fused element-wise ops of a decoder layer: RMSNorm (with the residual add), rotary embedding in
// place, SiLU-and-mul. Each replaces 3-12 small torch ops whose per-op dispatch (a few µs) is most
// of their cost at decode, where a row is one token.
//
// Math is float32 inside, but every result is rounded to the storage dtype where the PyTorch
// reference path (norm.py, rotary.py, activation.py) rounds, so both paths agree in bfloat16 up to
// summation order and exp's last bit. Rows run on the calling thread until there are enough of them
// to pay for a parallel region (a few µs, far more when the cores are shared).
#include "native.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Elements of work per parallel chunk: below this a row batch runs inline.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

// Conversions the vectorizer can see through: bfloat16 by bit operations (round to nearest even,
// NaN kept quiet, as c10 does, but without its out-of-line isnan), other types by c10's casts.
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

template <>
inline float to_float<at::BFloat16>(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <>
inline at::BFloat16 from_float<at::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return at::BFloat16(out, at::BFloat16::from_bits());
}

// Round to T and back, like a tensor op that stores its result in T (a no-op for float).
template <typename T>
inline float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  // 16 partial sums: the compiler vectorizes this (no -ffast-math needed for reassociation).
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) { const float v = to_float(x[i + j]); acc[j] += v * v; }
  for (; i < n; ++i) { const float v = to_float(x[i]); acc[0] += v * v; }
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

// out = W * round_T(x * rsqrt(mean(x^2) + eps)); O is the promoted type of T and W.
template <typename T, typename W, typename O>
void norm_row(const T* x, const W* w, O* out, int64_t n, float eps) {
  const float inv = 1.0f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_float<O>(to_float(w[i]) * round_to<T>(to_float(x[i]) * inv));
}

template <typename T, typename W, typename O>
void rms_norm_rows(const T* x, int64_t x_stride, T* residual, int64_t res_stride, const T* add,
                   int64_t add_stride, const W* w, O* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * x_stride;
      if (residual != nullptr) {  // residual += add, then normalize the sum
        T* res = residual + r * res_stride;
        const T* a = add + r * add_stride;
        for (int64_t i = 0; i < n; ++i)
          res[i] = from_float<T>(to_float(res[i]) + to_float(a[i]));
        src = res;
      }
      norm_row(src, w, out + r * n, n, eps);
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1, name, " needs a contiguous last dimension");
}

// A 2-D view [rows, n] of t (last dim contiguous), and its row stride.
std::pair<torch::Tensor, int64_t> as_rows(const torch::Tensor& t) {
  auto rows = t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
  return {rows, rows.stride(0)};
}

torch::Tensor norm_impl(const torch::Tensor& x, const torch::Tensor* residual,
                        const torch::Tensor& weight, double eps) {
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              "weight must be a contiguous [", n, "] vector");
  const bool same_dtype = weight.scalar_type() == x.scalar_type();
  TORCH_CHECK(same_dtype || weight.scalar_type() == at::kFloat,
              "weight must have the input's dtype or float32");
  auto [x2, x_stride] = as_rows(x);
  torch::Tensor r2;
  int64_t r_stride = 0;
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x in shape and dtype");
    std::tie(r2, r_stride) = as_rows(*residual);
    TORCH_CHECK(r2.data_ptr() == residual->data_ptr() && (r2.size(0) <= 1 || r_stride >= n),
                "residual must be updatable in place");
  }
  auto out = torch::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  const float eps32 = static_cast<float>(eps);
  const int64_t rows = x2.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    T* res = residual != nullptr ? r2.data_ptr<T>() : nullptr;
    const T* src = residual != nullptr ? r2.data_ptr<T>() : x2.data_ptr<T>();
    const int64_t src_stride = residual != nullptr ? r_stride : x_stride;
    if (same_dtype) {
      rms_norm_rows<T, T, T>(src, src_stride, res, r_stride, x2.data_ptr<T>(), x_stride,
                             weight.data_ptr<T>(), out.data_ptr<T>(), rows, n, eps32);
    } else {
      rms_norm_rows<T, float, float>(src, src_stride, res, r_stride, x2.data_ptr<T>(), x_stride,
                                     weight.data_ptr<float>(), out.data_ptr<float>(), rows, n,
                                     eps32);
    }
  });
  return out;
}

// exp for the vectorizer: Cephes' expf (range reduction by ln 2, degree-5 polynomial, exponent
// by integer add), branch-free so GCC turns a loop of it into SIMD; within ~2 ulp of std::exp.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // round to nearest by the 1.5 * 2^23 trick: no libm call, so the loop vectorizes
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
void silu_and_mul_rows(const T* x, int64_t x_stride, T* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, grain_rows(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * x_stride;
      const T* up = gate + d;
      T* o = out + r * d;
      // in float chunks: each loop is simple enough to vectorize (mixed bf16 math is not)
      float g[256], u[256];
      for (int64_t start = 0; start < d; start += 256) {
        const int64_t m = std::min<int64_t>(256, d - start);
        for (int64_t i = 0; i < m; ++i) { g[i] = to_float(gate[start + i]); u[i] = to_float(up[start + i]); }
        for (int64_t i = 0; i < m; ++i) g[i] = round_to<T>(g[i] / (1.0f + exp_approx(-g[i])));
        for (int64_t i = 0; i < m; ++i) o[start + i] = from_float<T>(g[i] * u[i]);
      }
    }
  });
}

// x[i] = x[i] cos + rotate_half(x)[i] sin, rounding each product like the reference does. The
// head is widened to float first: simple loops that vectorize, unlike mixed bf16 arithmetic.
template <typename T>
inline void rotate_head(T* x, const float* cos, const float* sin, float* buf, int64_t half) {
  for (int64_t i = 0; i < 2 * half; ++i) buf[i] = to_float(x[i]);
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = buf[i], x2 = buf[i + half];
    x[i] = from_float<T>(round_to<T>(x1 * cos[i]) + round_to<T>(-x2 * sin[i]));
    x[i + half] = from_float<T>(round_to<T>(x2 * cos[i + half]) + round_to<T>(x1 * sin[i + half]));
  }
}

}  // namespace

// x [..., n] -> weight * norm(x), dtype promote(x, weight).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  RECORD_FUNCTION("tokenmill::rms_norm", std::vector<c10::IValue>());
  if (x.dim() >= 1 && x.stride(-1) != 1) x = x.contiguous();
  check_rows(x, "x");
  return norm_impl(x, nullptr, weight, eps);
}

// residual += x (in place), then weight * norm(residual): vLLM's fused_add_rms_norm.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  RECORD_FUNCTION("tokenmill::add_rms_norm", std::vector<c10::IValue>());
  check_rows(x, "x");
  check_rows(residual, "residual");
  return norm_impl(x, &residual, weight, eps);
}

// gate_up [..., 2d] -> silu(gate) * up [..., d].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  RECORD_FUNCTION("tokenmill::silu_and_mul", std::vector<c10::IValue>());
  if (gate_up.dim() >= 1 && gate_up.stride(-1) != 1) gate_up = gate_up.contiguous();
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_and_mul needs an even last dimension");
  const int64_t d = gate_up.size(-1) / 2;
  auto [x2, stride] = as_rows(gate_up);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = d;
  auto out = torch::empty(shape, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_and_mul_rows<scalar_t>(x2.data_ptr<scalar_t>(), stride, out.data_ptr<scalar_t>(),
                                x2.size(0), d);
  });
  return out;
}

// query [T, heads, d], key [T, kv_heads, d] (last dim contiguous, any other strides) rotated in
// place by each token's position; cos/sin [max_positions, d] in the query's dtype.
void rotary_embedding(torch::Tensor positions, torch::Tensor query, torch::Tensor key,
                      torch::Tensor cos, torch::Tensor sin) {
  RECORD_FUNCTION("tokenmill::rotary_embedding", std::vector<c10::IValue>());
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.stride(2) == 1 && key.stride(2) == 1,
              "query and key must be [tokens, heads, head_dim] with a contiguous head_dim");
  const int64_t tokens = query.size(0), d = query.size(2);
  TORCH_CHECK(key.size(0) == tokens && key.size(2) == d && d % 2 == 0,
              "query and key disagree in tokens or head_dim (which must be even)");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && cos.scalar_type() == query.scalar_type()
              && sin.scalar_type() == query.scalar_type(), "query, key, cos, sin need one dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == d &&
              sin.sizes() == cos.sizes(), "cos and sin must be contiguous [positions, head_dim]");
  auto pos = positions.to(torch::kLong).contiguous();
  TORCH_CHECK(pos.numel() == tokens, "one position per token");
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t max_positions = cos.size(0);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < max_positions, "position ", p[t], " is outside the rotary "
                "table (", max_positions, " positions)");
  const int64_t heads = query.size(1), kv_heads = key.size(1), half = d / 2;
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t k_tok = key.stride(0), k_head = key.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary", [&] {
    using T = scalar_t;
    T* q = query.data_ptr<T>();
    T* k = key.data_ptr<T>();
    const T* c = cos.data_ptr<T>();
    const T* s = sin.data_ptr<T>();
    at::parallel_for(0, tokens, grain_rows((heads + kv_heads) * d), [&](int64_t begin, int64_t end) {
      std::vector<float> table(3 * d);  // this token's cos and sin, widened once for all heads
      float* ct = table.data();
      float* st = ct + d;
      float* buf = st + d;
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          ct[i] = to_float(c[p[t] * d + i]);
          st[i] = to_float(s[p[t] * d + i]);
        }
        for (int64_t h = 0; h < heads; ++h) rotate_head(q + t * q_tok + h * q_head, ct, st, buf, half);
        for (int64_t h = 0; h < kv_heads; ++h)
          rotate_head(k + t * k_tok + h * k_head, ct, st, buf, half);
      }
    });
  });
}
