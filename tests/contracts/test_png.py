"""What `decode_mask_png` accepts as a mask: 0 and one other grey level, or a 1-bit PNG; each
refusal names the problem."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pecbir_contracts.png import InvalidImage, decode_mask_png, encode_png


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0, 9], [9, 0]], [[False, True], [True, False]]),  # 0 and one level
        ([[7, 7], [7, 7]], [[True, True], [True, True]]),  # one non-zero level only
        ([[0, 255], [0, 0]], [[False, True], [False, False]]),  # as encode_png writes a mask
    ],
)
def test_binary_grey_masks_decode(values, expected):
    mask = decode_mask_png(encode_png(np.array(values, dtype=np.uint8)))
    assert mask.dtype == bool and mask.tolist() == expected


@pytest.mark.parametrize(
    "values, message",
    [
        ([[0, 3], [5, 0]], r"not binary \(values 0, 3, 5\)"),
        ([[4, 9], [9, 4]], r"not binary \(values 4, 9\)"),  # two levels, neither 0
        ([[0, 0], [0, 0]], r"empty \(no tumour pixel\)"),
    ],
)
def test_other_masks_are_refused_with_the_reason(values, message):
    with pytest.raises(InvalidImage, match=message):
        decode_mask_png(encode_png(np.array(values, dtype=np.uint8)))


def test_one_bit_masks_decode():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 1], [1, 1]], dtype=bool)).save(buffer, format="PNG")
    assert decode_mask_png(buffer.getvalue()).tolist() == [[False, True], [True, True]]
