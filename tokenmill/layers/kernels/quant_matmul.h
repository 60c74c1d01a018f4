// Weight-only quantized matmul y = x @ W.T for 4-bit and 8-bit group-quantized weights
// (tokenmill.quant.weight.QuantizedWeight), on the CPU.
//
// Decode (small M) is bound by reading the weights, so the kernel streams the packed weights
// exactly once per call and does integer dot products against activations quantized to int8 per
// 32-element block (the scheme of llama.cpp's q4_1 x q8_1 dot):
//
//   y[m,n] = sum_b  s_w[n,g(b)] * d_x[m,b] * dot(q_w[n,b], q_x[m,b])  +  sum_g min_w[n,g] * X[m,g]
//   X[m,g] = sum_{b in g} d_x[m,b] * sum(q_x[m,b])
//
// X uses the *quantized* activations, so a weight expressed as s*q + min (e.g. GGUF Q4_0 with
// min = -8 s) sees the quantization error of W*x only, not of (W - min)*x.
//
// Packed layout (built once at load by quant_matmul.pack, in Python): the N outputs are cut into
// tiles of 16 columns (N padded with zero columns). One tile is one contiguous record:
//
//   codes  [blocks][J][16 columns][4 k]   (J = 4 for 4-bit, 8 for 8-bit; 64 bytes per j)
//   scales [groups][16] float16
//   mins   [groups][16] float16           (only when the weight has mins)
//   padding to 64 bytes
//
// so one 64-byte load feeds one VNNI `dpbusd` that gives 16 columns (one int32 lane each) a 4-term
// dot product against 4 broadcast activation bytes; no horizontal sums are ever needed. For 4-bit,
// byte (j, c, i) holds k = 4j+i of the block in its low nibble and k = 16+4j+i in its high nibble,
// so one load yields two vectors with an AND and a shift. 8-bit codes are stored offset by +128 as
// unsigned bytes (u = q + 128): dpbusd multiplies unsigned by signed, so the weights take the
// unsigned side and the per-block correction is -128 * sum(q_x), exact in int32.
//
// Tiling: a call walks tiles (parallel over tiles with at::parallel_for, torch's own pool) and for
// each tile all rows of x in chunks of up to 8 (AVX-512) / 4 (AVX2) rows held in registers, so the
// tile's weights are read from memory once and from L1 for every further row chunk.
//
// Large M (prefill) is compute-bound: this kernel peaks near one dpbusd per cycle (~120 GMAC/s per
// core here), while torch's bf16 GEMM (oneDNN, AMX on this machine) is several times faster from a
// few tens of rows on. So `dense_linear` dequantizes chunks of columns straight from this layout
// into a [K, chunk] bf16 matrix (the column interleave makes each k-row of 16 columns one vector)
// and calls at::mm. Measured on one core, 576 x 3072, M = 32 / 64 / 512: int8 kernel 450 / 920 /
// 8000 us, dense 590 / 730 / 1700 us; quant_matmul.py switches at dense_min_rows() on AMX
// machines. Without AMX (oneDNN's bf16 GEMM on AVX512-BF16) the int8 kernel is faster at any M.
// An AMX int8 variant (TDPBSUD per 32-element block, rescaled after every block because x's and
// the weight's scales change every block) measured only 1.1-1.25x over this kernel: the per-block
// tile store + rescale serializes. Not kept; a fused AMX-bf16 dequantizing kernel is the next step.
//
// Exact mode (float32 x, `exact_linear`): quantizing x to int8 costs accuracy that float32 callers
// do not accept (the output must be what the dequantized weights give, up to float summation
// order), so for float32 x the same tiles are expanded in registers to float32 codes (vpshufb +
// cvtdq2ps, one vector of 16 columns per k) and FMA'd with x broadcast:
//
//   y[m,n] = sum_g  s_w[n,g] * sum_{k in g} q_w[n,k] * x[m,k]  +  min_w[n,g] * X[m,g],
//   X[m,g] = sum_{k in g} x[m,k]   (float32, once per row, shared by all columns)
//
// Each tile's codes are expanded once for up to 16 (AVX-512) / 4 (AVX2) rows of x, which are
// gathered per row group as [K][rows] so all broadcasts come from one pointer. The expansion costs
// ~2.4 vector ops per k per tile against one FMA per row, so at M = 1 the kernel is ALU-bound at
// about 1.7x the int8 kernel's time (one core); from ~24 rows on the float32 GEMM of the dense
// path is faster (quant_matmul.py: DENSE_MIN_ROWS_FP32), and it too keeps x in float32.
//
// ISA: one build serves every x86-64 machine; the AVX-512 VNNI and AVX2 kernels are compiled with
//
// Files: quant_matmul.h (this overview, the layout and the shared helpers), quant_matmul_avx512.cpp
// and quant_matmul_avx2.cpp (the tile kernels of each ISA, behind function-level target pragmas),
// quant_matmul.cpp (activation quantization, dispatch, parallel walk over tiles, entry points).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tokenmill::quant {

constexpr int64_t kTileN = 16;
constexpr int64_t kBlock = 32;
constexpr int kMaxRows = 16;  // rows of x one tile call takes at most (the exact AVX-512 kernel)

enum Isa : int64_t { kAvx2 = 1, kAvx512Vnni = 2 };

struct Layout {
  const uint8_t* data;
  int64_t n, k, bits, group_size, tile_stride, scales_offset, mins_offset;
  bool has_min;
  int64_t num_tiles() const { return (n + kTileN - 1) / kTileN; }
  int64_t blocks() const { return k / kBlock; }
  int64_t groups() const { return k / group_size; }
  int64_t block_bytes() const { return bits == 4 ? 256 : 512; }
};

// x quantized to int8 per 32-element block along K (symmetric, scale = amax / 127).
struct Activations {
  const int8_t* q;         // [M, K]
  const float* d;          // [M, blocks]
  const int32_t* qsum128;  // [M, blocks]  128 * sum(q) of the block (the 8-bit offset correction)
  const float* gsum;       // [M, groups]  sum over the group's blocks of d * sum(q)
  int64_t m, k, blocks, groups;
};

// float32 x for the exact kernel, input_perm applied, interleaved per row group: the rows
// m0..m0+mt-1 that one tile call takes (see row_group) are stored from x + m0*K as [K][mt], so
// the kernel reads x[m0+r, k] at x[m0*K + k*mt + r]: one pointer, compile-time offsets.
struct FloatActivations {
  const float* x;     // [M * K]
  const float* gsum;  // [M, groups]  sum of the group's x (only filled when the weight has mins)
  int64_t m, k, groups;
};

// Rows of x processed per tile call are taken in chunks of kRowChunk (so that a large M still
// spreads over threads when N has few tiles), each cut into groups of row_group(left) rows.
constexpr int64_t kRowChunk = 64;

// mt_max 16: groups of 16, then 12, then up to 8 (the sizes the exact AVX-512 kernel has)
inline int row_group(int64_t left, int mt_max) {
  if (mt_max <= 8 || left < 12) return int(std::min<int64_t>(std::min(mt_max, 8), left));
  return left >= 16 ? 16 : 12;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// vpshufb control moving byte i of each 32-bit lane to byte 0 (4-bit) or byte 3 (8-bit) of the
// lane, zeroing the rest (index 0x80); indices count bytes within a 128-bit lane, so dword d of
// the lane picks byte 4d + i. The same 16 bytes serve every 128-bit lane (AVX-512 and AVX2).
template <int BITS>
inline uint32_t byte_select(int i, int d) {
  const uint32_t src = uint32_t(4 * d + i);
  return BITS == 4 ? (0x80808000u | src) : (0x00808080u | (src << 24));
}

// A tile's scales and mins sit after its codes, a second stream that the hardware prefetcher
// does not run ahead of: each group's first scale load missed all the way to memory (perf put
// ~55% of the decode kernel's time on those two loads). The kernels call this at the start of a
// tile for the tile's own scales/mins and the next tile's (the same thread takes it next).
inline void prefetch_tile_meta(const Layout& w, int64_t tile) {
  const uint8_t* base = w.data + tile * w.tile_stride;
  for (int64_t offset = w.scales_offset; offset < w.tile_stride; offset += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(base + offset), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(base + w.tile_stride + offset), _MM_HINT_T0);
  }
}

// Codes are read this far ahead of use (a little beyond the next blocks; prefetches past the
// buffer's end are harmless, they never fault).
constexpr int64_t kPrefetchBytes = 4096;

using TileFn = void (*)(const Layout&, const Activations&, int64_t, int64_t, float*);
using ExactFn = void (*)(const Layout&, const FloatActivations&, int64_t, int64_t, float*);
using DequantFn = void (*)(const Layout&, int64_t, int64_t, const int64_t*, void*, int64_t,
                           int64_t);

// The tile kernels of each ISA for a weight's bit width and min, and a row-group size `mt`.
TileFn tile_fn_avx512(int64_t bits, bool has_min, int mt);
TileFn tile_fn_avx2(int64_t bits, bool has_min, int mt);
ExactFn exact_fn_avx512(int64_t bits, bool has_min, int mt);
ExactFn exact_fn_avx2(int64_t bits, bool has_min, int mt);
DequantFn dequant_fn_avx512(int64_t bits, bool has_min, bool bf16);
DequantFn dequant_fn_avx2(int64_t bits, bool has_min, bool bf16);

}  // namespace tokenmill::quant
