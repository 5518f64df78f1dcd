"""The weight map's layouts: each converts both ways exactly, and its row axis is what the loader reads and the
exporter writes in pieces (a range of it is one contiguous run of HF rows)."""

import numpy as np
import pytest

from numina_jax.hf import keymap
from numina_jax.hf.load import WINDOWS
from numina_jax.model.config import tiny_config
from numina_jax.model.params import param_specs

# Distinct sizes, so a swapped axis cannot pass: 6 query heads of 16 over 2 kv heads, hidden 40, 5 experts of 24.
CFG = tiny_config(hidden_size=40, intermediate_size=24, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                  num_local_experts=5, num_experts_per_tok=2, vocab_size=301)


@pytest.mark.parametrize("entry", keymap.ENTRIES, ids=lambda e: e.hf_name)
def test_layout_round_trip_and_row_axis(entry):
  hf = np.random.default_rng(0).normal(size=entry.hf_shape(CFG)).astype(np.float32)
  ours = entry.to_ours(hf, CFG)
  specs = param_specs(CFG)
  for target, part in zip(entry.targets, ours):
    spec = specs[("layers/" if entry.per_layer else "") + target]
    assert part.shape == spec.shape[1 if entry.per_layer else 0:], target
  np.testing.assert_array_equal(entry.to_hf(ours, CFG), hf)

  axis, per = entry.row_axis, entry.rows_per_index(CFG)
  n = ours[0].shape[axis]
  assert n * per == hf.shape[0], (entry.hf_name, n, per, hf.shape)
  r0, r1 = n // 3, n // 3 + max(1, n // 2)
  window = tuple(slice(r0, r1) if a == axis else slice(None) for a in range(ours[0].ndim))
  # The rows [r0, r1) of our row axis are exactly the HF rows [r0 * per, r1 * per), in both directions.
  np.testing.assert_array_equal(entry.to_hf(tuple(o[window] for o in ours), CFG), hf[r0 * per:r1 * per])
  for got, want in zip(entry.to_ours(hf[r0 * per:r1 * per], CFG), ours):
    np.testing.assert_array_equal(got, want[window])


def test_every_layout_has_a_windowed_reader():
  assert set(WINDOWS) == set(keymap.LAYOUTS)
  assert {e.layout for e in keymap.ENTRIES} == set(keymap.LAYOUTS)
  with pytest.raises(ValueError, match="unknown layout 'rows'"):
    keymap.Entry("x.weight", ("x",), lambda c: (1,), "rows")
