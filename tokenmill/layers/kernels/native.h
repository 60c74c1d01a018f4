// The native CPU kernels' entry points, one extension (tokenmill_native) built from the .cpp files
// beside this header: quantized matmul (quant_matmul*.cpp), fused element-wise ops (fused_ops.cpp),
// paged decode attention (paged_attention.cpp) and the decoder stack that chains them for a whole
// decode step (decoder_stack.cpp). bindings.cpp exposes them to Python; each has a PyTorch
// reference path in the Python module that calls it.
#pragma once

// torch/types.h, not torch/extension.h: the latter (all of libtorch's C++ API and pybind11) took
// ~29 s to parse per file, this ~8 s; only bindings.cpp needs pybind11.
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

// --- quant_matmul.cpp: y = x @ W.T for a packed 4/8-bit weight (see quant_matmul.h) ---
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                          int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                          int64_t scales_offset, int64_t mins_offset,
                          const std::optional<torch::Tensor>& perm,
                          const std::optional<torch::Tensor>& bias, int64_t isa);
torch::Tensor exact_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                           int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                           int64_t scales_offset, int64_t mins_offset,
                           const std::optional<torch::Tensor>& perm,
                           const std::optional<torch::Tensor>& bias, int64_t isa);
torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& data, int64_t n, int64_t k,
                           int64_t bits, int64_t group_size, bool has_min, int64_t tile_stride,
                           int64_t scales_offset, int64_t mins_offset,
                           const std::optional<torch::Tensor>& perm,
                           const std::optional<torch::Tensor>& bias, torch::ScalarType dtype,
                           int64_t chunk_cols, int64_t isa);
torch::Tensor dequantize_columns(const torch::Tensor& data, int64_t n, int64_t k, int64_t bits,
                                 int64_t group_size, bool has_min, int64_t tile_stride,
                                 int64_t scales_offset, int64_t mins_offset,
                                 const std::optional<torch::Tensor>& perm, int64_t n_begin,
                                 int64_t n_end, torch::ScalarType dtype, int64_t isa);
std::vector<std::string> cpu_features();

// --- fused_ops.cpp ---
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rotary_embedding(torch::Tensor positions, torch::Tensor query, torch::Tensor key,
                      torch::Tensor cos, torch::Tensor sin);

// --- paged_attention.cpp ---
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens,
                                     double scale, int64_t sliding_window,
                                     const std::optional<torch::Tensor>& key,
                                     const std::optional<torch::Tensor>& value,
                                     const std::optional<torch::Tensor>& slots);
