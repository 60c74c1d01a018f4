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
#pragma once

#include "native.h"

#include <optional>
#include <vector>

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
               double scale, int64_t sliding_window, torch::Tensor cos, torch::Tensor sin,
               torch::Tensor final_norm);

  // A packed 4/8-bit weight in the quantized kernel's layout; returns its index.
  int64_t add_packed_linear(torch::Tensor data, int64_t n, int64_t k, int64_t bits,
                            int64_t group_size, bool has_min, int64_t tile_stride,
                            int64_t scales_offset, int64_t mins_offset,
                            std::optional<torch::Tensor> perm, std::optional<torch::Tensor> bias);
  // A dense [N, K] matrix in the activation dtype; returns its index.
  int64_t add_dense_linear(torch::Tensor matrix, std::optional<torch::Tensor> bias);
  void add_layer(torch::Tensor input_norm, int64_t qkv, int64_t o, torch::Tensor post_norm,
                 int64_t gate_up, int64_t down);
  // Qwen3: an RMSNorm over each query and key head of layer `index`, before rotary.
  void set_qk_norm(int64_t index, torch::Tensor q_norm, torch::Tensor k_norm);
  int64_t num_layers() const { return int64_t(layers_.size()); }

  // hidden [M, hidden] (the embeddings of the new tokens) -> the final norm's output [M, hidden].
  // kv_caches: one [2, num_blocks, block_size, kv_heads, head_dim] per layer; block_table
  // [M, max_blocks], seq_lens [M], slots [M] (where each new token's K/V goes); isa: the
  // quantized kernel's code path, as quant_matmul.py decided it.
  torch::Tensor forward(torch::Tensor hidden, const torch::Tensor& positions,
                        const std::vector<torch::Tensor>& kv_caches,
                        const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                        const torch::Tensor& slots, int64_t isa);

 private:
  struct LinearWeight {
    bool packed = false;
    // packed 4/8-bit weight in the quantized kernel's layout
    torch::Tensor data;
    int64_t n = 0, k = 0, bits = 0, group_size = 0, tile_stride = 0, scales_offset = 0,
            mins_offset = 0;
    bool has_min = false;
    std::optional<torch::Tensor> perm;
    // or a dense [N, K] matrix in the activation dtype
    torch::Tensor dense;
    std::optional<torch::Tensor> bias;  // float32 for packed weights, activation dtype for dense
  };

  struct Layer {
    torch::Tensor input_norm, post_norm;
    int64_t qkv, o, gate_up, down;  // indices into linears_
    torch::Tensor q_norm, k_norm;  // undefined unless the model normalizes q/k heads (Qwen3)
  };

  // What quant_matmul.quant_linear / DenseOp compute for a decode-sized x.
  torch::Tensor linear(const torch::Tensor& x, const LinearWeight& w, int64_t isa) const;

  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  int64_t sliding_window_;
  torch::Tensor cos_, sin_, final_norm_;
  std::vector<LinearWeight> linears_;
  std::vector<Layer> layers_;
};
