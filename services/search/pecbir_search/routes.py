"""The search service's HTTP API: k-NN over cipher queries or projected vectors, index state."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, UploadFile

from pecbir_contracts.layout import check_image_id
from pecbir_contracts.png import (
    ImageTooLarge,
    InvalidImage,
    check_pair,
    decode_image_png,
    decode_mask_png,
)
from pecbir_contracts.records import FeatureRecord
from pecbir_contracts.routes import (
    SEARCH_IMAGE,
    SEARCH_KNN,
    SEARCH_SEARCH,
    SEARCH_SEARCH_FISHER,
    SEARCH_SEARCH_STORED,
    SEARCH_STATUS,
)
from pecbir_contracts.schemas import (
    MAX_K,
    IndexStatus,
    SearchHit,
    SearchResponse,
    SearchTimings,
    VectorQuery,
)
from pecbir_contracts.store import ObjectNotFound
from pecbir_contracts.vectors import InvalidVector, decode_vector_npy
from pecbir_search.deps import Engine, State
from pecbir_search.engine import CollectionState, Version

router = APIRouter()


def _answer(
    state: CollectionState,
    query_vector: np.ndarray,
    k: int,
    timings: SearchTimings,
    serving: Version,
) -> SearchResponse:
    """k-NN of `query_vector` in `serving`, as the API's answer (k-NN time added)."""
    started = time.perf_counter()
    ids, distances, labels = serving.index.search(query_vector, k)
    timings.knn_ms = (time.perf_counter() - started) * 1000
    hits = [
        SearchHit(
            rank=rank + 1,
            image_id=image_id,
            distance=float(distance),
            label=None if label < 0 else int(label),
        )
        for rank, (image_id, distance, label) in enumerate(zip(ids, distances, labels, strict=True))
    ]
    return SearchResponse(
        collection=state.layout.collection,
        owner=state.layout.tenant,
        model_version=serving.name,
        n_database=len(serving.index),
        k=k,
        hits=hits,
        timings=timings,
    )


def _serving_of(state: CollectionState) -> Version:
    """The version queries use now; 409 while the collection has no indexed vectors."""
    serving = state.serving
    if serving is None or len(serving.index) == 0:
        raise HTTPException(
            409, f"collection {state.layout.collection} has no indexed model version yet"
        )
    return serving


@router.post(SEARCH_SEARCH, response_model=SearchResponse)
def search(
    state: State,
    cipher: Annotated[UploadFile, File()],
    mask: Annotated[UploadFile, File()],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
) -> SearchResponse:
    """k-NN search with a cipher query image and its mask (called by the gateway with the caller's
    token). Scope `search`."""
    serving = _serving_of(state)  # one (model, matrix) pair for the whole query
    timings = SearchTimings()
    started = time.perf_counter()
    try:
        image = decode_image_png(cipher.file.read(), "cipher")
        plain_mask = decode_mask_png(mask.file.read(), "mask")
        check_pair(image, plain_mask)
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except InvalidImage as exc:
        raise HTTPException(422, str(exc)) from None
    timings.decode_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    try:
        vector = serving.pipeline.transform([image], [plain_mask])[0]
    except ValueError as exc:
        raise HTTPException(422, f"cannot featurise the query: {exc}") from None
    timings.featurise_ms = (time.perf_counter() - started) * 1000
    return _answer(state, vector, k, timings, serving)


@router.post(SEARCH_SEARCH_FISHER, response_model=SearchResponse)
def search_fisher(
    state: State,
    fisher_vector: Annotated[UploadFile, File()],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
) -> SearchResponse:
    """k-NN for a Fisher vector the owner computed (sealed collections): project, rank."""
    serving = _serving_of(state)
    timings = SearchTimings()
    started = time.perf_counter()
    try:
        fisher = decode_vector_npy(fisher_vector.file.read())
    except InvalidVector as exc:
        raise HTTPException(422, str(exc)) from None
    timings.decode_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    try:
        vector = serving.pipeline.project(fisher)[0]
    except ValueError as exc:
        raise HTTPException(422, f"cannot project the query: {exc}") from None
    timings.featurise_ms = (time.perf_counter() - started) * 1000
    return _answer(state, vector, k, timings, serving)


@router.post(SEARCH_SEARCH_STORED, response_model=SearchResponse)
def search_stored(
    state: State,
    search_engine: Engine,
    image_id: str,
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
) -> SearchResponse:
    """k-NN with the vector the serving version holds for one of the collection's own images
    (its owner's query of a stored image, by reference: no new cipher). 409 while that image is
    not indexed in the serving version."""
    try:
        check_image_id(image_id)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    serving = _serving_of(state)
    timings = SearchTimings()
    started = time.perf_counter()
    try:
        record = FeatureRecord.from_bytes(
            search_engine.store.get(state.layout.features(serving.name, image_id))
        )
    except ObjectNotFound:
        raise HTTPException(
            409,
            f"image {image_id} is not indexed in {serving.name} yet: search with it once it is "
            "searchable",
        ) from None
    timings.decode_ms = (time.perf_counter() - started) * 1000
    return _answer(state, record.vector, k, timings, serving)


@router.post(SEARCH_KNN, response_model=SearchResponse)
def knn(state: State, query: VectorQuery) -> SearchResponse:
    """k-NN for an already projected vector (diagnostics, benchmarks)."""
    serving = _serving_of(state)
    if len(query.vector) != serving.index.dim:
        raise HTTPException(422, f"vector needs {serving.index.dim} dims, got {len(query.vector)}")
    return _answer(state, np.asarray(query.vector), query.k, SearchTimings(), serving)


@router.get(SEARCH_STATUS, response_model=IndexStatus)
def status(state: State) -> IndexStatus:
    """The collection as this search replica holds it: serving version and number of vectors. Scope
    `search`."""
    return state.status()


@router.get(SEARCH_IMAGE)
def holds(state: State, image_id: str) -> dict[str, object]:
    """Whether this replica serves the image's vector (an upload is searchable once it does). Scope
    `search`."""
    for held in (state.serving, state.pending):
        if held is not None and image_id in held.index:
            return {"image_id": image_id, "version": held.name}
    raise HTTPException(404, f"image {image_id} is not in the index")
