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
// 8000 us, dense 590 / 730 / 1700 us; quant_matmul.py switches at DENSE_MIN_ROWS.
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
// function-level target pragmas and chosen at run time (Python passes the ISA it decided on).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

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

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI kernel: one tile (16 columns) x MT rows of x.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

template <int BITS, int MT, bool HAS_MIN>
void tile_avx512(const Layout& w, const Activations& a, int64_t tile, int64_t m0, float* ybuf) {
  // dpbusd has a 5-cycle latency: with few rows, split each row's sum over several independent
  // accumulators so the 8 (4-bit) or 8 (8-bit) dpbusd of a block do not wait on each other.
  constexpr int NACC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const uint8_t* base = w.data + tile * w.tile_stride;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + w.scales_offset);
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(base + w.mins_offset);
  const int64_t bpg = w.group_size / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 y[MT];
  for (int m = 0; m < MT; ++m) y[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups(); ++g) {
    const __m512 s = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kTileN)));
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512);
      __m512i acc[MT][NACC];
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NACC; ++r) acc[m][r] = _mm512_setzero_si512();
      if constexpr (BITS == 4) {
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(wp + 64 * j);
          const __m512i lo = _mm512_and_si512(v, nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int m = 0; m < MT; ++m) {
            const int8_t* xq = a.q + (m0 + m) * a.k + b * kBlock;
            __m512i& acc_lo = acc[m][(2 * j) % NACC];
            acc_lo = _mm512_dpbusd_epi32(acc_lo, lo, _mm512_set1_epi32(load_i32(xq + 4 * j)));
            __m512i& acc_hi = acc[m][(2 * j + 1) % NACC];
            acc_hi = _mm512_dpbusd_epi32(acc_hi, hi, _mm512_set1_epi32(load_i32(xq + 16 + 4 * j)));
          }
        }
      } else {
        for (int j = 0; j < 8; ++j) {
          const __m512i v = _mm512_loadu_si512(wp + 64 * j);
          for (int m = 0; m < MT; ++m) {
            const int8_t* xq = a.q + (m0 + m) * a.k + b * kBlock;
            __m512i& acc_j = acc[m][j % NACC];
            acc_j = _mm512_dpbusd_epi32(acc_j, v, _mm512_set1_epi32(load_i32(xq + 4 * j)));
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        __m512i total = acc[m][0];
        for (int r = 1; r < NACC; ++r) total = _mm512_add_epi32(total, acc[m][r]);
        if constexpr (BITS == 8)
          total = _mm512_sub_epi32(total, _mm512_set1_epi32(a.qsum128[(m0 + m) * a.blocks + b]));
        const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(a.d[(m0 + m) * a.blocks + b]));
        y[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), sd, y[m]);
      }
    }
    if constexpr (HAS_MIN) {
      const __m512 mn = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + g * kTileN)));
      for (int m = 0; m < MT; ++m)
        y[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.gsum[(m0 + m) * a.groups + g]), y[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(ybuf + m * kTileN, y[m]);
}

// ---------------------------------------------------------------------------------------------
// Exact (float32 activation) kernel, AVX-512: one tile (16 columns) x MT rows of x.
//
// No activation quantization: each 64-byte load of codes is expanded in registers to 16 float
// lanes per k (one lane per column), and FMA'd with x[k] broadcast, for all MT rows at once:
//
//   y[m,n] = sum_g  s[n,g] * sum_{k in g} q[n,k] * x[m,k]  +  min[n,g] * X[m,g],  X = sum_{k in g} x
//
// Byte i of every 32-bit lane is moved to the bottom (4-bit: after splitting nibbles) or to the top
// (8-bit) with one vpshufb, then converted with one cvtdq2ps. The 8-bit codes are flipped back to
// signed bytes (u ^ 0x80 = q) first, so the top-byte lane is q * 2^24 exactly and the 2^-24 is
// folded into the scale: the products are those of the dequantized weight, nothing is rounded
// but the float sums.

// vpshufb control moving byte i of each 32-bit lane to byte 0 (4-bit) or byte 3 (8-bit) of the
// lane, zeroing the rest (index 0x80); indices count bytes within a 128-bit lane, so dword d of
// the lane picks byte 4d + i. The same 16 bytes serve every 128-bit lane (AVX-512 and AVX2).
template <int BITS>
inline uint32_t byte_select(int i, int d) {
  const uint32_t src = uint32_t(4 * d + i);
  return BITS == 4 ? (0x80808000u | src) : (0x00808080u | (src << 24));
}

template <int BITS>
inline __m512i byte_select_avx512(int i) {
  return _mm512_set4_epi32(int32_t(byte_select<BITS>(i, 3)), int32_t(byte_select<BITS>(i, 2)),
                           int32_t(byte_select<BITS>(i, 1)), int32_t(byte_select<BITS>(i, 0)));
}

template <int BITS, int MT, bool HAS_MIN>
void exact_tile_avx512(const Layout& w, const FloatActivations& a, int64_t tile, int64_t m0,
                       float* ybuf) {
  // FMA latency is 4 cycles on 2 ports: with few rows, spread each row's sum over accumulators.
  constexpr int NACC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const uint8_t* base = w.data + tile * w.tile_stride;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + w.scales_offset);
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(base + w.mins_offset);
  const int64_t bpg = w.group_size / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i sel0 = byte_select_avx512<BITS>(0), sel1 = byte_select_avx512<BITS>(1);
  const __m512i sel2 = byte_select_avx512<BITS>(2), sel3 = byte_select_avx512<BITS>(3);
  const __m512 code_scale = _mm512_set1_ps(BITS == 4 ? 1.0f : 1.0f / 16777216.0f);
  const float* xg = a.x + m0 * a.k;
  // y lives in ybuf (L1), updated once per group: the registers go to the MT accumulators, so up
  // to 16 rows share one expansion of the codes.
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(ybuf + m * kTileN, _mm512_setzero_ps());
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m512 acc[MT][NACC];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NACC; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512);
      const int64_t k0 = b * kBlock;
      if constexpr (BITS == 4) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(wp + 64 * j);
          const __m512i lo = _mm512_and_si512(v, nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          const __m512i sel[4] = {sel0, sel1, sel2, sel3};
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const __m512 wl = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(lo, sel[i]));
            const __m512 wh = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(hi, sel[i]));
            const int kk = 4 * j + i;
            for (int m = 0; m < MT; ++m) {
              __m512& acc_lo = acc[m][(2 * kk) % NACC];
              acc_lo = _mm512_fmadd_ps(wl, _mm512_set1_ps(xg[(k0 + kk) * MT + m]), acc_lo);
              __m512& acc_hi = acc[m][(2 * kk + 1) % NACC];
              acc_hi = _mm512_fmadd_ps(wh, _mm512_set1_ps(xg[(k0 + 16 + kk) * MT + m]), acc_hi);
            }
          }
        }
      } else {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wp + 64 * j), flip);
          const __m512i sel[4] = {sel0, sel1, sel2, sel3};
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const __m512 wq = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, sel[i]));  // q * 2^24
            const int kk = 4 * j + i;
            for (int m = 0; m < MT; ++m) {
              __m512& acc_k = acc[m][kk % NACC];
              acc_k = _mm512_fmadd_ps(wq, _mm512_set1_ps(xg[(k0 + kk) * MT + m]), acc_k);
            }
          }
        }
      }
    }
    const __m512 s = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(scales + g * kTileN))), code_scale);
    __m512 mn = _mm512_setzero_ps();
    if constexpr (HAS_MIN)
      mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + g * kTileN)));
    for (int m = 0; m < MT; ++m) {
      __m512 total = acc[m][0];
      for (int r = 1; r < NACC; ++r) total = _mm512_add_ps(total, acc[m][r]);
      __m512 y = _mm512_fmadd_ps(total, s, _mm512_loadu_ps(ybuf + m * kTileN));
      if constexpr (HAS_MIN)
        y = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.gsum[(m0 + m) * a.groups + g]), y);
      _mm512_storeu_ps(ybuf + m * kTileN, y);
    }
  }
}

// 16 floats -> one row segment of the dense matrix (bf16 rounded to nearest even).
template <bool BF16>
inline void store_row(void* dst, int64_t offset, __m512 v) {
  if constexpr (BF16) {
    __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + offset), h);
  } else {
    _mm512_storeu_ps(static_cast<float*>(dst) + offset, v);
  }
}

// Dequantize block `b` of one tile into 32 rows of a [K, ld] matrix (rows remapped through perm
// when given). Callers walk blocks outside and tiles inside, so each row is written left to right.
template <int BITS, bool HAS_MIN, bool BF16>
void dequant_block_avx512(const Layout& w, int64_t tile, int64_t b, const int64_t* perm, void* dst,
                          int64_t ld, int64_t col0) {
  const uint8_t* base = w.data + tile * w.tile_stride;
  const int64_t g = b / (w.group_size / kBlock);
  const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(base + w.scales_offset + g * kTileN * 2)));
  __m512 mn = _mm512_setzero_ps();
  if constexpr (HAS_MIN)
    mn = _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(base + w.mins_offset + g * kTileN * 2)));
  const __m512i byte = _mm512_set1_epi32(0xff);
  const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512);
  for (int j = 0; j < (BITS == 4 ? 4 : 8); ++j) {
    const __m512i v = _mm512_loadu_si512(wp + 64 * j);
    for (int i = 0; i < 4; ++i) {
      const __m512i c = _mm512_and_si512(_mm512_srli_epi32(v, 8 * i), byte);
      if constexpr (BITS == 4) {
        const __m512i lo = _mm512_and_si512(c, _mm512_set1_epi32(0x0f));
        const __m512i hi = _mm512_srli_epi32(c, 4);
        const int64_t k_lo = b * kBlock + 4 * j + i, k_hi = k_lo + 16;
        store_row<BF16>(dst, (perm != nullptr ? perm[k_lo] : k_lo) * ld + col0,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, mn));
        store_row<BF16>(dst, (perm != nullptr ? perm[k_hi] : k_hi) * ld + col0,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, mn));
      } else {
        const __m512i q = _mm512_sub_epi32(c, _mm512_set1_epi32(128));
        const int64_t kk = b * kBlock + 4 * j + i;
        store_row<BF16>(dst, (perm != nullptr ? perm[kk] : kk) * ld + col0,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, mn));
      }
    }
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2 kernel: the same tile, processed as two halves of 8 columns (one ymm of int32 lanes).
// No unsigned x signed dot without VNNI: maddubs (u8 x s8 -> saturating int16 pairs) + madd.
// 4-bit codes are <= 15, so two maddubs sums still fit int16. 8-bit codes take the sign trick
// (|q| x sign(q) * x, both within int16 after the pairwise add), so no offset correction.

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <int BITS, int MT, bool HAS_MIN>
void tile_avx2(const Layout& w, const Activations& a, int64_t tile, int64_t m0, float* ybuf) {
  const uint8_t* base = w.data + tile * w.tile_stride;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + w.scales_offset);
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(base + w.mins_offset);
  const int64_t bpg = w.group_size / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i offset = _mm256_set1_epi8(char(0x80));
  for (int half = 0; half < 2; ++half) {
    __m256 y[MT];
    for (int m = 0; m < MT; ++m) y[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.groups(); ++g) {
      const __m256 s = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * kTileN + 8 * half)));
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512) + 32 * half;
        __m256i acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
        if constexpr (BITS == 4) {
          for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j));
            const __m256i lo = _mm256_and_si256(v, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            for (int m = 0; m < MT; ++m) {
              const int8_t* xq = a.q + (m0 + m) * a.k + b * kBlock;
              const __m256i p = _mm256_add_epi16(
                  _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xq + 4 * j))),
                  _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xq + 16 + 4 * j))));
              acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
            }
          }
        } else {
          for (int j = 0; j < 8; ++j) {
            const __m256i q = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j)), offset);
            const __m256i aq = _mm256_abs_epi8(q);
            for (int m = 0; m < MT; ++m) {
              const int8_t* xq = a.q + (m0 + m) * a.k + b * kBlock;
              const __m256i sx = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq + 4 * j)), q);
              acc[m] = _mm256_add_epi32(acc[m],
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones));
            }
          }
        }
        for (int m = 0; m < MT; ++m) {
          const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(a.d[(m0 + m) * a.blocks + b]));
          y[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), sd, y[m]);
        }
      }
      if constexpr (HAS_MIN) {
        const __m256 mn = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g * kTileN + 8 * half)));
        for (int m = 0; m < MT; ++m)
          y[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.gsum[(m0 + m) * a.groups + g]), y[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(ybuf + m * kTileN + 8 * half, y[m]);
  }
}

// Exact (float32 activation) kernel, AVX2: the AVX-512 one on two halves of 8 columns (vpshufb
// works within 128-bit lanes, so the byte selection is the same).
template <int BITS, int MT, bool HAS_MIN>
void exact_tile_avx2(const Layout& w, const FloatActivations& a, int64_t tile, int64_t m0,
                     float* ybuf) {
  constexpr int NACC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const uint8_t* base = w.data + tile * w.tile_stride;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + w.scales_offset);
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(base + w.mins_offset);
  const int64_t bpg = w.group_size / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  __m256i sel[4];
  for (int i = 0; i < 4; ++i) {
    const __m128i lane = _mm_setr_epi32(
        int32_t(byte_select<BITS>(i, 0)), int32_t(byte_select<BITS>(i, 1)),
        int32_t(byte_select<BITS>(i, 2)), int32_t(byte_select<BITS>(i, 3)));
    sel[i] = _mm256_broadcastsi128_si256(lane);
  }
  const __m256 code_scale = _mm256_set1_ps(BITS == 4 ? 1.0f : 1.0f / 16777216.0f);
  const float* xg = a.x + m0 * a.k;
  for (int half = 0; half < 2; ++half) {
    __m256 y[MT];
    for (int m = 0; m < MT; ++m) y[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.groups(); ++g) {
      __m256 acc[MT][NACC];
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NACC; ++r) acc[m][r] = _mm256_setzero_ps();
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512) + 32 * half;
        const int64_t k0 = b * kBlock;
        if constexpr (BITS == 4) {
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j));
            const __m256i lo = _mm256_and_si256(v, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {
              const __m256 wl = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, sel[i]));
              const __m256 wh = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, sel[i]));
              const int kk = 4 * j + i;
              for (int m = 0; m < MT; ++m) {
                __m256& acc_lo = acc[m][(2 * kk) % NACC];
                acc_lo = _mm256_fmadd_ps(wl, _mm256_broadcast_ss(xg + (k0 + kk) * MT + m), acc_lo);
                __m256& acc_hi = acc[m][(2 * kk + 1) % NACC];
                acc_hi = _mm256_fmadd_ps(wh, _mm256_broadcast_ss(xg + (k0 + 16 + kk) * MT + m), acc_hi);
              }
            }
          }
        } else {
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) {
            const __m256i v = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * j)), flip);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {
              const __m256 wq = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, sel[i]));  // q * 2^24
              const int kk = 4 * j + i;
              for (int m = 0; m < MT; ++m) {
                __m256& acc_k = acc[m][kk % NACC];
                acc_k = _mm256_fmadd_ps(wq, _mm256_broadcast_ss(xg + (k0 + kk) * MT + m), acc_k);
              }
            }
          }
        }
      }
      const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(scales + g * kTileN + 8 * half))), code_scale);
      for (int m = 0; m < MT; ++m) {
        __m256 total = acc[m][0];
        for (int r = 1; r < NACC; ++r) total = _mm256_add_ps(total, acc[m][r]);
        y[m] = _mm256_fmadd_ps(total, s, y[m]);
      }
      if constexpr (HAS_MIN) {
        const __m256 mn = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g * kTileN + 8 * half)));
        for (int m = 0; m < MT; ++m)
          y[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.gsum[(m0 + m) * a.groups + g]), y[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(ybuf + m * kTileN + 8 * half, y[m]);
  }
}

// Scalar dequantization of one block of one tile (the compiler vectorizes what it can); only
// used by the dense path on machines without AVX-512, next to a much slower fp32 GEMM.
template <int BITS, bool HAS_MIN, bool BF16>
void dequant_block_avx2(const Layout& w, int64_t tile, int64_t b, const int64_t* perm, void* dst,
                        int64_t ld, int64_t col0) {
  const uint8_t* base = w.data + tile * w.tile_stride;
  const int64_t g = b / (w.group_size / kBlock);
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(base + w.scales_offset) + g * kTileN;
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(base + w.mins_offset) + g * kTileN;
  float s[kTileN], mn[kTileN], vals[kTileN];
  _mm256_storeu_ps(s, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales))));
  _mm256_storeu_ps(s + 8,
                   _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8))));
  for (int c = 0; c < kTileN; ++c) mn[c] = 0.0f;
  if constexpr (HAS_MIN) {
    _mm256_storeu_ps(mn, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins))));
    _mm256_storeu_ps(
        mn + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + 8))));
  }
  const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512);
  for (int64_t kk = 0; kk < kBlock; ++kk) {
    int code_index, shift = 0;
    if constexpr (BITS == 4) {
      const int64_t half = kk / 16, r = kk % 16;
      code_index = int((r / 4) * 64 + (r % 4));
      shift = int(4 * half);
    } else {
      code_index = int((kk / 4) * 64 + (kk % 4));
    }
    for (int c = 0; c < kTileN; ++c) {
      const int raw = wp[code_index + 4 * c];
      const int q = BITS == 4 ? (raw >> shift) & 0x0f : raw - 128;
      vals[c] = float(q) * s[c] + mn[c];
    }
    const int64_t k = b * kBlock + kk;
    const int64_t row = perm != nullptr ? perm[k] : k;
    if constexpr (BF16) {
      uint16_t* out = static_cast<uint16_t*>(dst) + row * ld + col0;
      for (int c = 0; c < kTileN; ++c) out[c] = float_to_bf16(vals[c]);
    } else {
      std::memcpy(static_cast<float*>(dst) + row * ld + col0, vals, sizeof(vals));
    }
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// Dispatch

using TileFn = void (*)(const Layout&, const Activations&, int64_t, int64_t, float*);

template <int BITS, bool HAS_MIN>
TileFn pick_tile(int64_t isa, int mt) {
  if (isa == kAvx512Vnni) {
    switch (mt) {
      case 1: return tile_avx512<BITS, 1, HAS_MIN>;
      case 2: return tile_avx512<BITS, 2, HAS_MIN>;
      case 3: return tile_avx512<BITS, 3, HAS_MIN>;
      case 4: return tile_avx512<BITS, 4, HAS_MIN>;
      case 5: return tile_avx512<BITS, 5, HAS_MIN>;
      case 6: return tile_avx512<BITS, 6, HAS_MIN>;
      case 7: return tile_avx512<BITS, 7, HAS_MIN>;
      default: return tile_avx512<BITS, 8, HAS_MIN>;
    }
  }
  switch (mt) {
    case 1: return tile_avx2<BITS, 1, HAS_MIN>;
    case 2: return tile_avx2<BITS, 2, HAS_MIN>;
    case 3: return tile_avx2<BITS, 3, HAS_MIN>;
    default: return tile_avx2<BITS, 4, HAS_MIN>;
  }
}

TileFn pick_tile(const Layout& w, int64_t isa, int mt) {
  if (w.bits == 4) return w.has_min ? pick_tile<4, true>(isa, mt) : pick_tile<4, false>(isa, mt);
  return w.has_min ? pick_tile<8, true>(isa, mt) : pick_tile<8, false>(isa, mt);
}

using ExactFn = void (*)(const Layout&, const FloatActivations&, int64_t, int64_t, float*);

template <int BITS, bool HAS_MIN>
ExactFn pick_exact(int64_t isa, int mt) {
  if (isa == kAvx512Vnni) {
    switch (mt) {
      case 1: return exact_tile_avx512<BITS, 1, HAS_MIN>;
      case 2: return exact_tile_avx512<BITS, 2, HAS_MIN>;
      case 3: return exact_tile_avx512<BITS, 3, HAS_MIN>;
      case 4: return exact_tile_avx512<BITS, 4, HAS_MIN>;
      case 5: return exact_tile_avx512<BITS, 5, HAS_MIN>;
      case 6: return exact_tile_avx512<BITS, 6, HAS_MIN>;
      case 7: return exact_tile_avx512<BITS, 7, HAS_MIN>;
      case 8: return exact_tile_avx512<BITS, 8, HAS_MIN>;
      case 12: return exact_tile_avx512<BITS, 12, HAS_MIN>;
      default: return exact_tile_avx512<BITS, 16, HAS_MIN>;
    }
  }
  switch (mt) {
    case 1: return exact_tile_avx2<BITS, 1, HAS_MIN>;
    case 2: return exact_tile_avx2<BITS, 2, HAS_MIN>;
    case 3: return exact_tile_avx2<BITS, 3, HAS_MIN>;
    default: return exact_tile_avx2<BITS, 4, HAS_MIN>;
  }
}

ExactFn pick_exact(const Layout& w, int64_t isa, int mt) {
  if (w.bits == 4) return w.has_min ? pick_exact<4, true>(isa, mt) : pick_exact<4, false>(isa, mt);
  return w.has_min ? pick_exact<8, true>(isa, mt) : pick_exact<8, false>(isa, mt);
}

using DequantFn = void (*)(const Layout&, int64_t, int64_t, const int64_t*, void*, int64_t,
                           int64_t);

template <int BITS, bool HAS_MIN>
DequantFn pick_dequant(int64_t isa, bool bf16) {
  if (isa == kAvx512Vnni)
    return bf16 ? dequant_block_avx512<BITS, HAS_MIN, true>
                : dequant_block_avx512<BITS, HAS_MIN, false>;
  return bf16 ? dequant_block_avx2<BITS, HAS_MIN, true> : dequant_block_avx2<BITS, HAS_MIN, false>;
}

DequantFn pick_dequant(const Layout& w, int64_t isa, bool bf16) {
  if (w.bits == 4)
    return w.has_min ? pick_dequant<4, true>(isa, bf16) : pick_dequant<4, false>(isa, bf16);
  return w.has_min ? pick_dequant<8, true>(isa, bf16) : pick_dequant<8, false>(isa, bf16);
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

// The GIL is released while a kernel runs: the server's event loop (detokenizing, writing
// streams) shares the process with the engine thread and must not wait for a whole step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>(), "x @ W.T through int8 activations (decode path)");
  m.def("exact_linear", &exact_linear, py::call_guard<py::gil_scoped_release>(), "x @ W.T for float32 x, no activation quantization");
  m.def("dense_linear", &dense_linear, py::call_guard<py::gil_scoped_release>(), "x @ W.T through chunked dequantization + at::mm");
  m.def("dequantize_columns", &dequantize_columns, py::call_guard<py::gil_scoped_release>(), "packed columns -> dense [K, cols]");
  m.def("cpu_features", &cpu_features, "the ISA extensions this CPU (and OS) supports");
}
