"""Compressors for CHOCO gossip: how a difference ``x - x_hat`` is cut down to a few bytes, and read back.

Each compressor writes a flat tensor into a byte payload (:meth:`Compressor.encode`) and reads it back
(:meth:`Compressor.decode`). Sender and receivers decode the same bytes, so the public copies they update agree
bit for bit. All three are deterministic (no random rounding), so runs are reproducible and the tests can replay
them in numpy.

* ``int8``: per chunk of ``CHUNK`` elements, a scale ``max|v| / 127`` and ``round(v / scale)`` clamped to
  ``[-127, 127]`` as int8 (about 1 byte an element). The clamp matters in bf16 and fp16: the scale is rounded to
  the tensors' dtype, can come out below ``max|v| / 127``, and the largest entry then rounds to 128, which int8
  would wrap to -128, flipping its sign;
* ``topk``: the ``ceil(fraction * n)`` entries largest in magnitude, as values (padded to 4 bytes) and int32
  indices (``8 * fraction`` bytes an element for fp32);
* ``sign``: per chunk, a scale ``mean|v|`` and one bit an element, ``+scale`` for ``v >= 0`` and ``-scale`` otherwise
  (about 1/8 byte an element).

Scales and top-k values travel in the tensors' own dtype. Every part of a payload starts at a multiple of its
element size (the payload itself starts 8-byte aligned), so it can be viewed in place.

A compressor sees one packed bucket (every mixed tensor of one dtype, BatchNorm statistics included, end to end):
chunks run across tensor boundaries, and the top-k is taken over the whole bucket, so tensors compete for its
slots. ``torch.topk(sorted=False)`` breaks ties between equal magnitudes in an implementation-defined way; sender
and receivers decode the same bytes, so the public copies agree whichever it picks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dpgan.checks import check_choice
from lightning_dpgan.gossip.options import CHUNK, COMPRESSIONS  # noqa: F401 - CHUNK: elements per scale, re-exported

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _chunks(numel: int) -> int:
    return -(-numel // CHUNK)


class Compressor:
    """``encode(v, out)`` writes ``v`` (1-D) into ``wire_bytes`` bytes; ``decode(payload, out)`` reads them back.
    ``roundtrip(v)`` is what a decode of the encoding gives, bit for bit, for every row of ``v`` at once: the
    many-replica simulator compresses all replicas' differences in one call with the same math."""

    name = ""

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        raise NotImplementedError

    def encode(self, v: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def decode(self, payload: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def roundtrip(self, v: Tensor) -> Tensor:
        raise NotImplementedError


def _chunked(v: Tensor, fill: Tensor | None = None) -> Tensor:
    """``v`` (..., n) zero-padded to whole chunks, as (..., chunks, CHUNK)."""
    n = v.shape[-1]
    padded = torch.zeros(*v.shape[:-1], _chunks(n) * CHUNK, dtype=v.dtype if fill is None else fill.dtype, device=v.device)
    padded[..., :n] = v
    return padded.view(*v.shape[:-1], _chunks(n), CHUNK)


class Int8(Compressor):
    name = "int8"

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return _chunks(numel) * _itemsize(dtype) + numel

    @staticmethod
    def _quantize(v: Tensor) -> tuple[Tensor, Tensor]:
        """Per chunk of the last dimension, its scale and ``v`` in its steps (whole numbers in ``v``'s dtype)."""
        rows = _chunked(v)
        scales = rows.abs().amax(dim=-1) / 127
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(rows / safe[..., None]).clamp_(-127, 127).view(*v.shape[:-1], -1)[..., : v.shape[-1]]
        return scales, q

    @staticmethod
    def _dequantize(scales: Tensor, q: Tensor) -> Tensor:
        return (_chunked(q, fill=scales) * scales[..., None]).view(*q.shape[:-1], -1)[..., : q.shape[-1]]

    def encode(self, v: Tensor, out: Tensor) -> None:
        n, chunks, size = v.numel(), _chunks(v.numel()), _itemsize(v.dtype)
        scales, q = self._quantize(v)
        out[: chunks * size].view(v.dtype).copy_(scales)
        out[chunks * size : chunks * size + n].view(torch.int8).copy_(q)

    def decode(self, payload: Tensor, out: Tensor) -> None:
        n, chunks, size = out.numel(), _chunks(out.numel()), _itemsize(out.dtype)
        scales = payload[: chunks * size].view(out.dtype)
        out.copy_(self._dequantize(scales, payload[chunks * size : chunks * size + n].view(torch.int8)))

    def roundtrip(self, v: Tensor) -> Tensor:
        return self._dequantize(*self._quantize(v))


class TopK(Compressor):
    name = "topk"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def kept(self, numel: int) -> int:
        return max(1, math.ceil(self.fraction * numel))

    def _values_bytes(self, k: int, dtype: torch.dtype) -> int:
        return -(-k * _itemsize(dtype) // 4) * 4  # padded, so that the int32 indices after them stay aligned

    def _largest(self, v: Tensor) -> Tensor:
        """The indices of the entries largest in magnitude, per row of the last dimension."""
        return torch.topk(v.abs(), self.kept(v.shape[-1]), dim=-1, sorted=False).indices

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        k = self.kept(numel)
        return self._values_bytes(k, dtype) + 4 * k

    def encode(self, v: Tensor, out: Tensor) -> None:
        k, size = self.kept(v.numel()), _itemsize(v.dtype)
        start = self._values_bytes(k, v.dtype)
        index = self._largest(v)
        out[: k * size].view(v.dtype).copy_(v[index])
        out[start : start + 4 * k].view(torch.int32).copy_(index)

    def decode(self, payload: Tensor, out: Tensor) -> None:
        k, size = self.kept(out.numel()), _itemsize(out.dtype)
        start = self._values_bytes(k, out.dtype)
        out.zero_()
        out[payload[start : start + 4 * k].view(torch.int32).long()] = payload[: k * size].view(out.dtype)

    def roundtrip(self, v: Tensor) -> Tensor:
        index = self._largest(v)
        return torch.zeros_like(v).scatter_(-1, index, v.gather(-1, index))


class Sign(Compressor):
    name = "sign"

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return _chunks(numel) * _itemsize(dtype) + -(-numel // 8)

    @staticmethod
    def _scales(v: Tensor) -> Tensor:
        """Per chunk of the last dimension, the mean magnitude of its elements (the last chunk's own count)."""
        n, chunks = v.shape[-1], _chunks(v.shape[-1])
        counts = torch.full((chunks,), CHUNK, dtype=v.dtype, device=v.device)
        counts[-1] = n - (chunks - 1) * CHUNK
        return _chunked(v.abs()).sum(dim=-1) / counts

    @staticmethod
    def _signed(scales: Tensor, positive: Tensor) -> Tensor:
        magnitude = scales.repeat_interleave(CHUNK, dim=-1)[..., : positive.shape[-1]]  # each chunk's over its elements
        return torch.where(positive, magnitude, -magnitude)

    def encode(self, v: Tensor, out: Tensor) -> None:
        n, chunks, size = v.numel(), _chunks(v.numel()), _itemsize(v.dtype)
        out[: chunks * size].view(v.dtype).copy_(self._scales(v))
        bits = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=v.device)
        bits[:n] = v >= 0
        packed = (bits.view(-1, 8) * _BITS.to(v.device)).sum(dim=1, dtype=torch.uint8)
        out[chunks * size : chunks * size + packed.numel()].copy_(packed)

    def decode(self, payload: Tensor, out: Tensor) -> None:
        n, chunks, size = out.numel(), _chunks(out.numel()), _itemsize(out.dtype)
        scales = payload[: chunks * size].view(out.dtype)
        packed = payload[chunks * size : chunks * size + -(-n // 8)]
        out.copy_(self._signed(scales, (packed[:, None] & _BITS.to(out.device)).ne(0).view(-1)[:n]))

    def roundtrip(self, v: Tensor) -> Tensor:
        return self._signed(self._scales(v), v >= 0)


def build_compressor(name: str, topk_fraction: float) -> Compressor:
    check_choice("compression", name, COMPRESSIONS)
    if name == "topk":
        return TopK(topk_fraction)
    return Int8() if name == "int8" else Sign()
