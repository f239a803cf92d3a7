"""Token-level masks: shapes, geometry, determinism, PNG round trips."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.sampling import masks

GRID = (16, 16)


@pytest.mark.parametrize("name", sorted(masks.MASKS))
def test_every_family_gives_token_level_bool_masks(name):
  m = masks.make_mask(name, 3, GRID, seed=0)
  assert m.shape == (3, *GRID) and m.dtype == bool
  assert m.any() and not m.all()  # something known and something to generate


def test_geometry():
  box = masks.box(1, GRID, size=0.5)[0]
  assert not box[4:12, 4:12].any() and box.sum() == 256 - 64
  half = masks.half(1, GRID, side="right")[0]
  assert half[:, :8].all() and not half[:, 8:].any()
  top = masks.half(1, GRID, side="top")[0]
  assert not top[:8].any() and top[8:].all()
  expand = masks.expand(1, GRID, keep=0.5)[0]
  assert expand[4:12, 4:12].all() and expand.sum() == 64
  lines = masks.alternating_lines(1, GRID)[0]
  assert lines[::2].all() and not lines[1::2].any()
  sr = masks.super_resolution(1, GRID, factor=2)[0]
  assert sr[::2, ::2].all() and sr.sum() == 64
  assert masks.super_resolution(1, (12,), factor=3)[0].tolist() == [True, False, False] * 4
  assert masks.half(1, (5,), side="left")[0].tolist() == [False, False, False, True, True]
  rnd = masks.random_tokens(200, GRID, seed=1, known_fraction=0.3)
  assert abs(rnd.mean() - 0.3) < 0.01


@pytest.mark.parametrize("name", ["box", "random_tokens", "narrow", "wide"])
def test_random_masks_are_deterministic_given_the_seed(name):
  kwargs = {"random_position": True} if name == "box" else {}
  a = masks.make_mask(name, 4, GRID, seed=3, **kwargs)
  b = masks.make_mask(name, 4, GRID, seed=3, **kwargs)
  c = masks.make_mask(name, 4, GRID, seed=4, **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # examples differ within a batch
  k1 = masks.make_mask(name, 2, GRID, seed=jax.random.key(5), **kwargs)
  k2 = masks.make_mask(name, 2, GRID, seed=jax.random.PRNGKey(5), **kwargs)
  np.testing.assert_array_equal(k1, k2)  # typed and raw JAX keys agree
  g = masks.make_mask(name, 2, GRID, seed=np.random.default_rng(6), **kwargs)
  np.testing.assert_array_equal(g, masks.make_mask(name, 2, GRID, seed=6, **kwargs))


def test_wide_strokes_hide_more_than_narrow_ones():
  """LaMa's settings at 256 × 256: thin strokes hide about 30%, thick strokes and boxes 59%."""
  narrow = 1 - masks.strokes(50, (256, 256), seed=0, width="narrow").mean()
  wide = 1 - masks.strokes(50, (256, 256), seed=0, width="wide").mean()
  assert 0.15 < narrow < 0.45 and 0.4 < wide < 0.75 and wide > narrow + 0.15


def test_png_round_trip_and_pixel_to_token(tmp_path):
  m = masks.strokes(1, GRID, seed=2, width="wide")
  path = tmp_path / "mask.png"
  masks.save_png(m, path)
  np.testing.assert_array_equal(masks.from_png(path, GRID, batch=2), np.repeat(m, 2, axis=0))
  np.testing.assert_array_equal(masks.from_png(path), m)
  inverted = tmp_path / "hole.png"  # LaMa's convention: white = hole
  Image.fromarray(np.where(m[0], 0, 255).astype(np.uint8)).save(inverted)
  np.testing.assert_array_equal(masks.from_png(inverted, GRID, invert=True), m)
  # A pixel-level mask (32 × 32) for patch size 2: a token is known iff all 4 pixels are.
  pixels = np.ones((32, 32), bool)
  pixels[5, 7] = False
  rgb = tmp_path / "pixels.png"
  Image.fromarray(np.stack([np.where(pixels, 255, 0).astype(np.uint8)] * 3, -1)).save(rgb)
  tokens = masks.from_png(rgb, GRID, patch_size=2)[0]
  assert tokens.sum() == 255 and not tokens[2, 3]
  np.testing.assert_array_equal(masks.to_token_mask(pixels[None], 2)[0], tokens)
  with pytest.raises(ValueError, match="token grid"):
    masks.from_png(rgb, (10, 10))


def test_mask_errors():
  with pytest.raises(ValueError, match="unknown mask"):
    masks.make_mask("circle", 1, GRID)
  with pytest.raises(ValueError, match="2-D"):
    masks.strokes(1, (16,), seed=0)
  with pytest.raises(ValueError, match="unknown side"):
    masks.half(1, (16,), side="top")
  with pytest.raises(ValueError, match="fraction"):
    masks.box(1, GRID, size=1.5)
  with pytest.raises(ValueError, match="not divisible"):
    masks.to_token_mask(np.ones((1, 5, 4), bool), 2)
