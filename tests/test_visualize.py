"""Pictures: image grids, level-map frames and GIFs, written atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax import visualize
from asyncpatch_jax.pixels import to_uint8


def read_grid(path, num, image_shape, nrow=None, border=2):
  """Decodes a PNG grid written by `save_image_grid` and checks its layout: the size for `num`
  images of `image_shape` (H, W, C), `nrow` per row (default ⌈√num⌉), the mode, and white
  borders and unused cells. Returns the tiles, uint8 `[num, H, W, C]`, for the caller's checks.

  The end-to-end tests decode their sample grids with it (`from test_visualize import read_grid`).
  """
  h, w, c = image_shape
  nrow = max(1, min(num, nrow or int(np.ceil(np.sqrt(num)))))
  rows = -(-num // nrow)
  with Image.open(path) as im:
    assert im.mode == {1: "L", 3: "RGB"}[c], (path, im.mode)
    assert im.size == (nrow * (w + border) + border, rows * (h + border) + border), (path, im.size)
    pixels = np.asarray(im).reshape(im.size[1], im.size[0], c)
  tiles, background = [], np.ones(pixels.shape[:2], bool)
  for i in range(rows * nrow):
    r, col = divmod(i, nrow)
    y, x = border + r * (h + border), border + col * (w + border)
    if i < num:
      tiles.append(pixels[y:y + h, x:x + w])
      background[y:y + h, x:x + w] = False
  assert (pixels[background] == 255).all(), f"{path}: borders or empty cells are not white"
  return np.stack(tiles)


def assert_not_constant(tiles, what):
  """Each tile has more than one value, and the tiles are not all the same picture."""
  flat = tiles.reshape(len(tiles), -1)
  assert all(len(np.unique(t)) > 1 for t in flat), f"{what}: a constant tile"
  assert len(np.unique(flat, axis=0)) > 1, f"{what}: every tile is the same picture"


def test_image_grid_layout_and_values(tmp_path):
  images = np.full((5, 4, 6, 3), -1.0, np.float32)
  images[1] = 1.0
  images[2, 0, 0] = [0.0, 0.5, 2.0]  # 2.0 clips to white
  path = tmp_path / "grid.png"
  visualize.save_image_grid(images, path, nrow=2)
  with Image.open(path) as im:
    assert im.mode == "RGB" and im.size == (2 * (6 + 2) + 2, 3 * (4 + 2) + 2)
    pixels = np.asarray(im)
  tiles = read_grid(path, 5, (4, 6, 3), nrow=2)  # the sixth cell stays white
  np.testing.assert_array_equal(tiles, to_uint8(images))
  assert (pixels[2:6, 2:8] == 0).all()  # image 0: −1 → 0
  assert (pixels[2:6, 10:16] == 255).all()  # image 1: 1 → 255
  assert pixels[8, 2].tolist() == [128, 191, 255]  # image 2, pixel (0, 0)
  assert (pixels[0] == 255).all()  # white border
  assert os.listdir(tmp_path) == ["grid.png"]  # no temporary left behind


def test_grayscale_grid_and_default_rows(tmp_path):
  path = tmp_path / "gray.png"
  visualize.save_image_grid(np.zeros((10, 3, 3, 1)), path)
  with Image.open(path) as im:
    assert im.mode == "L" and im.size == (4 * 5 + 2, 3 * 5 + 2)  # ⌈√10⌉ = 4 per row
  with pytest.raises(ValueError, match="1 or 3 channels"):
    visualize.save_image_grid(np.zeros((2, 3, 3, 4)), tmp_path / "bad.png")


def test_level_map_frames_and_gif(tmp_path):
  steps = np.linspace(1.0, 0.0, 6)
  maps = np.broadcast_to(steps[:, None, None, None], (6, 3, 4, 4)).copy()
  maps[:, :, 0, 0] = 0.0  # a known token
  frames = visualize.level_map_frames(maps)
  assert frames.shape[0] == 6 and frames.dtype == np.uint8 and frames.shape[-1] == 3
  scale = 16  # ⌈64 / 4⌉ pixels per token
  first, last = frames[0], frames[-1]
  noise_px, clean_px = first[2 + scale, 2 + scale], first[2, 2]
  assert not np.array_equal(noise_px, clean_px)
  np.testing.assert_array_equal(last[2 + scale, 2 + scale], clean_px)  # all clean at the end
  path = tmp_path / "levels.gif"
  visualize.save_level_map_gif(maps, path)
  with Image.open(path) as im:
    assert im.n_frames == 6 and im.info.get("loop") == 0
  long = np.broadcast_to(np.linspace(1.0, 0.0, 600)[:, None, None, None], (600, 1, 2, 2))
  visualize.save_level_map_gif(long, path, max_frames=50)
  with Image.open(path) as im:
    assert im.n_frames == 50  # subsampled (PIL would also merge identical frames)
  one_d = visualize.level_map_frames(np.linspace(1, 0, 3)[:, None, None].repeat(8, 2))
  assert one_d.shape[0] == 3
  visualize.save_level_map_strip(maps, tmp_path / "strip.png", num_frames=3)
  assert (tmp_path / "strip.png").exists()


def test_masked_images_grey_out_unknown_tokens():
  images = np.ones((1, 4, 4, 3), np.float32)
  mask = np.array([[[True, False], [False, True]]])
  out = visualize.masked_images(images, mask)
  assert (out[0, :2, :2] == 1).all() and (out[0, :2, 2:] == 0).all() and (out[0, 2:, 2:] == 1).all()


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "out.png"
  path.write_bytes(b"old")
  with pytest.raises(ValueError, match="1 or 3 channels"):  # fails while writing the picture
    visualize.save_image_grid(np.zeros((2, 3, 3, 4)), path)
  assert path.read_bytes() == b"old"
  assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_read_grid_sees_a_wrong_layout_and_constant_tiles(tmp_path):
  """The checker the end-to-end tests use can fail: a wrong count per row, a wrong image size, a
  constant tile, identical tiles."""
  images = np.random.default_rng(0).uniform(-1, 1, (6, 5, 5, 1)).astype(np.float32)
  path = tmp_path / "grid.png"
  visualize.save_image_grid(images, path, nrow=3)
  tiles = read_grid(path, 6, (5, 5, 1), nrow=3)
  np.testing.assert_array_equal(tiles, to_uint8(images))
  assert_not_constant(tiles, "random images")
  for kwargs in ({"nrow": 2}, {"num": 5}, {"image_shape": (4, 5, 1)}):
    args = {"num": 6, "image_shape": (5, 5, 1), "nrow": 3} | kwargs
    with pytest.raises(AssertionError):
      read_grid(path, **args)
  with pytest.raises(AssertionError, match="constant tile"):
    assert_not_constant(np.zeros((2, 5, 5, 1), np.uint8) + np.array([0, 9])[:, None, None, None],
                        "flat")
  with pytest.raises(AssertionError, match="same picture"):
    assert_not_constant(np.repeat(tiles[:1], 3, axis=0), "copies")
