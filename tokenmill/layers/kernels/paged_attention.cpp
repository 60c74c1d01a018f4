// Decode attention straight from the paged KV cache: one query token per sequence, K/V read in
// place through the block table (no gathered copy).
//
// Work is split into items of (sequence, kv head, range of positions) so that even one sequence
// keeps every thread busy (split-K, "flash decoding"): a single stream has only num_kv_heads
// (3 for SmolLM2) heads, fewer than or not a multiple of the threads. Each item attends its range
// for all the query heads of its GQA group (they share every K/V row read) and leaves a partial
// result (max score m, sum of exp l, unnormalized sum of exp * V); the partials of a (sequence,
// head) are merged afterwards by rescaling with exp(m_i - max m). With one range per head the
// item normalizes and writes its output directly.
//
// Inner loops: with AVX-512 (compiled with -march=native, so decided per machine at build time)
// K/V rows are widened to float32 16 lanes at a time and FMA'd against the query held in
// registers; the exp is a vectorized Cephes-style polynomial. Elsewhere plain loops that the
// compiler vectorizes as it can. The PyTorch path (attention.py) is the reference both are
// tested against.
//
// The new token's K/V can be written into its cache slot by the same call (decode-only steps),
// which saves two index_copy_ dispatches per layer.
#include "native.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxGroup = 16;       // query heads per kv head handled in registers/arrays
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMinSplitLen = 64;    // fewer positions than this per item do not pay a merge
constexpr int64_t kChunk = 256;         // positions scored at a time (the scores stay in L1)
// The running max starts here, not at -inf: the build uses -ffast-math (finite math only).
constexpr float kNoScore = -1e30f;

inline float to_float(float v) { return v; }
inline float to_float(double v) { return float(v); }
inline float to_float(at::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline float to_float(at::Half v) { return float(v); }

inline void from_float(float v, float* out) { *out = v; }
inline void from_float(float v, double* out) { *out = v; }
inline void from_float(float v, at::BFloat16* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out->x = v != v ? uint16_t{0x7FC0} : uint16_t(rounded);
}
inline void from_float(float v, at::Half* out) { *out = at::Half(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const double* p) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_loadu_pd(p))),
                            _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8)), 1);
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp(x) for x <= 0 (scores minus their max): range reduction by ln 2, degree-5 polynomial,
// exponent by scalef; about 2 ulp, -inf and very negative x give 0.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

struct Shape {
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks, group;
  int64_t token_stride, block_stride;  // in elements, for [num_blocks, block_size, kv_heads, d]
};

// Partial result of one item for its group's query heads.
struct Partial {
  float* max;  // [group]
  float* sum;  // [group]
  float* acc;  // [group, head_dim]
};

// Attend positions [p0, p1) of one sequence's kv head `kvh` for the query heads of its group.
// q: [group, head_dim] float32, already scaled.
// Generic path: any group size and head dim (the specialized one below covers the common ones).
template <typename T>
void attend_range_generic(const float* q, const T* /*q_raw*/, float /*scale*/, const T* k_cache,
                          const T* v_cache, const int64_t* table, int64_t kvh, int64_t p0,
                          int64_t p1, const Shape& s, Partial out) {
  const int64_t G = s.group, D = s.head_dim;
  alignas(64) float scores[kMaxGroup * kChunk];
  for (int64_t g = 0; g < G; ++g) {
    out.max[g] = kNoScore;
    out.sum[g] = 0.0f;
  }
  std::fill(out.acc, out.acc + G * D, 0.0f);
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p1 - c0);
    // scores[g][i] = q_g . k_(c0+i)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = c0 + i;
      const T* kp = k_cache + table[pos / s.block_size] * s.block_stride +
                    (pos % s.block_size) * s.token_stride + kvh * D;
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        for (int64_t g = 0; g < G; ++g) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16)
            acc = _mm512_fmadd_ps(load16(kp + d), _mm512_loadu_ps(q + g * D + d), acc);
          scores[g * kChunk + i] = _mm512_reduce_add_ps(acc);
        }
        continue;
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * to_float(kp[d]);
        scores[g * kChunk + i] = dot;
      }
    }
    // online softmax across chunks: rescale what was accumulated when the max grows
    for (int64_t g = 0; g < G; ++g) {
      float* row = scores + g * kChunk;
      float peak = out.max[g];
      for (int64_t i = 0; i < n; ++i) peak = std::max(peak, row[i]);
      const float rescale = std::exp(out.max[g] - peak);  // 0 on the first chunk
      float total = 0.0f;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 vpeak = _mm512_set1_ps(peak);
      __m512 vtotal = _mm512_setzero_ps();
      for (; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + i), vpeak));
        _mm512_storeu_ps(row + i, e);
        vtotal = _mm512_add_ps(vtotal, e);
      }
      total = _mm512_reduce_add_ps(vtotal);
#endif
      for (; i < n; ++i) {
        row[i] = std::exp(row[i] - peak);
        total += row[i];
      }
      out.sum[g] = out.sum[g] * rescale + total;
      out.max[g] = peak;
      if (rescale != 1.0f)
        for (int64_t d = 0; d < D; ++d) out.acc[g * D + d] *= rescale;
    }
    // acc[g] += sum_i p[g][i] * v_(c0+i)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = c0 + i;
      const T* vp = v_cache + table[pos / s.block_size] * s.block_stride +
                    (pos % s.block_size) * s.token_stride + kvh * D;
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 v = load16(vp + d);
          for (int64_t g = 0; g < G; ++g) {
            float* a = out.acc + g * D + d;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * kChunk + i]), v,
                                                _mm512_loadu_ps(a)));
          }
        }
        continue;
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        const float p = scores[g * kChunk + i];
        float* a = out.acc + g * D;
        for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(vp[d]);
      }
    }
  }
}

#if defined(__AVX512F__)
// Calls fn(i, row) for positions p0 .. p1-1 (i = pos - p0) of one kv head, walking the block table
// a block at a time (no division per position).
template <typename T, typename Fn>
inline void for_rows(const T* cache, const int64_t* table, int64_t kvh, int64_t p0, int64_t p1,
                     const Shape& s, const Fn& fn) {
  for (int64_t pos = p0; pos < p1;) {
    const int64_t offset = pos % s.block_size;
    const int64_t count = std::min(s.block_size - offset, p1 - pos);
    const T* row = cache + table[pos / s.block_size] * s.block_stride + offset * s.token_stride +
                   kvh * s.head_dim;
    for (int64_t j = 0; j < count; ++j, row += s.token_stride) fn(pos - p0 + j, row);
    pos += count;
  }
}

// Lane j of the result is the sum of the 16 lanes of v[j]: 45 shuffles and adds for 16 sums,
// where 16 separate horizontal reductions take about three times as many.
inline __m512 reduce16(const __m512 v[16]) {
  __m512 pairs[8];  // per 128-bit lane k: [a(k0+k2), b(k0+k2), a(k1+k3), b(k1+k3)]
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 quads[4];  // per 128-bit lane k: the sums of lane k of four vectors
  for (int i = 0; i < 4; ++i)
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  __m512 halves[2];  // [v0-3 (L0+L1), v0-3 (L2+L3), v4-7 (L0+L1), v4-7 (L2+L3)] and v8-15
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

#if defined(__AVX512BF16__)
// Scores of positions c0 .. c0+n-1 for a bfloat16 cache with the CPU's bf16 dot product
// (vdpbf16ps: 32 products per instruction, K read as stored, no widening), 16 positions at a time
// reduced together. The query is the model's own bf16 (exact); the scale is applied to the fp32
// score, so the products are the same as widening both to fp32.
template <int G, int NV>
void score_chunk_bf16(const at::BFloat16* q_raw, float scale, const at::BFloat16* k_cache,
                      const int64_t* table, int64_t kvh, int64_t c0, int64_t n, const Shape& s,
                      float (*scores)[kChunk]) {
  constexpr int NB = NV / 2;  // 32 bf16 values per register
  alignas(64) static const uint16_t zero_row[NV * 16] = {};
  const at::BFloat16* rows[kChunk + 16];
  for_rows(k_cache, table, kvh, c0, c0 + n, s,
           [&](int64_t i, const at::BFloat16* kp) { rows[i] = kp; });
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t i = n; i < padded; ++i) rows[i] = reinterpret_cast<const at::BFloat16*>(zero_row);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    __m512bh qb[NB];
    for (int v = 0; v < NB; ++v)
      qb[v] = (__m512bh)_mm512_loadu_si512(q_raw + (g * NV * 16 + v * 32));
    for (int64_t i0 = 0; i0 < padded; i0 += 16) {
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        const at::BFloat16* kp = rows[i0 + j];
        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(kp), qb[0]);
        for (int v = 1; v < NB; ++v)
          dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(kp + v * 32), qb[v]);
        dots[j] = dot;
      }
      const __m512 sums = _mm512_mul_ps(reduce16(dots), vscale);
      if (i0 + 16 <= n) {
        _mm512_storeu_ps(&scores[g][i0], sums);
      } else {
        _mm512_mask_storeu_ps(&scores[g][i0], __mmask16((1u << (n - i0)) - 1), sums);
      }
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// acc[g] += sum_i p[g][i] * v_(c0+i) for a bfloat16 cache, two positions per vdpbf16ps: the two
// V rows are interleaved 16 bits at a time (v_i[d], v_i+1[d]) and multiplied by the pair
// (p_i, p_i+1) rounded to bf16, as torch's bf16 attention rounds its probabilities. The
// accumulators hold d in the interleaved order (store_interleaved puts it back).
template <int G, int NV>
void accumulate_values_bf16(const at::BFloat16* v_cache, const int64_t* table, int64_t kvh,
                            int64_t c0, int64_t n, const Shape& s, float (*scores)[kChunk],
                            __m512 (*acc)[NV]) {
  constexpr int NB = NV / 2;
  alignas(64) static const uint16_t zero_row[NV * 16] = {};
  alignas(64) uint16_t probs[G][kChunk + 16];
  for (int g = 0; g < G; ++g) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 valid = i + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, &scores[g][i]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&probs[g][i]), (__m256i)packed);
    }
    probs[g][n] = 0;  // the partner of an odd last position
  }
  const at::BFloat16* rows[kChunk + 2];
  for_rows(v_cache, table, kvh, c0, c0 + n, s,
           [&](int64_t i, const at::BFloat16* vp) { rows[i] = vp; });
  rows[n] = reinterpret_cast<const at::BFloat16*>(zero_row);
  for (int64_t i = 0; i < n; i += 2) {
    for (int h = 0; h < NB; ++h) {
      const __m512i a = _mm512_loadu_si512(rows[i] + h * 32);
      const __m512i b = _mm512_loadu_si512(rows[i + 1] + h * 32);
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
      const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int g = 0; g < G; ++g) {
        uint32_t pair;
        std::memcpy(&pair, &probs[g][i], 4);
        const __m512bh p = (__m512bh)_mm512_set1_epi32(int32_t(pair));
        acc[g][2 * h] = _mm512_dpbf16_ps(acc[g][2 * h], lo, p);
        acc[g][2 * h + 1] = _mm512_dpbf16_ps(acc[g][2 * h + 1], hi, p);
      }
    }
  }
}

// The accumulators of accumulate_values_bf16 in head-dim order: for each 32 values h, lane j of
// the "lo" vector holds d = 32h + 8(j/4) + j%4 and the "hi" one d + 4.
template <int NV>
void store_interleaved(const __m512* acc, float* out) {
  alignas(64) float lanes[2][16];
  for (int h = 0; h < NV / 2; ++h) {
    _mm512_store_ps(lanes[0], acc[2 * h]);
    _mm512_store_ps(lanes[1], acc[2 * h + 1]);
    for (int j = 0; j < 16; ++j) {
      const int d = 32 * h + 8 * (j / 4) + j % 4;
      out[d] = lanes[0][j];
      out[d + 4] = lanes[1][j];
    }
  }
}
#endif

// The common shapes, G query heads per kv head and NV * 16 = head_dim: the queries and the
// accumulators live in registers, scores in an L1 buffer.
template <typename T, int G, int NV>
void attend_range_fixed(const float* q, const T* q_raw, float scale, const T* k_cache,
                        const T* v_cache, const int64_t* table, int64_t kvh, int64_t p0,
                        int64_t p1, const Shape& s, Partial out) {
  alignas(64) float scores[G][kChunk];
  __m512 qv[G][NV], acc[G][NV];
  float peak[G], total[G];
  for (int g = 0; g < G; ++g) {
    peak[g] = kNoScore;
    total[g] = 0.0f;
    for (int v = 0; v < NV; ++v) {
      qv[g][v] = _mm512_loadu_ps(q + g * NV * 16 + v * 16);
      acc[g][v] = _mm512_setzero_ps();
    }
  }
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p1 - c0);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      score_chunk_bf16<G, NV>(q_raw, scale, k_cache, table, kvh, c0, n, s, scores);
    } else
#endif
    {
      for_rows(k_cache, table, kvh, c0, c0 + n, s, [&](int64_t i, const T* kp) {
        __m512 k[NV];
        for (int v = 0; v < NV; ++v) k[v] = load16(kp + v * 16);
        for (int g = 0; g < G; ++g) {
          __m512 dot = _mm512_mul_ps(k[0], qv[g][0]);
          for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(k[v], qv[g][v], dot);
          scores[g][i] = _mm512_reduce_add_ps(dot);
        }
      });
    }
    for (int g = 0; g < G; ++g) {
      float* row = scores[g];
      float top = peak[g];
      for (int64_t i = 0; i < n; ++i) top = std::max(top, row[i]);
      const float rescale = std::exp(peak[g] - top);  // 0 on the first chunk
      const __m512 vtop = _mm512_set1_ps(top);
      __m512 vsum = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + i), vtop));
        _mm512_storeu_ps(row + i, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      if (i < n) {
        const __mmask16 tail = __mmask16((1u << (n - i)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + i), vtop));
        _mm512_mask_storeu_ps(row + i, tail, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(tail, e));
      }
      total[g] = total[g] * rescale + _mm512_reduce_add_ps(vsum);
      peak[g] = top;
      if (rescale != 1.0f)
        for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_mul_ps(acc[g][v], _mm512_set1_ps(rescale));
    }
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      accumulate_values_bf16<G, NV>(v_cache, table, kvh, c0, n, s, scores, acc);
      continue;
    }
#endif
    for_rows(v_cache, table, kvh, c0, c0 + n, s, [&](int64_t i, const T* vp) {
      __m512 val[NV];
      for (int v = 0; v < NV; ++v) val[v] = load16(vp + v * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g][i]);
        for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, val[v], acc[g][v]);
      }
    });
  }
  for (int g = 0; g < G; ++g) {
    out.max[g] = peak[g];
    out.sum[g] = total[g];
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      store_interleaved<NV>(acc[g], out.acc + g * NV * 16);
      continue;
    }
#endif
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out.acc + (g * NV + v) * 16, acc[g][v]);
  }
}
#endif

template <typename T>
using AttendFn = void (*)(const float*, const T*, float, const T*, const T*, const int64_t*,
                          int64_t, int64_t, int64_t, const Shape&, Partial);

template <typename T, int NV>
AttendFn<T> pick_group(int64_t group) {
#if defined(__AVX512F__)
  switch (group) {
    case 1: return &attend_range_fixed<T, 1, NV>;
    case 2: return &attend_range_fixed<T, 2, NV>;
    case 3: return &attend_range_fixed<T, 3, NV>;
    case 4: return &attend_range_fixed<T, 4, NV>;
    case 5: return &attend_range_fixed<T, 5, NV>;
    case 6: return &attend_range_fixed<T, 6, NV>;
    case 7: return &attend_range_fixed<T, 7, NV>;
    case 8: return &attend_range_fixed<T, 8, NV>;
    default: break;
  }
#endif
  return &attend_range_generic<T>;
}

// The specialized kernel for float32/bfloat16 caches with head dim 64 or 128, else the generic one.
template <typename T>
AttendFn<T> pick_attend(const Shape& s) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    if (s.head_dim == 64) return pick_group<T, 4>(s.group);
    if (s.head_dim == 128) return pick_group<T, 8>(s.group);
  }
  return &attend_range_generic<T>;
}

template <typename T>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_table,
                   const int64_t* seq_lens, T* out, int64_t num_seqs, const Shape& s, float scale,
                   int64_t sliding_window) {
  const int64_t G = s.group, D = s.head_dim, KVH = s.num_kv_heads;
  // Splits per (sequence, kv head): enough items for every thread (4 each, for balance), but
  // never fewer than kMinSplitLen positions per split.
  int64_t longest = 0;
  for (int64_t b = 0; b < num_seqs; ++b) longest = std::max(longest, seq_lens[b]);
  if (sliding_window > 0) longest = std::min(longest, sliding_window);
  const int64_t wanted = (4 * at::get_num_threads() + num_seqs * KVH - 1) / (num_seqs * KVH);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, longest / kMinSplitLen));
  const int64_t record = G * (D + 2);  // max, sum, acc per query head
  const AttendFn<T> attend = pick_attend<T>(s);
  std::vector<float> partials(splits > 1 ? num_seqs * KVH * splits * record : 0);

  auto query_of = [&](int64_t seq, int64_t kvh, float* qf) {
    for (int64_t g = 0; g < G; ++g) {
      const T* qh = q + (seq * s.num_heads + kvh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qh[d]) * scale;
    }
  };
  auto write_out = [&](int64_t seq, int64_t kvh, int64_t g, const float* acc, float inv) {
    T* o = out + (seq * s.num_heads + kvh * G + g) * D;
    for (int64_t d = 0; d < D; ++d) from_float(acc[d] * inv, o + d);
  };

  at::parallel_for(0, num_seqs * KVH * splits, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float qf[kMaxGroup * kMaxHeadDim];
    alignas(64) float local[kMaxGroup * (kMaxHeadDim + 2)];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, kvh = (item / splits) % KVH;
      const int64_t seq = item / (splits * KVH);
      const int64_t len = seq_lens[seq];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t per = (len - first + splits - 1) / splits;
      const int64_t p0 = std::min(len, first + split * per), p1 = std::min(len, p0 + per);
      float* rec = splits > 1 ? partials.data() + item * record : local;
      Partial part{rec, rec + G, rec + 2 * G};
      query_of(seq, kvh, qf);
      attend(qf, q + (seq * s.num_heads + kvh * G) * D, scale, k_cache, v_cache,
             block_table + seq * s.max_blocks, kvh, p0, p1, s, part);
      if (splits == 1)
        for (int64_t g = 0; g < G; ++g) write_out(seq, kvh, g, part.acc + g * D, 1.0f / part.sum[g]);
    }
  });
  if (splits == 1) return;
  // merge the splits of each (sequence, kv head)
  at::parallel_for(0, num_seqs * KVH, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kMaxHeadDim];
    for (int64_t pair = begin; pair < end; ++pair) {
      const float* first = partials.data() + pair * splits * record;
      for (int64_t g = 0; g < G; ++g) {
        float peak = kNoScore;
        for (int64_t i = 0; i < splits; ++i) peak = std::max(peak, first[i * record + g]);
        std::fill(acc, acc + D, 0.0f);
        float total = 0.0f;
        for (int64_t i = 0; i < splits; ++i) {
          const float* rec = first + i * record;
          if (rec[G + g] == 0.0f) continue;  // an empty range (short sequence)
          const float w = std::exp(rec[g] - peak);
          total += w * rec[G + g];
          const float* part = rec + 2 * G + g * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * part[d];
        }
        write_out(pair / KVH, pair % KVH, g, acc, 1.0f / total);
      }
    }
  });
}

// Write each sequence's new K/V row ([B, KVH, D]) into its cache slot.
template <typename T>
void write_new_kv(const T* key, const T* value, const int64_t* slots, T* k_cache, T* v_cache,
                  int64_t num_seqs, int64_t row_elems) {
  for (int64_t b = 0; b < num_seqs; ++b) {
    std::memcpy(k_cache + slots[b] * row_elems, key + b * row_elems, row_elems * sizeof(T));
    std::memcpy(v_cache + slots[b] * row_elems, value + b * row_elems, row_elems * sizeof(T));
  }
}

}  // namespace

// q [B, H, D]; k_cache / v_cache [num_blocks, block_size, KVH, D]; block_table [B, max_blocks];
// seq_lens [B] (tokens to attend, the new one included) -> [B, H, D] in q's dtype.
// With key/value [B, KVH, D] and slots [B], first writes the new tokens' K/V into the cache.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens,
                                     double scale, int64_t sliding_window,
                                     const std::optional<torch::Tensor>& key,
                                     const std::optional<torch::Tensor>& value,
                                     const std::optional<torch::Tensor>& slots) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, H, D], the caches 4-D");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention needs contiguous caches");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must have one dtype");
  const auto qc = q.contiguous();
  auto table = block_table.to(torch::kLong).contiguous();
  auto lens = seq_lens.to(torch::kLong).contiguous();
  Shape s{};
  s.num_heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_kv_heads = k_cache.size(2);
  s.block_size = k_cache.size(1);
  s.max_blocks = table.size(1);
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "heads must be a multiple of kv heads");
  s.group = s.num_heads / s.num_kv_heads;
  TORCH_CHECK(s.group <= kMaxGroup && s.head_dim <= kMaxHeadDim,
              "paged_decode_attention: at most ", kMaxGroup, " query heads per kv head and head "
              "dim ", kMaxHeadDim);
  s.token_stride = s.num_kv_heads * s.head_dim;
  s.block_stride = s.block_size * s.token_stride;
  const int64_t num_seqs = q.size(0);
  auto out = torch::empty(q.sizes(), q.options());
  if (num_seqs == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    if (key.has_value()) {
      TORCH_CHECK(value.has_value() && slots.has_value(), "key, value and slots go together");
      const auto kc = key->contiguous(), vc = value->contiguous();
      const auto sl = slots->to(torch::kLong).contiguous();
      TORCH_CHECK(kc.numel() == num_seqs * s.token_stride && vc.numel() == kc.numel() &&
                      sl.numel() == num_seqs && kc.scalar_type() == q.scalar_type() &&
                      vc.scalar_type() == q.scalar_type(),
                  "key/value must be [B, KVH, D] in q's dtype and slots [B]");
      write_new_kv(kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), sl.data_ptr<int64_t>(),
                   k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), num_seqs,
                   s.token_stride);
    }
    decode_kernel<scalar_t>(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                            v_cache.data_ptr<scalar_t>(), table.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), num_seqs, s,
                            float(scale), sliding_window);
  });
  return out;
}
