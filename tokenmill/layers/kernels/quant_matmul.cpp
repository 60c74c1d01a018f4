// Weight-only quantized matmul entry points: activation quantization, dispatch to the tile
// kernels of the ISA Python chose, the parallel walk over tiles (see quant_matmul.h).
#include "native.h"
#include "quant_matmul.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace tokenmill::quant {
namespace {

// ---------------------------------------------------------------------------------------------
// Activation quantization (plain C++: it touches M*K elements against the kernel's N*K).

template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t stride_m, int64_t stride_k, const int64_t* perm,
                   int64_t m_begin, int64_t m_end, const Activations& a, int64_t group_size) {
  std::vector<float> row(a.k);
  const int64_t bpg = group_size / kBlock;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const scalar_t* xr = x + m * stride_m;
    if (perm != nullptr) {
      for (int64_t k = 0; k < a.k; ++k) row[k] = float(xr[perm[k] * stride_k]);
    } else {
      for (int64_t k = 0; k < a.k; ++k) row[k] = float(xr[k * stride_k]);
    }
    int8_t* q = const_cast<int8_t*>(a.q) + m * a.k;
    float* d = const_cast<float*>(a.d) + m * a.blocks;
    int32_t* qs = const_cast<int32_t*>(a.qsum128) + m * a.blocks;
    float* gs = const_cast<float*>(a.gsum) + m * a.groups;
    for (int64_t g = 0; g < a.groups; ++g) gs[g] = 0.0f;
    for (int64_t b = 0; b < a.blocks; ++b) {
      const float* v = row.data() + b * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float scale = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int32_t code = int32_t(std::nearbyint(v[i] * inv));
        const int32_t clamped = std::min(127, std::max(-127, code));
        q[b * kBlock + i] = int8_t(clamped);
        sum += clamped;
      }
      d[b] = scale;
      qs[b] = 128 * sum;
      gs[b / bpg] += scale * float(sum);
    }
  }
}

TileFn pick_tile(const Layout& w, int64_t isa, int mt) {
  return isa == kAvx512Vnni ? tile_fn_avx512(w.bits, w.has_min, mt)
                            : tile_fn_avx2(w.bits, w.has_min, mt);
}

ExactFn pick_exact(const Layout& w, int64_t isa, int mt) {
  return isa == kAvx512Vnni ? exact_fn_avx512(w.bits, w.has_min, mt)
                            : exact_fn_avx2(w.bits, w.has_min, mt);
}

DequantFn pick_dequant(const Layout& w, int64_t isa, bool bf16) {
  return isa == kAvx512Vnni ? dequant_fn_avx512(w.bits, w.has_min, bf16)
                            : dequant_fn_avx2(w.bits, w.has_min, bf16);
}

Layout make_layout(const torch::Tensor& data, int64_t n, int64_t k, int64_t bits,
                   int64_t group_size, bool has_min, int64_t tile_stride, int64_t scales_offset,
                   int64_t mins_offset) {
  TORCH_CHECK(data.is_contiguous() && data.scalar_type() == torch::kUInt8, "packed data");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(k % group_size == 0 && group_size % kBlock == 0, "bad group size");
  Layout w{data.data_ptr<uint8_t>(), n, k, bits, group_size, tile_stride, scales_offset,
           mins_offset, has_min};
  TORCH_CHECK(data.numel() == w.num_tiles() * tile_stride, "packed data has the wrong size");
  return w;
}

// Rows of float results (row stride ystride) -> out[m0.., n0..n0+cols) with bias, in out's dtype.
void write_rows(const float* ybuf, int64_t ystride, int64_t rows, int64_t m0, int64_t n0,
                int64_t cols, const float* bias, void* out, bool out_bf16, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* y = ybuf + r * ystride;
    if (out_bf16) {
      uint16_t* o = static_cast<uint16_t*>(out) + (m0 + r) * ldo + n0;
      for (int64_t c = 0; c < cols; ++c) o[c] = float_to_bf16(y[c] + (bias ? bias[n0 + c] : 0.f));
    } else {
      float* o = static_cast<float*>(out) + (m0 + r) * ldo + n0;
      for (int64_t c = 0; c < cols; ++c) o[c] = y[c] + (bias ? bias[n0 + c] : 0.f);
    }
  }
}

const int64_t* perm_ptr(const std::optional<torch::Tensor>& perm, int64_t k) {
  if (!perm.has_value()) return nullptr;
  TORCH_CHECK(perm->scalar_type() == torch::kLong && perm->is_contiguous() && perm->numel() == k,
              "input_perm must be a contiguous int64 tensor of K entries");
  return perm->data_ptr<int64_t>();
}

// Walk tiles x chunks of rows in parallel, calling run(tile, m0, rows, ybuf) for each row group
// (row_group), then writing the tile's columns of those rows. A thread's range covers consecutive
// chunks of one tile, so the tile stays in cache.
template <typename Run>
void for_tiles(const Layout& w, int64_t m, int mt_max, const float* bias, void* out,
               bool out_bf16, const Run& run) {
  const int64_t row_chunk = kRowChunk;
  const int64_t num_chunks = (m + row_chunk - 1) / row_chunk;
  const int64_t items = w.num_tiles() * num_chunks;
  const int64_t bytes_per_item = w.tile_stride * std::min<int64_t>(m, row_chunk);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / bytes_per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float ybuf[kMaxRows * kTileN];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / num_chunks, chunk = item % num_chunks;
      const int64_t n0 = tile * kTileN, cols = std::min(kTileN, w.n - n0);
      const int64_t m_end = std::min(m, (chunk + 1) * row_chunk);
      for (int64_t m0 = chunk * row_chunk; m0 < m_end;) {
        const int mt = row_group(m_end - m0, mt_max);
        run(tile, m0, mt, ybuf);
        write_rows(ybuf, kTileN, mt, m0, n0, cols, bias, out, out_bf16, w.n);
        m0 += mt;
      }
    }
  });
}

}  // namespace
}  // namespace tokenmill::quant

using namespace tokenmill::quant;

// x [M, K] float32/bfloat16 (any strides) -> [M, N] in x's dtype, through int8 activations
// (quant_matmul.py uses it for bfloat16 x only; float32 x goes to exact_linear).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                          int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                          int64_t scales_offset, int64_t mins_offset,
                          const std::optional<torch::Tensor>& perm,
                          const std::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512Vnni, "unknown isa");
  const Layout w = make_layout(data, n, k, bits, group_size, has_min, tile_stride, scales_offset,
                               mins_offset);
  const int64_t m = x.size(0);
  const bool out_bf16 = x.scalar_type() == torch::kBFloat16;
  auto out = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 tensor of N entries");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t* perm_data = perm_ptr(perm, k);

  // one allocation for the quantized activations: codes, then block scales, 128*sums, group sums
  const int64_t codes_bytes = (m * k + 63) / 64 * 64;
  auto scratch = torch::empty({codes_bytes + 4 * m * (2 * w.blocks() + w.groups())},
                              x.options().dtype(torch::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  float* xd = reinterpret_cast<float*>(base + codes_bytes);
  int32_t* xs = reinterpret_cast<int32_t*>(xd + m * w.blocks());
  float* xg = reinterpret_cast<float*>(xs + m * w.blocks());
  const Activations a{reinterpret_cast<int8_t*>(base), xd, xs, xg, m, k, w.blocks(), w.groups()};
  const int64_t sm = x.stride(0), sk = x.stride(1);
  at::parallel_for(0, m, std::max<int64_t>(1, 8192 / k), [&](int64_t begin, int64_t end) {
    if (out_bf16) {
      quantize_rows(x.data_ptr<at::BFloat16>(), sm, sk, perm_data, begin, end,
                    a, group_size);
    } else {
      quantize_rows(x.data_ptr<float>(), sm, sk, perm_data, begin, end, a, group_size);
    }
  });

  const int mt_max = isa == kAvx512Vnni ? 8 : 4;
  for_tiles(w, m, mt_max, bias_ptr, out.data_ptr(), out_bf16,
            [&](int64_t tile, int64_t m0, int mt, float* ybuf) {
              pick_tile(w, isa, mt)(w, a, tile, m0, ybuf);
            });
  return out;
}

// x [M, K] float32 (any strides) -> [M, N] float32, exactly (no activation quantization).
torch::Tensor exact_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                           int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                           int64_t scales_offset, int64_t mins_offset,
                           const std::optional<torch::Tensor>& perm,
                           const std::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "x must be float32");
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512Vnni, "unknown isa");
  const Layout w = make_layout(data, n, k, bits, group_size, has_min, tile_stride, scales_offset,
                               mins_offset);
  const int64_t m = x.size(0);
  auto out = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be a contiguous float32 tensor of N entries");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t* perm_data = perm_ptr(perm, k);
  const float* xs = x.data_ptr<float>();
  const int64_t sm = x.stride(0), sk = x.stride(1);
  const int mt_max = isa == kAvx512Vnni ? kMaxRows : 4;
  // x gathered into the interleaved row groups (input_perm applied), then the per-group sums of
  // x when the weight has mins.
  const int64_t groups = w.groups();
  auto scratch = torch::empty({m * k + (has_min ? m * groups : 0)}, x.options());
  float* xp = scratch.data_ptr<float>();
  float* gsum = xp + m * k;
  const int64_t num_chunks = (m + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t m_end = std::min(m, (chunk + 1) * kRowChunk);
      for (int64_t m0 = chunk * kRowChunk; m0 < m_end;) {
        const int mt = row_group(m_end - m0, mt_max);
        float* dst = xp + m0 * k;
        for (int r = 0; r < mt; ++r) {
          const float* src = xs + (m0 + r) * sm;
          if (perm_data != nullptr) {
            for (int64_t c = 0; c < k; ++c) dst[c * mt + r] = src[perm_data[c] * sk];
          } else {
            for (int64_t c = 0; c < k; ++c) dst[c * mt + r] = src[c * sk];
          }
          if (has_min) {
            for (int64_t g = 0; g < groups; ++g) {
              float sum = 0.0f;
              for (int64_t c = g * group_size; c < (g + 1) * group_size; ++c)
                sum += dst[c * mt + r];
              gsum[(m0 + r) * groups + g] = sum;
            }
          }
        }
        m0 += mt;
      }
    }
  });
  const FloatActivations a{xp, gsum, m, k, groups};
  for_tiles(w, m, mt_max, bias_ptr, out.data_ptr(), false,
            [&](int64_t tile, int64_t m0, int mt, float* ybuf) {
              pick_exact(w, isa, mt)(w, a, tile, m0, ybuf);
            });
  return out;
}

namespace {

// Dequantize whole tiles [tile_begin, tile_end) into dense [K, ld] (columns from 0), rows through
// perm.
void dequantize_into(const Layout& w, const int64_t* perm, int64_t tile_begin, int64_t tile_end,
                     void* dst, int64_t ld, bool bf16, int64_t isa) {
  const DequantFn fn = pick_dequant(w, isa, bf16);
  at::parallel_for(tile_begin, tile_end, 1, [&](int64_t begin, int64_t end) {
    // blocks outside, tiles inside: rows fill left to right instead of each tile's 32-byte strip
    // touching all K rows
    for (int64_t b = 0; b < w.blocks(); ++b)
      for (int64_t tile = begin; tile < end; ++tile)
        fn(w, tile, b, perm, dst, ld, (tile - tile_begin) * kTileN);
  });
}

}  // namespace

// Dequantize columns [n_begin, n_end) (multiples of 16, n_end may be the padded N) into a
// [K, n_end - n_begin] matrix in `dtype` (float32 or bfloat16), rows placed through perm.
torch::Tensor dequantize_columns(const torch::Tensor& data, int64_t n, int64_t k, int64_t bits,
                                 int64_t group_size, bool has_min, int64_t tile_stride,
                                 int64_t scales_offset, int64_t mins_offset,
                                 const std::optional<torch::Tensor>& perm, int64_t n_begin,
                                 int64_t n_end, torch::ScalarType dtype, int64_t isa) {
  const Layout w = make_layout(data, n, k, bits, group_size, has_min, tile_stride, scales_offset,
                               mins_offset);
  TORCH_CHECK(n_begin % kTileN == 0 && n_end % kTileN == 0 && n_begin <= n_end &&
                  n_end <= w.num_tiles() * kTileN, "column range must be whole tiles");
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dtype float32 or bfloat16");
  auto dense = torch::empty({k, n_end - n_begin}, data.options().dtype(dtype));
  dequantize_into(w, perm_ptr(perm, k), n_begin / kTileN, n_end / kTileN, dense.data_ptr(),
                  n_end - n_begin, dtype == torch::kBFloat16, isa);
  return dense;
}

// Compute-bound path: y = x @ dequant(W).T. One parallel region for the whole call: each thread
// takes chunks of columns, dequantizes a chunk into its own scratch (kept across calls: a fresh
// multi-MB allocation costs more in page faults than the dequantization itself; small enough to
// stay in L2) and multiplies it with at::mm, which runs single-threaded inside the region. One
// region instead of a dequantize + GEMM pair per chunk matters on a loaded 2-core machine, where
// every fork/join can wait a whole scheduler slice for a descheduled thread.
torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                           int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                           int64_t scales_offset, int64_t mins_offset,
                           const std::optional<torch::Tensor>& perm,
                           const std::optional<torch::Tensor>& bias, torch::ScalarType dtype,
                           int64_t chunk_cols, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "]");
  TORCH_CHECK(chunk_cols > 0 && chunk_cols % kTileN == 0, "chunk_cols must be a multiple of 16");
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dtype float32 or bfloat16");
  const Layout w = make_layout(data, n, k, bits, group_size, has_min, tile_stride, scales_offset,
                               mins_offset);
  const int64_t* perm_data = perm_ptr(perm, k);
  const int64_t m = x.size(0);
  const auto xc = x.to(dtype);
  auto out = torch::empty({m, n}, x.options().dtype(dtype));
  const DequantFn fn = pick_dequant(w, isa, dtype == torch::kBFloat16);
  // at least two chunks per thread, so that both threads get work on narrow layers too
  const int64_t per_thread = (w.num_tiles() + 2 * at::get_num_threads() - 1) /
                             (2 * at::get_num_threads());
  const int64_t tiles_per_chunk = std::max<int64_t>(1, std::min(chunk_cols / kTileN, per_thread));
  const int64_t num_chunks = (w.num_tiles() + tiles_per_chunk - 1) / tiles_per_chunk;
  const int64_t elt = dtype == torch::kBFloat16 ? 2 : 4;
  const int64_t need = (k * tiles_per_chunk * kTileN * elt + 63) / 64 * 64;
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's inference mode; `out` may be an inference tensor.
    c10::InferenceMode inference;
    thread_local std::unique_ptr<uint8_t, decltype(&std::free)> scratch(nullptr, &std::free);
    thread_local int64_t capacity = 0;
    if (capacity < need) {
      scratch.reset(static_cast<uint8_t*>(std::aligned_alloc(64, need)));
      TORCH_CHECK(scratch != nullptr, "out of memory for the dequantization scratch");
      capacity = need;
    }
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t t0 = chunk * tiles_per_chunk;
      const int64_t t1 = std::min(w.num_tiles(), t0 + tiles_per_chunk);
      const int64_t width = (t1 - t0) * kTileN, cols = std::min(n - t0 * kTileN, width);
      auto dense = torch::from_blob(scratch.get(), {k, width}, data.options().dtype(dtype));
      // blocks outside, tiles inside: rows fill left to right instead of each tile's 32-byte
      // strip touching all K rows
      for (int64_t b = 0; b < w.blocks(); ++b)
        for (int64_t tile = t0; tile < t1; ++tile)
          fn(w, tile, b, perm_data, dense.data_ptr(), width, (tile - t0) * kTileN);
      auto part = out.narrow(1, t0 * kTileN, cols);
      at::mm_out(part, xc, dense.narrow(1, 0, cols));
    }
  });
  if (bias.has_value()) out.add_(bias->to(dtype));
  return out.to(x.scalar_type());
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> found;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) found.push_back("avx2");
  if (__builtin_cpu_supports("fma")) found.push_back("fma");
  if (__builtin_cpu_supports("f16c")) found.push_back("f16c");
  if (__builtin_cpu_supports("avx512f")) found.push_back("avx512f");
  if (__builtin_cpu_supports("avx512bw")) found.push_back("avx512bw");
  if (__builtin_cpu_supports("avx512vl")) found.push_back("avx512vl");
  if (__builtin_cpu_supports("avx512dq")) found.push_back("avx512dq");
  if (__builtin_cpu_supports("avx512vnni")) found.push_back("avx512vnni");
  if (__builtin_cpu_supports("avx512bf16")) found.push_back("avx512bf16");
  if (__builtin_cpu_supports("amx-bf16")) found.push_back("amx-bf16");
  return found;
}
