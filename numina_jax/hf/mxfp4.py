"""MXFP4 (OCP MX: E2M1 elements, one E8M0 scale per group of 32) in numpy, as the gpt-oss checkpoint stores
its expert weights: `blocks[E, R, G, 16]` (two elements a byte, low nibble first) and `scales[E, R, G]`."""

from __future__ import annotations

import math

import numpy as np

GROUP = 32           # elements sharing one scale
BYTES_PER_GROUP = 16
SCALE_BIAS = 127

# E2M1 code -> value: bit 3 sign, bits 1-2 exponent, bit 0 mantissa.
FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
# (scale byte s, block byte b) -> the two values b holds, low nibble first, each ldexp'd by s - 127 in fp32 exactly
# as transformers does (torch.ldexp): a single lookup per byte then dequantizes. Stored as one uint64 per pair.
_BYTE_VALUES = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=-1)
with np.errstate(over="ignore"):  # scale 255 turns 6 into inf, as ldexp does
  _PAIRS = np.ldexp(_BYTE_VALUES[None], (np.arange(256, dtype=np.int32) - SCALE_BIAS)[:, None, None])
_PAIRS = np.ascontiguousarray(_PAIRS, np.float32).view(np.uint64).reshape(256 * 256)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
  """`blocks[..., G, 16]` (uint8) and `scales[..., G]` (uint8) -> values `[..., G*32]`.

  Element 32g + 2j is `LUT[b & 0xF]` and 32g + 2j + 1 is `LUT[b >> 4]` for byte b = blocks[..., g, j]; each is
  multiplied by 2**(scale - 127). The result is exact in fp32 (and in bf16 for scale bytes <= 253).
  """
  blocks = np.asarray(blocks)
  scales = np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
  if blocks.shape[-1] != BYTES_PER_GROUP or blocks.shape[:-1] != scales.shape:
    raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}: expected "
                     f"blocks = scales.shape + ({BYTES_PER_GROUP},)")
  pair = (scales.astype(np.intp) << 8)[..., None] | blocks
  out = np.take(_PAIRS, pair).view(np.float32)
  return out.reshape(*blocks.shape[:-2], -1).astype(dtype, copy=False)


def _span(s: slice | None, n: int) -> tuple[int, int]:
  if s is None:
    return 0, n
  start, stop, step = s.indices(n)
  if step != 1:
    raise ValueError(f"MXFP4 windows need unit-step slices, got {s}")
  return start, max(start, stop)


def dequantize_window(blocks, scales, *, experts: slice | None = None, rows: slice | None = None,
                      cols: slice | None = None, dtype=np.float32) -> np.ndarray:
  """Dequantizes only `W[experts, rows, cols]` of the `[E, R, G*32]` matrix held by `blocks[E, R, G, 16]` and
  `scales[E, R, G]`.

  `blocks` and `scales` may be numpy arrays or lazy sliceable handles (a safetensors `get_slice` object, a
  memmap): only the expert range, the row range and the groups covering the column range are read.
  """
  shape = tuple(blocks.get_shape() if hasattr(blocks, "get_shape") else blocks.shape)
  if len(shape) != 4:
    raise ValueError(f"MXFP4 blocks must be [E, R, G, 16], got shape {shape}")
  E, R, G, _ = shape
  e0, e1 = _span(experts, E)
  r0, r1 = _span(rows, R)
  c0, c1 = _span(cols, G * GROUP)
  g0, g1 = c0 // GROUP, max(c0 // GROUP, math.ceil(c1 / GROUP))
  b = np.asarray(blocks[e0:e1, r0:r1, g0:g1])
  s = np.asarray(scales[e0:e1, r0:r1, g0:g1])
  w = dequantize(b, s, dtype=np.float32)
  return w[..., c0 - g0 * GROUP:c1 - g0 * GROUP].astype(dtype, copy=False)


def _nearest_code(mag: np.ndarray) -> np.ndarray:
  """Nearest E2M1 magnitude code (0..7) for |x| <= 6, ties to the even code (round-half-to-even)."""
  grid = FP4_VALUES[:8]
  dist = np.abs(mag[..., None] - grid)
  best = dist == dist.min(axis=-1, keepdims=True)
  # Among equally near candidates prefer an even code (mantissa bit 0), like IEEE round-half-to-even.
  score = best.astype(np.int8) * 2 + (best & (np.arange(8) % 2 == 0)).astype(np.int8)
  return np.argmax(score, axis=-1).astype(np.uint8)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Encodes `w[..., C]` (C a multiple of 32) to MXFP4: `(blocks[..., C/32, 16], scales[..., C/32])`.

  Each group gets the smallest power-of-two scale 2**k with max|x| <= 6 * 2**k (so nothing clips), and each
  element rounds to the nearest E2M1 value (ties to even). Values already on that grid encode exactly.
  """
  w = np.asarray(w, dtype=np.float32)
  if w.shape[-1] % GROUP:
    raise ValueError(f"last axis ({w.shape[-1]}) must be a multiple of {GROUP} for MXFP4")
  if not np.all(np.isfinite(w)):
    raise ValueError("cannot encode non-finite values to MXFP4")
  g = w.reshape(*w.shape[:-1], -1, GROUP)
  amax = np.abs(g).max(axis=-1)
  with np.errstate(divide="ignore"):
    # frexp gives amax/6 = m * 2**e with m in [0.5, 1): the smallest k with amax/6 <= 2**k is e, or e-1 when
    # amax/6 is itself a power of two.
    m, e = np.frexp(amax / 6.0)
  k = np.where(m == 0.5, e - 1, e)
  k = np.where(amax == 0, -SCALE_BIAS, k)
  k = np.clip(k, -SCALE_BIAS, SCALE_BIAS).astype(np.int32)
  x = np.ldexp(g, -k[..., None])
  codes = _nearest_code(np.minimum(np.abs(x), 6.0)) | (np.signbit(x).astype(np.uint8) << 3)
  codes = codes.reshape(*codes.shape[:-1], BYTES_PER_GROUP, 2)
  blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
  scales = (k + SCALE_BIAS).astype(np.uint8)
  return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)
