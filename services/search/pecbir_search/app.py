"""The search service: learned metric + projected vectors in memory, k-NN over HTTP."""

import sys
import time
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field

from pecbir_contracts.auth import AuthError, Claims, Forbidden, bearer, verify_token
from pecbir_contracts.events import EventBus
from pecbir_contracts.layout import check_name
from pecbir_contracts.png import (
    ImageTooLarge,
    InvalidImage,
    check_pair,
    decode_image_png,
    decode_mask_png,
)
from pecbir_contracts.schemas import MAX_K, IndexStatus, SearchHit, SearchResponse, SearchTimings
from pecbir_contracts.store import ObjectStore
from pecbir_platform.bus import bus_from_url
from pecbir_search import metrics
from pecbir_search.engine import CollectionState, SearchEngine
from pecbir_search.settings import SearchSettings


class VectorQuery(BaseModel):
    vector: list[float]
    k: int = Field(default=10, ge=1, le=MAX_K)


def create_app(
    settings: SearchSettings | None = None,
    *,
    store: ObjectStore | None = None,
    bus: EventBus | None = None,
    start: bool = True,
) -> FastAPI:
    settings = settings or SearchSettings()  # type: ignore[call-arg]
    if store is None:
        store = settings.open_store()
    if bus is None and settings.follow:
        bus = bus_from_url(settings.events_url or settings.broker_url)
    engine = SearchEngine(store, bus if settings.follow else None, settings.encode_threads)
    sys.setswitchinterval(settings.gil_switch_interval_s)
    secret = settings.token_secret.get_secret_value().encode()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        if start:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="pe-cbir search", version="1", lifespan=lifespan)
    app.state.engine = engine

    def caller(request: Request) -> Claims:
        try:
            return verify_token(secret, bearer(request.headers.get("authorization")))
        except AuthError as exc:
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None

    def collection_state(
        collection: str, claims: Annotated[Claims, Depends(caller)], owner: str | None = None
    ) -> CollectionState:
        owner = owner or claims.tenant
        try:
            check_name(owner, "owner")
            check_name(collection, "collection")
            claims.require("search")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except Forbidden as exc:
            raise HTTPException(403, str(exc)) from None
        if owner != claims.tenant:
            # The gateway resolves consortium sharing and calls with the owner's tenant.
            raise HTTPException(403, f"token of tenant {claims.tenant!r} cannot search {owner!r}")
        return engine.collection(owner, collection)

    State = Annotated[CollectionState, Depends(collection_state)]

    def answer(state: CollectionState, query_vector, k: int, timings: SearchTimings, serving):
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
            for rank, (image_id, distance, label) in enumerate(
                zip(ids, distances, labels, strict=True)
            )
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

    def serving_of(state: CollectionState):
        serving = state.serving
        if serving is None or len(serving.index) == 0:
            raise HTTPException(
                409, f"collection {state.layout.collection} has no indexed model version yet"
            )
        return serving

    @app.post("/v1/collections/{collection}/search", response_model=SearchResponse)
    def search(
        state: State,
        cipher: Annotated[UploadFile, File()],
        mask: Annotated[UploadFile, File()],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> SearchResponse:
        serving = serving_of(state)  # one (model, matrix) pair for the whole query
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
        return answer(state, vector, k, timings, serving)

    @app.post("/v1/collections/{collection}/knn", response_model=SearchResponse)
    def knn(state: State, query: VectorQuery) -> SearchResponse:
        """k-NN for an already projected vector (diagnostics, benchmarks)."""
        serving = serving_of(state)
        if len(query.vector) != serving.index.dim:
            raise HTTPException(
                422, f"vector needs {serving.index.dim} dims, got {len(query.vector)}"
            )
        return answer(state, np.asarray(query.vector), query.k, SearchTimings(), serving)

    @app.get("/v1/collections/{collection}/status", response_model=IndexStatus)
    def status(state: State) -> IndexStatus:
        return state.status()

    @app.get("/v1/collections/{collection}/images/{image_id}")
    def holds(state: State, image_id: str) -> dict[str, object]:
        for held in (state.serving, state.pending):
            if held is not None and image_id in held.index:
                return {"image_id": image_id, "version": held.name}
        raise HTTPException(404, f"image {image_id} is not in the index")

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return {"status": "ok", "events_applied": engine.events_applied}

    metrics.instrument(app, engine, following=settings.follow)
    return app
