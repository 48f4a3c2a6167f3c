"""A jigsaw-puzzle solver for tile-scrambled cipher images, as a measurement tool (ciphertext-only).

Threat model: the attacker holds a tile-scrambled cipher image (`pecore.cipher_variants`
"<inner>-bs<b>", or pe-roi of `pecore.cipher_roi` with its cloud mask) and knows the scheme
(Kerckhoffs), not the key.  The attack runs in two stages, the way the Chuman & Kiya line of
attacks on block-scrambled images does:

1. pixel level: the best ciphertext-only reconstruction, tile by tile
   (`pecore.attacks.ClearPixelAttack` with ``tile=b``: the pixels "ours" left in the clear,
   inpainted and projected onto the values the substituted pixels allow);
2. placement: every non-blank tile is a piece that may be in any of the allowed states (the 8
   symmetries of the square and, against pe-roi's negative–positive transform, the
   negation of its kept pixels).  Pairwise compatibility of every piece side with every
   piece–state side is the Mahalanobis gradient compatibility of Gallagher (CVPR 2012) in its
   grey-level form, plus a penalty for disagreeing ROI-mask bits across the edge (pe-roi gives
   the attacker the moved ROI).  Pieces are then merged greedily, Kruskal-style, along the
   edges in order of their ratio to the side's second-best match, best buddies (Pomeranz et
   al. 2011: each is the other's best match) first; a merge that would put two pieces on one
   cell is refused (the loop/consistency constraint of Gallagher's tree-based solver).

`evaluate_assembly` scores an assembly against the truth: neighbour accuracy (true neighbour
pairs put side by side with the right relative state), direct accuracy (pieces in their own cell
and state) and the reassembled image.  The attacker does not know where the puzzle sits in
the slice, nor its global orientation or polarity: each assembled cluster is given the global
symmetry and translation that put most of its pieces right (generous to the attacker, so
conservative for the scheme).  `oracle_image` puts the stage-1 tiles back with the true keys:
the bound that no placement algorithm can exceed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage

__all__ = [
    "N_STATES",
    "Assembly",
    "JigsawAttackResult",
    "JigsawScore",
    "attack_slice",
    "compose",
    "evaluate_assembly",
    "invert",
    "oracle_image",
    "orient",
    "score_regions",
    "solve",
    "state_of_roi_code",
]

#: A piece's state: (dihedral index 0..7, polarity 0/1) packed as dihedral + 8·polarity.
N_STATES = 16
_ROT = np.array([[0, -1], [1, 0]])
_TRANSPOSE = np.array([[0, 1], [1, 0]])
#: Dihedral index d → 2×2 integer matrix acting on (row, col): R^(d & 3) · T^(d >> 2).
_MATRICES = np.stack(
    [
        np.linalg.matrix_power(_ROT, d & 3) @ np.linalg.matrix_power(_TRANSPOSE, d >> 2)
        for d in range(8)
    ]
)
_INDEX = {tuple(m.ravel()): d for d, m in enumerate(_MATRICES)}
#: relation name → offset (row, col) of the second piece from the first
_OFFSETS = {"right": (0, 1), "down": (1, 0), "left": (0, -1), "up": (-1, 0)}


def _mul(a: int, b: int) -> int:
    return _INDEX[tuple((_MATRICES[a] @ _MATRICES[b]).ravel())]


def compose(a: int, b: int) -> int:
    """State a ∘ b (apply b, then a)."""
    return _mul(a & 7, b & 7) + 8 * ((a >> 3) ^ (b >> 3))


def invert(a: int) -> int:
    """The state undoing `a`."""
    d = _INDEX[tuple(_MATRICES[a & 7].T.ravel())]
    return d + 8 * (a >> 3)


@cache
def _source_index(b: int, dihedral: int) -> np.ndarray:
    """Flat source pixel of every output pixel of a b×b tile moved by `dihedral`."""
    rows, cols = np.mgrid[0:b, 0:b]
    u = np.stack([2 * rows - (b - 1), 2 * cols - (b - 1)])
    v = np.tensordot(_MATRICES[dihedral], u, axes=1)
    index = np.empty((b, b), dtype=np.int64)
    index[(v[0] + b - 1) // 2, (v[1] + b - 1) // 2] = rows * b + cols
    return index.ravel()


def orient(tile: np.ndarray, state: int, kept: np.ndarray | None = None) -> np.ndarray:
    """`tile` moved by the symmetry of `state`: out[M·x] = tile[x] (x centred); with polarity,
    the pixels of `kept` (moved alike; all pixels when None) become 255 − value.  Works on one
    tile (b, b) or a stack (n, b, b) alike."""
    b = tile.shape[-1]
    index = _source_index(b, state & 7)
    out = tile.reshape(*tile.shape[:-2], b * b)[..., index].reshape(tile.shape)
    if state >> 3:
        if kept is None:
            out = 255 - out
        else:
            moved = orient(np.asarray(kept, dtype=bool), state & 7)
            out = np.where(moved, 255 - out, out)
    return out


def _roi_code_table() -> list[int]:
    from pecore.cipher_roi import _dihedral

    probe = np.arange(16).reshape(4, 4)
    table = []
    for code in range(8):
        moved = _dihedral(probe, code)
        table.append(next(d for d in range(8) if np.array_equal(orient(probe, d), moved)))
    return table


_ROI_CODES = _roi_code_table()


def state_of_roi_code(code: int) -> int:
    """The state that *undoes* pe-roi's transform code (`pecore.cipher_roi`): the true state of
    a piece whose key code is `code`."""
    return invert(_ROI_CODES[code & 7] + 8 * ((code >> 3) & 1))


# ------------------------------------------------------------------------------ compatibility
def _side_profiles(images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(edge, next-inner) rows/columns of every tile side, each (n, b), float64."""
    return {
        "right": (images[:, :, -1], images[:, :, -2]),
        "left": (images[:, :, 0], images[:, :, 1]),
        "down": (images[:, -1, :], images[:, -2, :]),
        "up": (images[:, 0, :], images[:, 1, :]),
    }


_OPPOSITE = {"right": "left", "left": "right", "down": "up", "up": "down"}


def _mgc(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], floor):
    """Grey-level MGC of every first side (n1) against every second side (n2): (n1, n2).

    D = Σ_r ((s_r − f_r) − μ_f)² / σ²_f  +  Σ_r ((f_r − s_r) − μ_s)² / σ²_s, where f, s are the
    touching edges, μ and σ² the mean and variance of the gradient across each piece's own edge
    (floored at `floor`, so flat pieces do not divide by zero).
    """
    f1, f2 = first
    s1, s2 = second
    gf = f1 - f2
    gs = s1 - s2
    mu_f, var_f = gf.mean(axis=1), np.maximum(gf.var(axis=1), floor)
    mu_s, var_s = gs.mean(axis=1), np.maximum(gs.var(axis=1), floor)
    shifted_f = f1 + mu_f[:, None]  # s − (f + μ_f)
    d1 = (
        (s1**2).sum(1)[None, :] + (shifted_f**2).sum(1)[:, None] - 2.0 * shifted_f @ s1.T
    ) / var_f[:, None]
    shifted_s = s1 + mu_s[:, None]  # f − (s + μ_s)
    d2 = (
        (f1**2).sum(1)[:, None] + (shifted_s**2).sum(1)[None, :] - 2.0 * f1 @ shifted_s.T
    ) / var_s[None, :]
    return np.maximum(d1, 0.0) + np.maximum(d2, 0.0)


@dataclass
class Assembly:
    """The solver's output: for every piece its cluster, cell (row, col) in that cluster's frame
    and state.

    Attributes
    ----------
    cluster : numpy.ndarray
        (n,) cluster id of each piece.
    cell : numpy.ndarray
        (n, 2) integer cell of each piece in its cluster's frame.
    state : numpy.ndarray
        (n,) state of each piece (see `N_STATES`).
    n_best_buddies : int
        Best-buddy pairs among the pieces.
    """

    cluster: np.ndarray
    cell: np.ndarray
    state: np.ndarray
    n_best_buddies: int = 0


def solve(
    tiles: np.ndarray,
    *,
    states: int = 1,
    masks: np.ndarray | None = None,
    kept: np.ndarray | None = None,
    mask_weight: float = 3.0,
    candidates: int = 24,
) -> Assembly:
    """Assemble `tiles` (n, b, b) by greedy Kruskal merging with collision checks.

    Parameters
    ----------
    tiles : numpy.ndarray
        The attacker's tile estimates (stage 1), as found in the cipher image.
    states : {1, 8, 16}
        Allowed states: position only, the 8 symmetries, or also the polarity.
    masks : numpy.ndarray, optional
        (n, b, b) bool ROI mask of every tile (pe-roi's cloud mask); mismatching mask bits
        across an edge add `mask_weight` × (median MGC of the sides' best matches) each.
    kept : numpy.ndarray, optional
        (n, b, b) bool: the pixels a polarity flip inverts (the attacker's guess of pe-roi's
        kept pixels); None = all.
    candidates : int
        Best (piece, state) matches kept per piece side as merge candidates.

    Returns
    -------
    Assembly
        The pieces' clusters, cells and states.
    """
    tiles = np.asarray(tiles, dtype=np.float64)
    n = tiles.shape[0]
    if states not in (1, 8, 16):
        raise ValueError(f"states must be 1, 8 or 16, got {states}")
    oriented = np.concatenate([orient(tiles, s, kept) for s in range(states)])  # index s·n + k
    base = _side_profiles(tiles)
    moved = _side_profiles(oriented)
    floor = max(1.0, float(np.median(np.abs(np.diff(tiles, axis=2)))) ** 2)
    costs = {rel: _mgc(base[rel], moved[_OPPOSITE[rel]], floor) for rel in _OFFSETS}
    if masks is not None:
        masks = np.asarray(masks, dtype=np.float64)
        mask_oriented = np.concatenate([orient(masks, s & 7) for s in range(states)])
        mask_base = _side_profiles(masks)
        mask_moved = _side_profiles(mask_oriented)
        scale = float(np.median([c.min(axis=1) for c in costs.values()]))
        for rel in _OFFSETS:
            a = mask_base[rel][0]
            c = mask_moved[_OPPOSITE[rel]][0]
            mismatch = a.sum(1)[:, None] + c.sum(1)[None, :] - 2.0 * a @ c.T
            costs[rel] = costs[rel] + mask_weight * scale * mismatch
    self_columns = np.arange(states)[:, None] * n + np.arange(n)[None, :]
    for rel in _OFFSETS:
        costs[rel][np.arange(n)[:, None], self_columns.T] = np.inf
    # ratio to the second-best *other piece* of each side (Gallagher's normalisation)
    edges = []
    best_of = {}
    for r, rel in enumerate(_OFFSETS):
        cost = costs[rel]
        per_piece = cost.reshape(n, states, n).min(axis=1)
        second = np.partition(per_piece, 1, axis=1)[:, 1] if n > 2 else per_piece.min(axis=1)
        order = np.argsort(cost, axis=1)[:, :candidates]
        best_of[rel] = order[:, 0]
        for i in range(n):
            for rank, column in enumerate(order[i]):
                value = cost[i, column]
                if not np.isfinite(value):
                    continue
                ratio = value / (second[i] + 1e-9)
                edges.append((ratio, rank, i, int(column % n), int(column // n), r))
    # best buddies: j (state s) is i's best on `rel`, and i is j's best on the matching side
    rel_names = list(_OFFSETS)
    buddies = set()
    for r, rel in enumerate(rel_names):
        for i in range(n):
            column = int(best_of[rel][i])
            j, s = column % n, column // n
            # in j's frame: i sits at M_s⁻¹·(−offset) with state s⁻¹
            inverse = invert(s)
            offset = _MATRICES[inverse & 7] @ -np.array(_OFFSETS[rel])
            back = rel_names[[tuple(o) for o in _OFFSETS.values()].index(tuple(offset))]
            reverse = int(best_of[back][j])
            if reverse % n == i and reverse // n == inverse:
                buddies.add((i, j, s, r))
    edges.sort(key=lambda e: ((e[2], e[3], e[4], e[5]) not in buddies, e[0], e[1]))
    assembly = _kruskal(n, edges)
    assembly.n_best_buddies = len(buddies)
    return assembly


def _kruskal(n: int, edges: list) -> Assembly:
    """Merge pieces along `edges` (in order) unless a merge puts two pieces on one cell."""
    cluster = np.arange(n)
    cell = np.zeros((n, 2), dtype=np.int64)
    state = np.zeros(n, dtype=np.int64)
    members = {k: [k] for k in range(n)}
    occupied = {k: {(0, 0): k} for k in range(n)}
    offsets = list(_OFFSETS.values())
    for _, _, i, j, s, r in edges:
        ci, cj = cluster[i], cluster[j]
        if ci == cj:
            continue
        mi = _MATRICES[state[i] & 7]
        needed = compose(int(state[i]), s)
        transform = compose(needed, invert(int(state[j])))
        mt = _MATRICES[transform & 7]
        anchor = cell[i] + mi @ np.array(offsets[r])
        moved = {k: anchor + mt @ (cell[k] - cell[j]) for k in members[cj]}
        if any(tuple(p) in occupied[ci] for p in moved.values()):
            continue  # two pieces on one cell: refuse the merge
        small, large = (cj, ci)
        for k, p in moved.items():
            cell[k] = p
            state[k] = compose(transform, int(state[k]))
            cluster[k] = large
            occupied[large][tuple(p)] = k
        members[large].extend(members.pop(small))
        del occupied[small]
        if len(members) == 1:
            break
    return Assembly(cluster=cluster, cell=cell, state=state)


# ------------------------------------------------------------------------------ scoring
@dataclass
class JigsawScore:
    """How well an assembly matches the truth.

    Attributes
    ----------
    neighbour_accuracy : float
        True neighbour pairs (both pieces) placed side by side with the right relative state.
    direct_accuracy : float
        Pieces in their own cell and state after their cluster's best global alignment.
    image : numpy.ndarray
        The reassembled image (pieces at their aligned cells, 0 elsewhere).
    largest_cluster : int
        Pieces in the largest cluster.
    """

    neighbour_accuracy: float
    direct_accuracy: float
    image: np.ndarray
    largest_cluster: int


def evaluate_assembly(
    assembly: Assembly,
    tiles: np.ndarray,
    *,
    true_cell: np.ndarray,
    true_state: np.ndarray,
    grid: tuple[int, int],
    kept: np.ndarray | None = None,
) -> JigsawScore:
    """Score `assembly` of `tiles` against the truth (see the module docstring).

    Parameters
    ----------
    assembly : Assembly
        The solver's output.
    tiles : numpy.ndarray
        (n, b, b) the attacker's tile estimates, as found.
    true_cell : numpy.ndarray
        (n, 2) each piece's cell in the plain image's tile grid.
    true_state : numpy.ndarray
        (n,) the state that restores each piece.
    grid : tuple of int
        (rows, cols) of the plain image's tile grid.
    kept : numpy.ndarray, optional
        As for `solve` (the pixels polarity flips).
    """
    n, b = tiles.shape[0], tiles.shape[1]
    true_cell = np.asarray(true_cell)
    position = {tuple(p): k for k, p in enumerate(true_cell)}
    pairs = 0
    right_pairs = 0
    for k, p in enumerate(true_cell):
        for d in ((0, 1), (1, 0)):
            other = position.get((p[0] + d[0], p[1] + d[1]))
            if other is None:
                continue
            pairs += 1
            if assembly.cluster[k] != assembly.cluster[other]:
                continue
            relative = compose(invert(int(assembly.state[k])), int(assembly.state[other]))
            relative_true = compose(invert(int(true_state[k])), int(true_state[other]))
            offset = _MATRICES[assembly.state[k] & 7].T @ (assembly.cell[other] - assembly.cell[k])
            offset_true = _MATRICES[true_state[k] & 7].T @ (true_cell[other] - true_cell[k])
            if relative == relative_true and np.array_equal(offset, offset_true):
                right_pairs += 1
    image = np.zeros((grid[0] * b, grid[1] * b), dtype=np.uint8)
    filled = np.zeros(grid, dtype=bool)
    correct = 0
    clusters = sorted(set(assembly.cluster.tolist()), key=lambda c: -np.sum(assembly.cluster == c))
    for c in clusters:
        pieces = np.flatnonzero(assembly.cluster == c)
        votes: dict[tuple[int, int, int], int] = {}
        for k in pieces:
            g = compose(int(true_state[k]), invert(int(assembly.state[k])))
            shift = true_cell[k] - _MATRICES[g & 7] @ assembly.cell[k]
            key = (g, int(shift[0]), int(shift[1]))
            votes[key] = votes.get(key, 0) + 1
        (g, r0, c0), hits = max(votes.items(), key=lambda kv: kv[1])
        correct += hits
        for k in pieces:
            where = _MATRICES[g & 7] @ assembly.cell[k] + np.array([r0, c0])
            if not (0 <= where[0] < grid[0] and 0 <= where[1] < grid[1]) or filled[tuple(where)]:
                continue
            filled[tuple(where)] = True
            s = compose(g, int(assembly.state[k]))
            piece = orient(tiles[k], s, None if kept is None else kept[k])
            image[where[0] * b : (where[0] + 1) * b, where[1] * b : (where[1] + 1) * b] = piece
    return JigsawScore(
        neighbour_accuracy=right_pairs / pairs if pairs else float("nan"),
        direct_accuracy=correct / n if n else float("nan"),
        image=image,
        largest_cluster=int(max(np.bincount(assembly.cluster))) if n else 0,
    )


def oracle_image(
    tiles: np.ndarray,
    *,
    true_cell: np.ndarray,
    true_state: np.ndarray,
    grid: tuple[int, int],
    kept: np.ndarray | None = None,
) -> np.ndarray:
    """The stage-1 tiles put back with the true keys (perfect placement: the solver's bound)."""
    b = tiles.shape[1]
    image = np.zeros((grid[0] * b, grid[1] * b), dtype=np.uint8)
    for k, (r, c) in enumerate(np.asarray(true_cell)):
        piece = orient(tiles[k], int(true_state[k]), None if kept is None else kept[k])
        image[r * b : (r + 1) * b, c * b : (c + 1) * b] = piece
    return image


# ------------------------------------------------------------------------------ the attack
@dataclass
class JigsawAttackResult:
    """One slice attacked: the scores and the images worth showing.

    Attributes
    ----------
    scores : dict
        ``pixel`` (stage 1 as found), ``jigsaw`` (stage 2), ``oracle`` (perfect placement) and
        ``random placement`` (the pieces at a random permutation of their true cells, random
        states: chance level), each with ``ssim_full``/``ssim_roi`` (and PSNR); ``jigsaw`` also
        with
        ``neighbour_accuracy``, ``direct_accuracy``, ``n_pieces``, ``largest_cluster``.
    images : dict of str to numpy.ndarray
        "cipher", "pixel", "jigsaw", "oracle".
    """

    scores: dict[str, dict[str, float]]
    images: dict[str, np.ndarray]


def score_regions(
    plain: np.ndarray, recovered: np.ndarray, mask: np.ndarray, *, radius: int = 24
) -> dict[str, float]:
    """SSIM/PSNR (best polarity each) on the full slice and inside the ROI (`mask` dilated by
    `radius`): ``ssim_full``, ``psnr_full``, ``ssim_roi``, ``psnr_roi``."""
    from pecore.attacks import score
    from pecore.roi import dilate_mask

    roi = dilate_mask(np.asarray(mask, dtype=bool), radius)
    full = score(plain, recovered)
    inside = score(plain, recovered, region=roi)
    return {
        "ssim_full": float(full["ssim"]),
        "psnr_full": float(full["psnr"]),
        "ssim_roi": float(inside["ssim"]),
        "psnr_roi": float(inside["psnr"]),
    }


def _grid_tiles(image: np.ndarray, b: int) -> np.ndarray:
    g0, g1 = image.shape[0] // b, image.shape[1] // b
    return image.reshape(g0, b, g1, b).swapaxes(1, 2).reshape(-1, b, b)


def attack_slice(
    plain: np.ndarray,
    mask: np.ndarray,
    *,
    scheme: str,
    stream: np.ndarray,
    nonce: str,
    radius: int = 24,
    content_threshold: float = 8.0,
    mask_weight: float = 3.0,
) -> JigsawAttackResult:
    """Encrypt one slice under `scheme`, attack it, score it (full slice and inside the ROI).

    Schemes: a registered scheme of `pecore.cipher` with clear pixels (no tiles: stage 1 only),
    a tile-scrambled variant "<inner>-bs<b>" (pieces: every tile, the scrambled ROI of
    `pecore.cipher_variants.scramble_mask` given to the solver, as the cloud has it) or pe-roi
    (pieces: the tiles with content or ROI; states as its transform set; its cloud mask).  The
    ROI scored is the tumour mask dilated by `radius` (what the features read).
    """
    from pecore.attacks import ClearPixelAttack
    from pecore.cipher_roi import ROI_TRANSFORM_SETS, RoiCipher
    from pecore.cipher_variants import TileScrambled, any_scheme, scramble_mask, tile_permutation
    from pecore.roi import dilate_mask

    plain = np.asarray(plain, dtype=np.uint8)
    resolved = any_scheme(scheme)
    if isinstance(resolved, RoiCipher):
        cipher = resolved.encrypt(plain, stream, mask=mask, nonce=nonce)
        cloud = resolved.cloud_mask(mask, stream, nonce=nonce)
        keys = resolved.keys(stream, nonce, plain.shape)
        b, inner = resolved.tile, resolved.inner.name
        permutation = keys.permutation
        true_state = np.array([state_of_roi_code(int(c)) for c in keys.codes])
        flags = ROI_TRANSFORM_SETS[resolved.transforms]
        states = 16 if flags & 8 else 8 if flags & 7 else 1
    elif isinstance(resolved, TileScrambled):
        cipher = resolved.encrypt(plain, stream, nonce=nonce)
        b, inner = resolved.block, resolved.inner.name
        roi = dilate_mask(np.asarray(mask, dtype=bool), radius)
        cloud = scramble_mask(roi, stream, resolved.name, nonce=nonce)
        permutation = tile_permutation(stream, nonce, (plain.shape[0] // b) * (plain.shape[1] // b))
        true_state = np.zeros(permutation.size, dtype=np.int64)
        states = 1
    else:
        cipher = resolved.encrypt(plain, stream)
        pixel = ClearPixelAttack(resolved.name).transform(cipher)
        scores = {"pixel": score_regions(plain, pixel, mask, radius=radius)}
        return JigsawAttackResult(scores=scores, images={"cipher": cipher, "pixel": pixel})
    pixel = ClearPixelAttack(inner, tile=b).transform(cipher)
    grid = (plain.shape[0] // b, plain.shape[1] // b)
    tiles = _grid_tiles(pixel, b)
    tile_masks = _grid_tiles(cloud, b)
    content = ndimage.median_filter(tiles, size=(1, 3, 3)) > content_threshold
    if isinstance(resolved, RoiCipher):
        pieces = np.flatnonzero(tile_masks.any(axis=(1, 2)) | (content.mean(axis=(1, 2)) > 0.02))
        grown = np.stack(
            [ndimage.binary_dilation(m, iterations=resolved.margin) for m in tile_masks]
        )
        kept = content | grown
    else:
        pieces = np.arange(tiles.shape[0])
        kept = None
    true_cell = np.stack(np.divmod(permutation[pieces], grid[1]), axis=1)
    piece_kept = None if kept is None else kept[pieces]
    assembly = solve(
        tiles[pieces],
        states=states,
        masks=tile_masks[pieces],
        kept=piece_kept,
        mask_weight=mask_weight,
    )
    result = evaluate_assembly(
        assembly,
        tiles[pieces],
        true_cell=true_cell,
        true_state=true_state[pieces],
        grid=grid,
        kept=piece_kept,
    )
    oracle = oracle_image(
        tiles[pieces],
        true_cell=true_cell,
        true_state=true_state[pieces],
        grid=grid,
        kept=piece_kept,
    )
    # chance level: the same pieces at a random permutation of their true cells, random states
    rng = np.random.default_rng(list(nonce.encode()) or [0])
    chance = oracle_image(
        tiles[pieces],
        true_cell=true_cell[rng.permutation(pieces.size)],
        true_state=rng.integers(0, states, pieces.size),
        grid=grid,
        kept=piece_kept,
    )
    return JigsawAttackResult(
        scores={
            "pixel": score_regions(plain, pixel, mask, radius=radius),
            "jigsaw": {
                **score_regions(plain, result.image, mask, radius=radius),
                "neighbour_accuracy": result.neighbour_accuracy,
                "direct_accuracy": result.direct_accuracy,
                "n_pieces": int(pieces.size),
                "largest_cluster": result.largest_cluster,
                "best_buddies": assembly.n_best_buddies,
            },
            "oracle": score_regions(plain, oracle, mask, radius=radius),
            "random placement": score_regions(plain, chance, mask, radius=radius),
        },
        images={"cipher": cipher, "pixel": pixel, "jigsaw": result.image, "oracle": oracle},
    )
