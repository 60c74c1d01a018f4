// Decode attention straight from the paged KV cache: one query token per sequence, K/V read in
// place through the block table (no gathered copy), one pass over K and one over V.
// Parallel over (sequence, kv head); the query heads of a GQA group share each K/V read.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

template <typename scalar_t>
static void decode_kernel(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                          const int64_t* block_table, const int64_t* seq_lens, float* out,
                          int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                          int64_t head_dim, int64_t block_size, int64_t max_blocks, double scale,
                          int64_t sliding_window) {
  const int64_t group = num_heads / num_kv_heads;
  // cache strides for [num_blocks, block_size, kv_heads, head_dim]
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(group * head_dim), acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t n = len - first;
      scores.assign(group * n, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qh = q + (seq * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = float(qh[d]) * float(scale);
      }
      const int64_t* table = block_table + seq * max_blocks;
      for (int64_t pos = first; pos < len; ++pos) {
        const scalar_t* kp = k_cache + table[pos / block_size] * block_stride +
                             (pos % block_size) * token_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * float(kp[d]);
          scores[g * n + (pos - first)] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * n;
        float peak = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) peak = std::max(peak, row[i]);
        float total = 0.0f;
        for (int64_t i = 0; i < n; ++i) { row[i] = std::exp(row[i] - peak); total += row[i]; }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < n; ++i) row[i] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t pos = first; pos < len; ++pos) {
        const scalar_t* vp = v_cache + table[pos / block_size] * block_stride +
                             (pos % block_size) * token_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + (pos - first)];
          float* a = acc.data() + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * float(vp[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out + (seq * num_heads + kvh * group + g) * head_dim;
        std::copy(acc.begin() + g * head_dim, acc.begin() + (g + 1) * head_dim, o);
      }
    }
  });
}

// q [B, H, D]; k_cache / v_cache [num_blocks, block_size, KVH, D]; block_table [B, max_blocks];
// seq_lens [B] (tokens to attend, the new one included) -> [B, H, D] in q's dtype.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens,
                                     double scale, int64_t sliding_window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention needs contiguous tensors");
  auto table = block_table.to(torch::kLong).contiguous();
  auto lens = seq_lens.to(torch::kLong).contiguous();
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                            v_cache.data_ptr<scalar_t>(), table.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<float>(), q.size(0), q.size(1),
                            k_cache.size(2), q.size(2), k_cache.size(1), table.size(1), scale,
                            sliding_window);
  });
  return out.to(q.scalar_type());
}

// The GIL is released while a kernel runs: the server's event loop (detokenizing, writing
// streams) shares the process with the engine thread and must not wait for a whole step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, py::call_guard<py::gil_scoped_release>(),
        "decode attention through a block table, reading the paged KV cache in place");
}
