// A Llama-family decoder stack run for one decode step in a single native call.
//
// At decode a layer's work is ~10 kernel calls on one row per sequence, and from Python each costs
// its dispatch: module calls, argument checks, pybind conversion, a few views. For the built-in
// model (30 layers) that was ~3 ms of a ~15 ms single-thread step. DecoderStack holds the
// layers' weights once (built at load by tokenmill/models/llama_decode_stack.py) and chains the
// same kernels the Python path calls (add_rms_norm, the quantized or dense linear, rotary in
// place, paged decode attention writing the new K/V, silu_and_mul), in the same order with the
// same arguments, so its result equals the Python path's bit for bit (the tests check this).
//
// It only runs decode-only steps (one new token per sequence, the paged cache attended in place)
// with few enough rows for the decode paths of the quantized kernel (int8 for bfloat16, exact for
// float32 activations); the caller falls back to the Python layers otherwise.
#include "decoder_stack.h"

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           double eps, double scale, int64_t sliding_window, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor final_norm)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps),
      scale_(scale), sliding_window_(sliding_window), cos_(std::move(cos)), sin_(std::move(sin)),
      final_norm_(std::move(final_norm)) {}

int64_t DecoderStack::add_packed_linear(torch::Tensor data, int64_t n, int64_t k, int64_t bits,
                                        int64_t group_size, bool has_min, int64_t tile_stride,
                                        int64_t scales_offset, int64_t mins_offset,
                                        std::optional<torch::Tensor> perm,
                                        std::optional<torch::Tensor> bias) {
  LinearWeight w;
  w.packed = true;
  w.data = std::move(data);
  w.n = n;
  w.k = k;
  w.bits = bits;
  w.group_size = group_size;
  w.has_min = has_min;
  w.tile_stride = tile_stride;
  w.scales_offset = scales_offset;
  w.mins_offset = mins_offset;
  w.perm = std::move(perm);
  if (bias.has_value()) w.bias = bias->to(torch::kFloat).contiguous();
  linears_.push_back(std::move(w));
  return int64_t(linears_.size()) - 1;
}

int64_t DecoderStack::add_dense_linear(torch::Tensor matrix,
                                       std::optional<torch::Tensor> bias) {
  LinearWeight w;
  w.dense = std::move(matrix);
  w.n = w.dense.size(0);
  w.k = w.dense.size(1);
  w.bias = std::move(bias);
  linears_.push_back(std::move(w));
  return int64_t(linears_.size()) - 1;
}

void DecoderStack::add_layer(torch::Tensor input_norm, int64_t qkv, int64_t o,
                             torch::Tensor post_norm, int64_t gate_up, int64_t down) {
  const int64_t count = int64_t(linears_.size());
  for (int64_t index : {qkv, o, gate_up, down})
    TORCH_CHECK(index >= 0 && index < count, "no linear layer ", index);
  layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), qkv, o, gate_up, down});
}

void DecoderStack::set_qk_norm(int64_t index, torch::Tensor q_norm, torch::Tensor k_norm) {
  TORCH_CHECK(index >= 0 && index < int64_t(layers_.size()), "no layer ", index);
  TORCH_CHECK(q_norm.numel() == head_dim_ && k_norm.numel() == head_dim_,
              "q/k norm weights must have head_dim elements");
  layers_[index].q_norm = std::move(q_norm);
  layers_[index].k_norm = std::move(k_norm);
}

torch::Tensor DecoderStack::forward(torch::Tensor hidden, const torch::Tensor& positions,
                                    const std::vector<torch::Tensor>& kv_caches,
                                    const torch::Tensor& block_table,
                                    const torch::Tensor& seq_lens, const torch::Tensor& slots,
                                    int64_t isa) {
  TORCH_CHECK(kv_caches.size() == layers_.size(), "one KV cache per layer");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [tokens, hidden]");
  const int64_t m = hidden.size(0);
  const int64_t q_heads = num_heads_, kv_heads = num_kv_heads_, d = head_dim_;
  torch::Tensor residual;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    torch::Tensor h;
    if (i == 0) {
      residual = hidden;
      h = rms_norm(hidden, layer.input_norm, eps_);
    } else {
      h = add_rms_norm(hidden, residual, layer.input_norm, eps_);
    }
    auto qkv = linear(h, linears_[layer.qkv], isa).view({m, q_heads + 2 * kv_heads, d});
    auto q = qkv.narrow(1, 0, q_heads);
    auto k = qkv.narrow(1, q_heads, kv_heads);
    auto v = qkv.narrow(1, q_heads + kv_heads, kv_heads);
    if (layer.q_norm.defined()) {  // new contiguous q and k, as LlamaAttention makes them
      q = rms_norm(q, layer.q_norm, eps_);
      k = rms_norm(k, layer.k_norm, eps_);
    }
    rotary_embedding(positions, q, k, cos_, sin_);
    const auto& cache = kv_caches[i];
    auto attn = paged_decode_attention(q, cache.select(0, 0), cache.select(0, 1), block_table,
                                       seq_lens, scale_, sliding_window_, k, v, slots);
    auto o = linear(attn.reshape({m, q_heads * d}), linears_[layer.o], isa);
    h = add_rms_norm(o, residual, layer.post_norm, eps_);
    hidden = linear(silu_and_mul(linear(h, linears_[layer.gate_up], isa)), linears_[layer.down],
                    isa);
  }
  if (layers_.empty()) return rms_norm(hidden, final_norm_, eps_);
  return add_rms_norm(hidden, residual, final_norm_, eps_);
}

torch::Tensor DecoderStack::linear(const torch::Tensor& x, const LinearWeight& w,
                                   int64_t isa) const {
  if (!w.packed) return at::linear(x, w.dense, w.bias);
  if (x.scalar_type() == torch::kFloat)
    return exact_linear(x, w.data, w.n, w.k, w.bits, w.group_size, w.has_min, w.tile_stride,
                        w.scales_offset, w.mins_offset, w.perm, w.bias, isa);
  return int8_linear(x, w.data, w.n, w.k, w.bits, w.group_size, w.has_min, w.tile_stride,
                     w.scales_offset, w.mins_offset, w.perm, w.bias, isa);
}
