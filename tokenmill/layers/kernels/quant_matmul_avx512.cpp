// AVX-512 VNNI tile kernels (see quant_matmul.h for the layout and the math).
#include "quant_matmul.h"

namespace tokenmill::quant {
namespace {

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
  prefetch_tile_meta(w, tile);
  __m512 y[MT];
  for (int m = 0; m < MT; ++m) y[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups(); ++g) {
    const __m512 s = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kTileN)));
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* wp = base + b * (BITS == 4 ? 256 : 512);
      for (int line = 0; line < (BITS == 4 ? 4 : 8); ++line)
        _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchBytes + 64 * line), _MM_HINT_T0);
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

template <int BITS, bool HAS_MIN>
TileFn tile_fn(int mt) {
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

template <int BITS, bool HAS_MIN>
ExactFn exact_fn(int mt) {
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

}  // namespace

TileFn tile_fn_avx512(int64_t bits, bool has_min, int mt) {
  if (bits == 4) return has_min ? tile_fn<4, true>(mt) : tile_fn<4, false>(mt);
  return has_min ? tile_fn<8, true>(mt) : tile_fn<8, false>(mt);
}

ExactFn exact_fn_avx512(int64_t bits, bool has_min, int mt) {
  if (bits == 4) return has_min ? exact_fn<4, true>(mt) : exact_fn<4, false>(mt);
  return has_min ? exact_fn<8, true>(mt) : exact_fn<8, false>(mt);
}

DequantFn dequant_fn_avx512(int64_t bits, bool has_min, bool bf16) {
  if (bits == 4) {
    if (has_min) return bf16 ? dequant_block_avx512<4, true, true> : dequant_block_avx512<4, true, false>;
    return bf16 ? dequant_block_avx512<4, false, true> : dequant_block_avx512<4, false, false>;
  }
  if (has_min) return bf16 ? dequant_block_avx512<8, true, true> : dequant_block_avx512<8, true, false>;
  return bf16 ? dequant_block_avx512<8, false, true> : dequant_block_avx512<8, false, false>;
}

}  // namespace tokenmill::quant
