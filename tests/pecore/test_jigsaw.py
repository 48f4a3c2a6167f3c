"""The jigsaw solver (`pecore.jigsaw`): group laws, pe-roi's transforms, solving real puzzles."""

import numpy as np
import pytest
from scipy import ndimage

from pecore import jigsaw
from pecore.cipher_roi import RoiTileKeys, _dihedral, apply_tile_transforms


def test_states_form_a_group_and_orient_acts_as_it():
    tile = np.arange(36, dtype=np.uint8).reshape(6, 6)
    for a in range(jigsaw.N_STATES):
        assert jigsaw.compose(a, jigsaw.invert(a)) == 0
        np.testing.assert_array_equal(jigsaw.orient(jigsaw.orient(tile, a), jigsaw.invert(a)), tile)
        for b in range(0, jigsaw.N_STATES, 3):
            np.testing.assert_array_equal(
                jigsaw.orient(jigsaw.orient(tile, b), a), jigsaw.orient(tile, jigsaw.compose(a, b))
            )


@pytest.mark.parametrize("code", range(16))
def test_the_true_state_undoes_pe_roi_transform_codes(code):
    tile = np.arange(64, dtype=np.uint8).reshape(8, 8)
    moved = _dihedral(tile, code)
    if code & 8:
        moved = 255 - moved
    np.testing.assert_array_equal(jigsaw.orient(moved, jigsaw.state_of_roi_code(code)), tile)


def _smooth_image(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 6)
    field = (field - field.min()) / (field.max() - field.min())
    return (40 + 180 * field).astype(np.uint8)


@pytest.mark.parametrize("states", [1, 8, 16])
def test_solver_reassembles_a_smooth_image_scrambled_and_transformed(states):
    image = _smooth_image(128, seed=states)
    b, grid = 16, (8, 8)
    rng = np.random.default_rng(0)
    keys = RoiTileKeys(
        permutation=rng.permutation(64), codes=rng.integers(0, states, 64).astype(np.uint8)
    )
    moved = apply_tile_transforms(image, keys, b, negate=np.ones_like(image, dtype=bool))
    tiles = moved.reshape(8, b, 8, b).swapaxes(1, 2).reshape(-1, b, b)
    true_cell = np.stack(np.divmod(keys.permutation, 8), axis=1)
    true_state = np.array([jigsaw.state_of_roi_code(int(c)) for c in keys.codes])
    assembly = jigsaw.solve(tiles, states=states)
    score = jigsaw.evaluate_assembly(
        assembly, tiles, true_cell=true_cell, true_state=true_state, grid=grid
    )
    assert score.neighbour_accuracy > 0.9 and score.direct_accuracy > 0.9
    oracle = jigsaw.oracle_image(tiles, true_cell=true_cell, true_state=true_state, grid=grid)
    np.testing.assert_array_equal(oracle, image)
    # a random assembly scores near chance
    chance = jigsaw.Assembly(
        cluster=np.arange(64), cell=np.zeros((64, 2), int), state=np.zeros(64, int)
    )
    random = jigsaw.evaluate_assembly(
        chance, tiles, true_cell=true_cell, true_state=true_state, grid=grid
    )
    assert random.neighbour_accuracy == 0.0


def test_attack_slice_scores_every_stage_of_pe_roi_and_pe():
    from pecore.datasets import make_synthetic

    data = make_synthetic(n_images=2, size=64, seed=1)
    rng = np.random.default_rng(2)
    stream = rng.integers(0, 256, 64 * 64).astype(np.uint8)
    stream[rng.random(stream.size) < 0.5] = 0
    result = jigsaw.attack_slice(
        data.images[0], data.masks[0], scheme="pe-roi", stream=stream, nonce="1", radius=6
    )
    assert set(result.scores) == {"pixel", "jigsaw", "oracle", "random placement"}
    for stage in result.scores.values():
        assert -1.0 <= stage["ssim_full"] <= 1.0 and -1.0 <= stage["ssim_roi"] <= 1.0
    assert 0.0 <= result.scores["jigsaw"]["direct_accuracy"] <= 1.0
    pe = jigsaw.attack_slice(data.images[0], data.masks[0], scheme="ours", stream=stream, nonce="1")
    assert set(pe.scores) == {"pixel"}
