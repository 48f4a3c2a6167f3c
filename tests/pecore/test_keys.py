"""Known-answer and agreement tests for the pinned SSLM key stream (method-spec §10)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from pecore.keys import (
    ImageKey,
    MasterKey,
    SSLMKey,
    _orbit,
    _orbit_pow,
    derive_image_key,
    key_stream,
    key_stream_reference,
    key_streams,
    sslm_orbit_reference,
    stream_check,
    stream_defects,
)

PAPER_KEY = SSLMKey()
N_512 = 512 * 512


def test_kat_n16_orbit_and_stream():
    u0 = sslm_orbit_reference(0.47, 3.71, 0.2, 1000, 16)
    assert u0[:3].tolist() == [0.10209997592709914, 0.41173488644571926, 0.9540561019926768]
    assert u0[15] == 0.5718432729161459
    assert np.array_equal(_orbit(0.47, 3.71, 0.2, 1000, 16), u0)
    expected = [0, 0, 0, 65, 0, 0, 0, 0, 0, 0, 0, 0, 157, 246, 21, 222]
    assert key_stream(PAPER_KEY, 16).tolist() == expected
    assert key_stream_reference(PAPER_KEY, 16).tolist() == expected


def test_kat_512_squared():
    u0 = _orbit(0.47, 3.71, 0.2, 1000, N_512)
    assert u0[-1] == 0.14918790032786242
    k = key_stream(PAPER_KEY, N_512)
    assert k[:16].tolist() == [133, 0, 227, 65, 0, 218, 107, 44, 0, 14, 123, 111, 157, 246, 21, 0]
    assert k[-8:].tolist() == [0, 219, 0, 0, 0, 67, 41, 0]
    assert int(k.sum(dtype=np.int64)) == 16_683_813
    assert int(np.count_nonzero(k)) == 130_409


def test_kat_512_squared_pure_python_reference():
    # The slow CPython path (math.sin, ** 2) must agree with the numba kernel on the long KAT.
    assert np.array_equal(key_stream_reference(PAPER_KEY, N_512), key_stream(PAPER_KEY, N_512))


@pytest.mark.parametrize("seed", range(6))
def test_fast_square_matches_libm_pow_over_long_orbits(seed):
    # _libm_square skips most pow calls; it must never change a single iterate.
    x0 = np.random.default_rng(seed).uniform(0.05, 0.95)
    for r in (3.71, 3.715, 3.7157):
        assert np.array_equal(_orbit(x0, r, 0.2, 0, 300_000), _orbit_pow(x0, r, 0.2, 0, 300_000))


def test_every_generation_path_agrees_for_derived_keys():
    master = MasterKey.from_seed(7)
    keys = [derive_image_key(master, f"img-{i}", 3000) for i in range(5)]
    batch = key_streams([k.sslm for k in keys], 3000)
    for key, row in zip(keys, batch, strict=True):
        single = key.stream()
        assert np.array_equal(row, single)
        assert np.array_equal(key_stream_reference(key.sslm, 3000), single)
        assert stream_check(single) == key.check


def test_stream_depends_on_size():
    assert not np.array_equal(key_stream(PAPER_KEY, 4096)[:16], key_stream(PAPER_KEY, 4097)[:16])


def test_derived_keys_are_deterministic_distinct_and_valid():
    master = MasterKey.from_seed(1)
    a1 = derive_image_key(master, "a", N_512)
    assert derive_image_key(master, "a", N_512) == a1
    b = derive_image_key(master, "b", N_512)
    other = derive_image_key(MasterKey.from_seed(2), "a", N_512)
    assert len({a1.sslm, b.sslm, other.sslm}) == 3
    for key in (a1, b, other):
        assert 0.05 <= key.sslm.x0 <= 0.95
        for r, base in zip(key.sslm.r, (3.71, 3.715, 3.7157), strict=True):
            assert 0 <= r - base < 1e-6
        stream = key.stream()
        assert not stream_defects(stream)
        assert abs(np.count_nonzero(stream) / stream.size - 0.498) < 0.01
    # Different keys leave different pixels in the clear.
    overlap = np.mean((a1.stream() == 0) == (b.stream() == 0))
    assert 0.45 < overlap < 0.55


def test_check_value_mismatch_is_refused():
    key = derive_image_key(MasterKey.from_seed(1), "a", 1024)
    forged = ImageKey(**{**key.model_dump(), "check": "sha256:0000000000000000"})
    with pytest.raises(ValueError, match="check mismatch"):
        forged.stream()


def test_stream_defects_flag_periodic_like_streams():
    assert stream_defects(np.zeros(65536, dtype=np.uint8))
    assert stream_defects(np.full(65536, 7, dtype=np.uint8))
    ramp = np.where(np.arange(65536) % 2 == 0, 0, 1 + np.arange(65536) % 10).astype(np.uint8)
    assert any("not flat" in d for d in stream_defects(ramp))
    assert not stream_defects(key_stream(PAPER_KEY, 65536))


@pytest.mark.parametrize(
    "params",
    [{"x0": 0.0}, {"x0": 1.0}, {"x0": float("nan")}, {"mu": 1.5}, {"r": (3.71, 3.9, 3.7)}],
)
def test_invalid_sslm_parameters(params):
    with pytest.raises(ValueError):
        SSLMKey(**params)


def test_key_stream_rejects_empty_size():
    with pytest.raises(ValueError, match="n_pixels"):
        key_stream(PAPER_KEY, 0)


def test_master_key_file_is_0600_and_never_overwritten(tmp_path):
    key = MasterKey.generate()
    path = key.save(tmp_path / "m.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert MasterKey.load(path) == key
    with pytest.raises(FileExistsError):
        MasterKey.generate().save(path)
    secret = key.secret.get_secret_value()
    assert secret.hex() not in repr(key) and secret.hex() not in str(key)


def test_master_key_load_refuses_open_permissions_and_corruption(tmp_path):
    path = MasterKey.generate().save(tmp_path / "m.key")
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="0600"):
        MasterKey.load(path)
    os.chmod(path, 0o600)
    path.write_text(path.read_text().replace('"key_id": "', '"key_id": "x'))
    with pytest.raises(ValueError, match="key_id"):
        MasterKey.load(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a valid master key"):
        MasterKey.load(path)
