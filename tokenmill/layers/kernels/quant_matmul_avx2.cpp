// AVX2 tile kernels (see quant_matmul.h for the layout and the math).
#include "quant_matmul.h"

namespace tokenmill::quant {
namespace {

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

template <int BITS, bool HAS_MIN>
TileFn tile_fn(int mt) {
  switch (mt) {
      case 1: return tile_avx2<BITS, 1, HAS_MIN>;
      case 2: return tile_avx2<BITS, 2, HAS_MIN>;
      case 3: return tile_avx2<BITS, 3, HAS_MIN>;
    default: return tile_avx2<BITS, 4, HAS_MIN>;
  }
}

template <int BITS, bool HAS_MIN>
ExactFn exact_fn(int mt) {
  switch (mt) {
      case 1: return exact_tile_avx2<BITS, 1, HAS_MIN>;
      case 2: return exact_tile_avx2<BITS, 2, HAS_MIN>;
      case 3: return exact_tile_avx2<BITS, 3, HAS_MIN>;
    default: return exact_tile_avx2<BITS, 4, HAS_MIN>;
  }
}

}  // namespace

TileFn tile_fn_avx2(int64_t bits, bool has_min, int mt) {
  if (bits == 4) return has_min ? tile_fn<4, true>(mt) : tile_fn<4, false>(mt);
  return has_min ? tile_fn<8, true>(mt) : tile_fn<8, false>(mt);
}

ExactFn exact_fn_avx2(int64_t bits, bool has_min, int mt) {
  if (bits == 4) return has_min ? exact_fn<4, true>(mt) : exact_fn<4, false>(mt);
  return has_min ? exact_fn<8, true>(mt) : exact_fn<8, false>(mt);
}

DequantFn dequant_fn_avx2(int64_t bits, bool has_min, bool bf16) {
  if (bits == 4) {
    if (has_min) return bf16 ? dequant_block_avx2<4, true, true> : dequant_block_avx2<4, true, false>;
    return bf16 ? dequant_block_avx2<4, false, true> : dequant_block_avx2<4, false, false>;
  }
  if (has_min) return bf16 ? dequant_block_avx2<8, true, true> : dequant_block_avx2<8, true, false>;
  return bf16 ? dequant_block_avx2<8, false, true> : dequant_block_avx2<8, false, false>;
}

}  // namespace tokenmill::quant
