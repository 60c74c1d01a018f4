// The Python module of the native kernels (tokenmill_native; see native.h for what each file holds).
//
// The GIL is released while a kernel runs: the server's event loop (detokenizing, writing
// streams) shares the process with the engine thread and must not wait for a whole step.
#include "decoder_stack.h"
#include "native.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  // quantized matmul
  m.def("int8_linear", &int8_linear, release(), "x @ W.T through int8 activations (decode path)");
  m.def("exact_linear", &exact_linear, release(), "x @ W.T for float32 x, no activation quantization");
  m.def("dense_linear", &dense_linear, release(), "x @ W.T through chunked dequantization + at::mm");
  m.def("dequantize_columns", &dequantize_columns, release(), "packed columns -> dense [K, cols]");
  m.def("cpu_features", &cpu_features, "the ISA extensions this CPU (and OS) supports");
  // fused element-wise ops
  m.def("rms_norm", &rms_norm, release(), "weight * x / rms(x), fp32 inside");
  m.def("add_rms_norm", &add_rms_norm, release(), "residual += x in place, then rms_norm(residual)");
  m.def("silu_and_mul", &silu_and_mul, release(), "silu(gate) * up of a fused [..., 2d] projection");
  m.def("rotary_embedding", &rotary_embedding, release(), "rotate-half rotary on query and key in place");
  // attention
  m.def("paged_decode_attention", &paged_decode_attention, release(),
        "decode attention through a block table, reading the paged KV cache in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("key") = py::none(), py::arg("value") = py::none(), py::arg("slots") = py::none());
  // all of a Llama model's decoder layers for one decode step (decoder_stack.h)
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double, int64_t, torch::Tensor,
                    torch::Tensor, torch::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("sliding_window"), py::arg("cos"), py::arg("sin"),
           py::arg("final_norm"))
      .def("add_packed_linear", &DecoderStack::add_packed_linear)
      .def("add_dense_linear", &DecoderStack::add_dense_linear)
      .def("add_layer", &DecoderStack::add_layer)
      .def("set_qk_norm", &DecoderStack::set_qk_norm)
      .def_property_readonly("num_layers", &DecoderStack::num_layers)
      // the GIL is released for the whole step: the server's event loop runs meanwhile
      .def("forward", &DecoderStack::forward, release());
}
