"""MXFP4 decoding against hand-computed values and transformers' own dequantizer; windows; the encoder."""

import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from numina_jax.hf import mxfp4


def _one_group(byte_values, scale):
  blocks = np.zeros((1, 16), np.uint8)
  blocks[0, :len(byte_values)] = byte_values
  return blocks, np.array([scale], np.uint8)


def test_hand_decoded_bytes():
  # 0x21: low nibble 1 -> 0.5, high 2 -> 1.0.  0xF8: low 8 -> -0.0, high 15 -> -6.0.
  # 0x7A: low 10 -> -1.0, high 7 -> 6.0.       0x3C: low 12 -> -2.0, high 3 -> 1.5.
  # Scale byte 128 multiplies by 2**(128 - 127) = 2.
  blocks, scales = _one_group([0x21, 0xF8, 0x7A, 0x3C], 128)
  got = mxfp4.dequantize(blocks, scales)
  want = np.zeros(32, np.float32)
  want[:8] = [1.0, 2.0, -0.0, -12.0, -2.0, 12.0, -4.0, 3.0]
  assert got.shape == (32,)
  np.testing.assert_array_equal(got, want)
  assert np.signbit(got[2]) and not np.signbit(got[8])  # -0.0 keeps its sign, padding is +0.0

  # Scale byte 125: 2**-2. 0x54: low 4 -> 2.0, high 5 -> 3.0; 0x96: low 6 -> 4.0, high 9 -> -0.5.
  blocks, scales = _one_group([0x54, 0x96], 125)
  np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales)[:4], [0.5, 0.75, 1.0, -0.125])


def test_groups_and_leading_axes():
  # blocks [E=1, R=2, G=2, 16]: each group has its own scale; group g starts at element 32g.
  blocks = np.zeros((1, 2, 2, 16), np.uint8)
  scales = np.full((1, 2, 2), 127, np.uint8)
  blocks[0, 0, 1, 0] = 0x07       # row 0, element 32 = 6.0, element 33 = 0
  scales[0, 0, 1] = 126           # x 0.5
  blocks[0, 1, 0, 15] = 0xE0      # row 1, element 30 = 0, element 31 = -4.0
  scales[0, 1, 0] = 130           # x 8
  w = mxfp4.dequantize(blocks, scales)
  assert w.shape == (1, 2, 64)
  want = np.zeros((1, 2, 64), np.float32)
  want[0, 0, 32] = 3.0
  want[0, 1, 31] = -32.0
  np.testing.assert_array_equal(w, want)


def test_matches_transformers_dequantizer():
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
  scales = rng.integers(90, 160, (3, 5, 4), dtype=np.uint8)
  scales[0, 0, 0], scales[1, 2, 3] = 0, 200  # extreme exponents, subnormal and large
  ours = mxfp4.dequantize(blocks, scales)
  for dtype in (torch.float32, torch.bfloat16):
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    # transformers returns [E, in, out]; the dequantized matrix itself is [E, out, in].
    ref = ref.float().numpy().transpose(0, 2, 1)
    np.testing.assert_array_equal(ours, ref)


def test_every_scale_and_byte_matches_transformers():
  """The decoder's (scale, byte) table against transformers for all 256 x 256 pairs in fp32: subnormal results at
  the lowest scales, and inf where 6 * 2**128 overflows at scale 255."""
  blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 16, 16))[None].copy()
  scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 16))[None].copy()
  ours = mxfp4.dequantize(blocks, scales)
  ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
  ref = ref.numpy().transpose(0, 2, 1)
  assert np.isinf(ours[0, 255]).any() and (0 < np.abs(ours[0, 0][ours[0, 0] != 0])).all()
  np.testing.assert_array_equal(ours, ref)


def test_windows_read_only_their_part(tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import save_file

  rng = np.random.default_rng(1)
  blocks = rng.integers(0, 256, (4, 6, 3, 16), dtype=np.uint8)
  scales = rng.integers(110, 140, (4, 6, 3), dtype=np.uint8)
  full = mxfp4.dequantize(blocks, scales)
  save_file({"b": blocks, "s": scales}, str(tmp_path / "w.safetensors"))
  f = safe_open(str(tmp_path / "w.safetensors"), framework="numpy")
  for experts, rows, cols in [(slice(1, 3), slice(0, 6), slice(0, 96)), (slice(0, 4), slice(2, 5), slice(40, 70)),
                              (slice(3, 4), slice(5, 6), slice(31, 33)), (None, None, slice(64, 96))]:
    want = full[experts or slice(None), rows or slice(None), cols]
    np.testing.assert_array_equal(
        mxfp4.dequantize_window(blocks, scales, experts=experts, rows=rows, cols=cols), want)
    np.testing.assert_array_equal(
        mxfp4.dequantize_window(f.get_slice("b"), f.get_slice("s"), experts=experts, rows=rows, cols=cols), want)


def test_quantize_rounds_to_nearest_with_power_of_two_scale():
  g = np.zeros(32, np.float32)
  # amax 3 -> the smallest 2**k with 3 <= 6 * 2**k is 2**-1 (scale byte 126); elements are then x / 0.5:
  # 6 -> 6 exactly; 0.6 -> 0.5; -2.2 -> -2; 1.48 -> 1.5; 1.25 ties 1 / 1.5 -> 1 (even code 2);
  # 2.5 ties 2 / 3 -> 2 (even code 4); 0.25 ties 0 / 0.5 -> 0.
  g[:8] = [3.0, 0.3, -1.1, 0.74, 0.625, 1.25, 0.125, 0.0]
  blocks, scales = mxfp4.quantize(g)
  assert scales.tolist() == [126]
  # Codes 7, 1, 12 (sign | 4), 3, 2, 4, 0, 0; two a byte, the even element in the low nibble.
  assert blocks[0, :4].tolist() == [0x17, 0x3C, 0x42, 0x00]
  np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales)[:8],
                                [3.0, 0.25, -1.0, 0.75, 0.5, 1.0, 0.0, 0.0])


def test_quantize_exact_on_grid_and_edge_scales():
  rng = np.random.default_rng(2)
  codes = rng.integers(0, 16, (3, 4, 64))
  exps = rng.integers(-20, 20, (3, 4, 2))
  w = mxfp4.FP4_VALUES[codes] * np.exp2(np.repeat(exps, 32, axis=-1)).astype(np.float32)
  w[..., ::32] = 6.0 * np.exp2(exps)  # each group reaches 6 * 2**k: that is the scale
  blocks, scales = mxfp4.quantize(w)
  assert blocks.shape == (3, 4, 2, 16) and scales.shape == (3, 4, 2)
  np.testing.assert_array_equal(scales.astype(int) - 127, exps)
  np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales), w)
  # An all-zero group takes the smallest scale; 48 = 6 * 2**3 takes exactly 2**3 (byte 130).
  b, s = mxfp4.quantize(np.concatenate([np.zeros(32), np.full(32, 48.0)]).astype(np.float32))
  assert s.tolist() == [0, 130] and b[0].tolist() == [0] * 16 and b[1].tolist() == [0x77] * 16
  with pytest.raises(ValueError, match="multiple of 32"):
    mxfp4.quantize(np.zeros((2, 40), np.float32))
