"""The int32 words GPTQ and AWQ checkpoints pack 4-bit codes into, and checks both readers share.

Both formats put eight 4-bit codes in one int32, the first at the low bits; they differ only in
which axis they pack along and (AWQ) in the order of the eight codes within a word.
``unpack_nibbles`` gives the codes in word order; each reader then reorders and transposes them
into ``QuantizedWeight``'s ``[N, K]`` layout, and ``pack_codes`` writes that layout's bytes.
"""

from __future__ import annotations

import torch

from tokenmill.errors import CorruptModelFileError

CODES_PER_WORD = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., W * 8]``; element ``8 * w + i`` is nibble ``i`` of
    word ``w``."""
    # An arithmetic shift drags the sign bit along for words with the top nibble >= 8; the mask
    # removes it, so negative int32 words unpack like the uint32 they were written as.
    nibbles = (words.unsqueeze(-1) >> _SHIFTS) & 0xF
    return nibbles.to(torch.uint8).flatten(-2)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[N, K]`` -> ``QuantizedWeight``'s uint8 ``[N, K // 2]`` (even k low)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def expect_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                  dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise ``CorruptModelFileError`` naming ``name`` unless ``tensor`` has this shape, dtype."""
    if tuple(tensor.shape) != shape:
        raise CorruptModelFileError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CorruptModelFileError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                    f"expected {allowed}")


def zero_point_mins(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``w = scale * (q - zero)`` as ``scale * q + min``, with ``min = -scale * zero`` in float16.

    The product is rounded once to float16 (the spec's dtype for mins): at most 2**-11 of
    ``scale * zero``, i.e. under 1/100 of a quantization step for zeros up to 16.
    """
    return (-(scales.float() * zeros.float())).to(torch.float16)
