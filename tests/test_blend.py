"""The overlay's colour blend: the documented formula, in place only inside the masks, any frame layout."""

import numpy as np
import pytest

from refstream.outputs import PALETTE, blend_masks


def float_blend(frame: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    """The formula of blend_masks' docstring for one mask, in float32 over the whole frame."""
    out = frame.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_one_mask_follows_the_formula_exactly(alpha):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = rng.random((37, 53)) > 0.5
    got = blend_masks(frame, mask[None], alpha)
    np.testing.assert_array_equal(got, float_blend(frame, mask, PALETTE[0], alpha))


def test_known_pixel_values():
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[0, 0] = (100, 200, 255)
    mask = np.zeros((1, 2, 2), bool)
    mask[0, 0, 0] = True
    got = blend_masks(frame, mask)
    # PALETTE[0] = (230, 25, 75): (100 + 230) / 2 = 165, (200 + 25) / 2 = 112.5 -> 112, (255 + 75) / 2 = 165
    assert got[0, 0].tolist() == [165, 112, 165]
    assert got[0, 1].tolist() == [0, 0, 0] and got[1].tolist() == [[0, 0, 0], [0, 0, 0]]


def test_disjoint_masks_each_get_their_colour_and_the_rest_is_untouched():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 2:10, 5:20] = True
    masks[1, 20:30, 40:58] = True  # mask 2 stays empty
    before = frame.copy()
    got = blend_masks(frame, masks)
    np.testing.assert_array_equal(frame, before)  # the input is not modified
    want = float_blend(float_blend(frame, masks[0], PALETTE[0], 0.5), masks[1], PALETTE[1], 0.5)
    np.testing.assert_array_equal(got, want)
    outside = ~masks.any(axis=0)
    np.testing.assert_array_equal(got[outside], frame[outside])


def test_overlapping_masks_stay_within_rounding_of_the_float_blend():
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    masks = rng.random((9, 30, 30)) > 0.3
    out = frame.astype(np.float32)
    for n, mask in enumerate(masks):
        out[mask] = 0.7 * out[mask] + 0.3 * PALETTE[n % len(PALETTE)]
    want = out.clip(0, 255).astype(np.int32)
    diff = np.abs(blend_masks(frame, masks, 0.3).astype(np.int32) - want)
    depth = masks.sum(axis=0)  # one truncation per mask covering the pixel
    assert (diff <= np.maximum(depth, 0)[..., None]).all()


def test_non_contiguous_frames_are_blended_like_contiguous_ones():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    rotated = np.rot90(frame)  # what PyAV's rotation handling yields: a strided view
    mask = np.zeros((1, 40, 50), bool)
    mask[0, 5:30, 10:45] = True
    np.testing.assert_array_equal(blend_masks(rotated, mask), blend_masks(np.ascontiguousarray(rotated), mask))
