"""The native quantized matmul reproduces ``reference_matmul`` on every path this machine can run.

Tolerances, as ‖y − ref‖ / ‖ref‖ over the whole output:
* float32 x on a native path (the exact kernel below DENSE_MIN_ROWS_FP32, the dense float32 GEMM from
  there on): 1e-5 — nothing is rounded but float sums (seen: at most 1.1e-6);
* bf16 x, int8-activation path (AVX-512 VNNI and AVX2; every M without AMX, below
  dense_min_rows() with it): 2e-2 — x is rounded to int8 per 32-element block (about 5e-3 typical); a bf16 output adds its own rounding (about 3e-3). The tail
  is set by all-positive weights (4-bit codes without mins) at M = 1..3: every output then shares
  the error of sum(x), so it does not average out over N; a scan of random inputs peaked at 2.0e-2
  there, the fixed seeds below peak at 1.3e-2;
* bf16 x, dense path (M >= dense_min_rows(), AMX only): 1e-2 — weights rounded to bf16 where
  the CPU has bf16 dot products;
* reference path: the reference itself (float32 1e-6, bf16 output rounding 8e-3).
"""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.layers.kernels import quant_matmul as qm
from tokenmill.quant.weight import QuantizedWeight, reference_matmul

ROWS = (1, 3, 8, 17, 47, 64, 512)
EXACT = 1e-5  # float32 x on a native path
# (K, N, group_size, with input_perm): K, N off the multiples of 64; group == K included
SHAPES = [(96, 37, 32, False), (160, 1000, 32, True), (256, 40, 64, False), (384, 70, 128, True),
          (192, 33, 192, False), (576, 64, 64, True)]
AVAILABLE = [isa for isa in qm.ISAS if qm._supported(isa)]
NATIVE = [isa for isa in AVAILABLE if isa != "reference"]


@pytest.fixture(params=AVAILABLE)
def isa(request):
    qm.set_isa(request.param)
    yield request.param
    qm.set_isa(None)


def make_weight(n: int, k: int, bits: int, group_size: int, mins: str | None, perm: bool,
                seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    if bits == 4:
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    else:
        qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * (0.02 if bits == 4 else 0.002)).half()
    min_values = None
    if mins == "random":
        min_values = (torch.randn(n, groups, generator=gen) * 0.05).half()
    elif mins == "q4_0":  # GGUF Q4_0: signed codes q - 8
        min_values = (-8 * scales.float()).half()
    input_perm = torch.randperm(k, generator=gen) if perm else None
    return QuantizedWeight(bits, group_size, qweight, scales, min_values, input_perm, "test")


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def tolerance(isa: str, rows: int, dtype: torch.dtype) -> float:
    if isa == "reference":
        return 1e-6 if dtype == torch.float32 else 8e-3
    if dtype == torch.float32:
        return EXACT
    dense_from = qm.dense_min_rows()
    return 2e-2 if dense_from is None or rows < dense_from else 1e-2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins", [None, "random"])
@pytest.mark.parametrize(("k", "n", "group_size", "perm"), SHAPES)
def test_matches_reference(isa, bits, mins, k, n, group_size, perm):
    weight = make_weight(n, k, bits, group_size, mins, perm)
    packed = qm.pack(weight)
    assert (packed.out_features, packed.in_features, packed.bits) == (n, k, bits)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x32 = torch.randn(rows, k, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            x = x32.to(dtype)
            y = qm.quant_linear(x, packed)
            assert y.dtype == dtype and y.shape == (rows, n)
            error = relative_error(y, reference_matmul(x, weight))
            assert error < tolerance(isa, rows, dtype), (rows, dtype, error)


@pytest.mark.parametrize("isa_name", NATIVE)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins", [None, "random", "q4_0"])
def test_exact_kernel_at_every_row_count(isa_name, bits, mins):
    """The exact kernel itself (forced past DENSE_MIN_ROWS_FP32): every register-block size, row
    chunks of 64, an odd N and a group spanning K, with input_perm and bias."""
    qm.set_isa(isa_name)
    try:
        gen = torch.Generator().manual_seed(6)
        for k, n, group_size, perm in ((224, 45, 32, True), (192, 33, 192, False)):
            weight = make_weight(n, k, bits, group_size, mins, perm, seed=7)
            packed = qm.pack(weight)
            bias = torch.randn(n, generator=gen)
            for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 47, 64, 130):
                x = torch.randn(rows, k, generator=gen)
                y = qm.native_linear(x, packed, bias, "exact")
                assert y.dtype == torch.float32 and y.shape == (rows, n)
                error = relative_error(y, reference_matmul(x, weight) + bias)
                assert error < EXACT, (k, rows, error)
    finally:
        qm.set_isa(None)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_signed_4bit_codes_and_bias(isa, rows):
    weight = make_weight(300, 256, 4, 32, "q4_0", False, seed=3)
    bias = torch.randn(300)
    packed = qm.pack(weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 256).to(dtype)
        ref = reference_matmul(x, weight) + bias
        error = relative_error(qm.quant_linear(x, packed, bias.to(dtype)), ref)
        assert error < tolerance(isa, rows, dtype), (dtype, error)


@pytest.mark.parametrize("rows", [2, 64])
def test_strided_input_and_leading_dims(isa, rows):
    weight = make_weight(50, 128, 8, 32, "random", True, seed=4)
    packed = qm.pack(weight)
    wide = torch.randn(rows, 256)
    x = wide[:, ::2]  # non-contiguous
    error = relative_error(qm.quant_linear(x, packed), reference_matmul(x, weight))
    assert error < tolerance(isa, rows, torch.float32)
    batched = torch.randn(2, rows, 128)
    y = qm.quant_linear(batched, packed)
    assert y.shape == (2, rows, 50)
    ref = reference_matmul(batched.reshape(-1, 128), weight).view(2, rows, 50)
    assert relative_error(y, ref) < tolerance(isa, 2 * rows, torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins", [None, "random"])
def test_pack_is_lossless(isa, bits, mins):
    weight = make_weight(45, 192, bits, 64, mins, True, seed=5)
    restored = qm.unpack(qm.pack(weight))
    assert torch.equal(restored.qweight, weight.qweight)
    assert torch.equal(restored.scales, weight.scales)
    assert (restored.mins is None) == (mins is None)
    if mins is not None:
        assert torch.equal(restored.mins, weight.mins)
    assert torch.equal(restored.input_perm, weight.input_perm)


def test_isa_selection(monkeypatch):
    forced = os.environ.get(qm.ISA_ENV)
    assert qm.kernel_isa() in qm.ISAS
    with pytest.raises(ValueError, match="unknown"):
        qm.set_isa("sse2")
    try:
        monkeypatch.setenv(qm.ISA_ENV, "reference")
        assert qm.set_isa(None) == "reference"
        assert qm.pack(make_weight(16, 64, 4, 32, None, False)).reference is not None
        monkeypatch.setenv(qm.ISA_ENV, "avx9000")
        with pytest.raises(ValueError, match=qm.ISA_ENV):
            qm.set_isa(None)
    finally:
        monkeypatch.delenv(qm.ISA_ENV)
        qm.set_isa(None)
    if forced is None and qm.quant_matmul_module() is not None:
        assert qm.kernel_isa() != "reference"  # this machine has at least AVX2


@pytest.mark.parametrize("bits,mins", [(8, None), (4, "random")])
def test_rows_read_back_from_the_packed_layout_equal_the_weight_rows(isa, bits, mins):
    """The tied embedding's lookup reads the LM head's packed tiles: any rows, in any order,
    repeated, including the padded last tile of an N that is not a multiple of 16."""
    weight = make_weight(1000, 160, bits, 32, mins, perm=False)
    packed = qm.pack(weight)
    rows = torch.tensor([[999, 0, 17], [17, 998, 500]])
    got = qm.dequantize_packed_rows(packed, rows, torch.float32)
    assert got.shape == (2, 3, 160)
    assert torch.equal(got, weight.dequantize_rows(rows.reshape(-1)).view(2, 3, 160))


def test_the_kernel_is_found_whichever_native_op_loaded_the_extension_first():
    """All kernels are one extension: loading it through the fused ops (as the decoder stack
    does) must not leave the quantized matmul on its reference path."""
    import subprocess
    import sys

    if qm.quant_matmul_module() is None:
        pytest.skip("no C++ toolchain here")
    code = ("from tokenmill.layers.kernels import fused_ops, quant_matmul as qm\n"
            "assert fused_ops.fused_ops_module() is not None\n"
            "print(qm.kernel_isa())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, check=True)
    assert result.stdout.strip().splitlines()[-1] != "reference"
