"""The radiologist's view (issue 16): the encryptor's pages, in a real browser.

Three hospitals on one embedded cloud: hospital-a (whose encryptor serves the page) searches
its own collection and those that hospital-b and hospital-c share with it. hospital-a's and
hospital-c's collections are pe, hospital-b's is sealed; hospital-b releases the keys of its
images to hospital-a, hospital-c refuses. The page is served over
real HTTP on loopback and driven by Debian's chromium (Playwright); the hits it shows must be
the originals, bit for bit. The session and CSRF checks are also tested without a browser.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes

N_IMAGES = 12


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload_and_train(client, gateway, system, tenant, seed, sealed=False) -> dict[str, np.ndarray]:
    """N_IMAGES 8-bit images into `tenant`'s "brain", a model trained; image id → original."""
    images, masks, labels = labelled_set(N_IMAGES, shape=(48, 48), seed=seed)
    if sealed:
        published = client.post(
            "/v1/collections/brain/patch-model",
            files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
            + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
            data={"n_components": "4", "n_regions": "2", "patch_size": "5", "radius": "2"},
        )
        assert published.status_code == 201, published.text
    originals = {}
    for image, mask, label in zip(images, masks, labels, strict=True):
        # 8-bit and full range (as the dataset's slices are): the pe mode's 8-bit rule leaves
        # it as it is, so the decrypted hit must equal the uploaded file
        plain = to_uint8(image)[0]
        answer = client.post(
            "/v1/collections/brain/images",
            files={
                "image": ("slice.png", _png(plain)),
                "mask": ("mask.png", _png(mask.astype(np.uint8) * 255)),
            },
            data={"label": str(label), "train": "true"},
        )
        assert answer.status_code == 202, answer.text
        originals[answer.json()["upload"]["image_id"]] = plain
    headers = {"authorization": f"Bearer {system.cloud_token(tenant=tenant)}"}
    model = {"dim": 2} if sealed else SMALL_MODEL
    trained = gateway.post("/v1/collections/brain/model/train", json=model, headers=headers)
    assert trained.status_code == 202, trained.text
    return originals


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-ui")
    with EmbeddedSystem(
        root,
        master=MasterKey.from_seed(16),
        shared_collections="hospital-b/brain=hospital-a;hospital-c/brain=hospital-a",
        ui_collections=("brain", "hospital-b/brain", "hospital-c/brain"),
    ) as system:
        b = system.add_hospital(
            "hospital-b", master=MasterKey.from_seed(17), sealed_collections=frozenset({"brain"})
        )
        c = system.add_hospital("hospital-c", master=MasterKey.from_seed(18), releases_keys=False)
        originals = {}
        for client, tenant, seed in (
            (system.encryptor, "hospital-a", 1),
            (b.encryptor, "hospital-b", 2),
            (c.encryptor, "hospital-c", 3),
        ):
            sealed = tenant == "hospital-b"
            originals.update(
                _upload_and_train(client, system.gateway, system, tenant, seed, sealed)
            )
        system.wait_searchable("brain", N_IMAGES)
        for tenant in ("hospital-b", "hospital-c"):
            _wait_shared(system, tenant)
        images, masks, _ = labelled_set(2, shape=(48, 48), seed=99)
        query = {
            "image": _png(to_uint8(images[0])[0]),
            "mask": _png(masks[0].astype(np.uint8) * 255),
        }
        yield {"system": system, "originals": originals, "query": query, "root": root}


def _wait_shared(system, tenant):
    import time

    headers = {"authorization": f"Bearer {system.cloud_token(tenant=tenant)}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = system.gateway.get("/v1/collections/brain/model", headers=headers).json()
        if status["serving_version"] and status["n_vectors"] >= N_IMAGES:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{tenant}/brain is not searchable")


# -- without a browser: the session, CSRF and sign-in rules ----------------------------------------
@pytest.fixture
def anonymous(world):
    from fastapi.testclient import TestClient

    with TestClient(world["system"].encryptor_app, base_url="http://testserver") as client:
        yield client


def _sign_in(client, token):
    page = client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post(
        "/ui/login", data={"token": token, "csrf": csrf, "next": "/ui/"}, follow_redirects=False
    )


def test_an_unauthenticated_request_gets_the_login_page(anonymous):
    answer = anonymous.get("/ui/queries/abc")
    assert answer.status_code == 200 and answer.url.path == "/ui/login"
    assert 'name="token"' in answer.text
    assert answer.url.params["next"] == "/ui/queries/abc"
    # the API is unchanged: a bearer token, never a cookie
    assert anonymous.get("/v1/collections/brain/images/" + "0" * 32 + "/plain").status_code == 401


def test_sign_in_refuses_a_forged_token_and_a_missing_csrf_token(world, anonymous):
    forged = _sign_in(anonymous, world["system"].user_token()[:-4] + "AAAA")
    assert forged.status_code == 401 and "Not signed in" in forged.text
    assert "pecbir_session" not in forged.cookies
    no_csrf = anonymous.post("/ui/login", data={"token": world["system"].user_token()})
    assert no_csrf.status_code == 403


def test_a_post_without_the_sessions_csrf_token_is_refused(world, anonymous):
    signed_in = _sign_in(anonymous, world["system"].user_token())
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/"
    files = {
        "image": ("q.png", world["query"]["image"]),
        "mask": ("m.png", world["query"]["mask"]),
    }
    data = {"k": "3", "hospital": "hospital-a", "query_from": "upload"}
    for csrf in ("", "0" * 64):
        refused = anonymous.post("/ui/search", files=files, data={**data, "csrf": csrf})
        assert refused.status_code == 403 and "CSRF" in refused.text
    # a CSRF token of another session (another user's token) does not do either
    page = anonymous.get("/ui/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    answer = anonymous.post(
        "/ui/search", files=files, data={**data, "csrf": csrf}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text


def test_a_token_without_the_decrypt_scope_may_not_search_from_the_page(world, anonymous):
    _sign_in(anonymous, world["system"].user_token(scopes=("search",)))
    page = anonymous.get("/ui/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    files = {"image": ("q.png", world["query"]["image"]), "mask": ("m.png", world["query"]["mask"])}
    answer = anonymous.post(
        "/ui/search",
        files=files,
        data={"k": "3", "hospital": "hospital-a", "query_from": "upload", "csrf": csrf},
    )
    assert answer.status_code == 403 and "decrypt" in answer.text


def test_bad_query_input_is_refused_with_a_message(world, anonymous):
    _sign_in(anonymous, world["system"].user_token())
    csrf = re.search(r'name="csrf" value="([^"]+)"', anonymous.get("/ui/").text).group(1)
    files = {"image": ("q.png", world["query"]["image"]), "mask": ("m.png", b"not a png")}
    answer = anonymous.post(
        "/ui/search",
        files=files,
        data={"k": "3", "hospital": "hospital-a", "query_from": "upload", "csrf": csrf},
    )
    assert answer.status_code == 422 and 'id="query-error"' in answer.text
    too_many = anonymous.post(
        "/ui/search",
        files={
            "image": ("q.png", world["query"]["image"]),
            "mask": ("m.png", world["query"]["mask"]),
        },
        data={"k": "500", "hospital": "hospital-a", "query_from": "upload", "csrf": csrf},
    )
    assert too_many.status_code == 422 and "k must be between" in too_many.text


def test_similarity_keeps_its_ends_and_is_monotone_across_collections():
    from pecbir_encryptor.web.similarity import similarity_scores

    # 100: the query's own features and nothing closer; 0: at or past the collection's median
    own, other = similarity_scores([np.array([0.0, 2.0, 4.0, 4.0, 8.0]), np.array([3.0, 6.0])])
    assert own[0] == 100 and own[2] == own[3] == 0 and own[4] == 0  # median 4: r = 1, 1, 2
    assert other[1] == 0  # median 4.5: r = 1.33
    # pooled on d / median: own[1] (r = 0.5) is closer than other[0] (r = 0.67)
    assert own[1] > other[0] > 0
    twins = similarity_scores([np.array([0.0, 0.0])])[0]  # a tie counts half: 99.5 each
    assert twins[0] == twins[1] and np.rint(twins).tolist() == [100, 100]


def test_similarity_tells_apart_hits_that_the_metric_puts_almost_together():
    """The learned metric leaves a class's cases within a fraction of a percent of each other
    (seen from a query): their similarities must still read different numbers, in order."""
    from pecbir_encryptor.web.similarity import similarity_scores

    rng = np.random.default_rng(16)
    near = 0.2 * (1 + np.sort(rng.uniform(0, 0.003, 24)))  # one class, within 0.3 %
    far = 1 + rng.uniform(-0.001, 0.2, 48)
    distances = np.concatenate([near, far])
    scores = similarity_scores([distances * 7.5e6])[0]
    order = np.argsort(distances, kind="stable")
    shown = np.rint(scores[order]).astype(int)
    assert np.all(np.diff(scores[order]) <= 0)  # monotone: a closer case never scores lower
    top = shown[:24]
    assert len(set(top.tolist())) == 24 and np.all(np.diff(top) < 0)  # distinct, in order
    # the absolute level stays: the nearest reads its closeness, 100 · (1 − d / median)
    assert top[0] == round(100 * (1 - near[0] / np.median(distances)))
    # equal distances, equal scores; and the scale does not depend on the metric's units
    tied = similarity_scores([np.array([1.0, 2.0, 2.0, 9.0, 9.0])])[0]
    assert tied[1] == tied[2]
    again = similarity_scores([distances])[0]
    assert np.allclose(again, scores)


# -- in the browser --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from pecbir_harness.browser import BrowserUnavailable, chromium

    try:
        with chromium() as started:
            yield started
    except BrowserUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is required on CI and did not start: {exc}", pytrace=False)
        pytest.skip(f"no browser for the page tests: {exc}")


@pytest.fixture(scope="module")
def served(world):
    from pecbir_harness.http import serve_in_thread

    with serve_in_thread(world["system"].encryptor_app) as url:
        yield url


@pytest.fixture
def page(browser, served, world, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=served)
    page = context.new_page()
    yield page
    context.close()


def _browser_sign_in(page, token):
    page.goto("/ui/")
    assert "/ui/login" in page.url and page.locator("textarea#token").is_visible()
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/")


def _query_files(world, tmp_path):
    for name in ("image", "mask"):
        (tmp_path / f"{name}.png").write_bytes(world["query"][name])
    return tmp_path / "image.png", tmp_path / "mask.png"


def _settled(page):
    """Wait until every tile of the result is opened (they open one by one, in rank order)."""
    page.wait_for_function(
        "() => document.getElementById('hits')?.dataset.settled === 'true'", polling=50
    )


def _decoded(page, url):
    answer = page.request.get(url)
    assert answer.status == 200, url
    return np.asarray(Image.open(io.BytesIO(answer.body())))


def test_the_page_shows_decrypted_hits_equal_to_the_originals(world, page, tmp_path):
    messages = []
    page.on("console", lambda message: messages.append(message.text))
    _browser_sign_in(page, world["system"].user_token())
    image, mask = _query_files(world, tmp_path)
    page.set_input_files("#image", str(image))
    page.set_input_files("#mask", str(mask))
    page.fill("#k", str(3 * N_IMAGES))  # every image of the three hospitals
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    page.wait_for_selector(".tile[data-state=shown] img.plain")
    _settled(page)
    tiles = page.locator(".tile")
    assert tiles.count() == 3 * N_IMAGES
    assert page.locator(".tile a.viewer").count() == 0  # no hit came as DICOM
    states = {}
    for i in range(tiles.count()):
        tile = tiles.nth(i)
        owner, state = tile.get_attribute("data-owner"), tile.get_attribute("data-state")
        states.setdefault(owner, set()).add(state)
        if state != "shown":
            continue
        image_id = tile.get_attribute("data-image-id")
        img = tile.locator("img.plain")
        # rendered in the browser (loaded, not broken) ...
        assert img.evaluate("i => i.complete && i.naturalWidth") == 48
        # ... and the bytes it rendered are the original, bit for bit
        shown = _decoded(page, img.get_attribute("src"))
        assert np.array_equal(shown, world["originals"][image_id]), (owner, image_id)
        caption = tile.locator(".caption").inner_text()
        assert re.search(r"#\d+\s+(meningioma|glioma|pituitary)\s+\d+", caption), caption
    # ours (pe) and hospital-b's (sealed, keys released) are shown; hospital-c refused
    modes = page.locator(".tile").evaluate_all(
        "ts => ts.map(t => t.dataset.owner + t.dataset.mode)"
    )
    assert {"hospital-ape", "hospital-bsealed", "hospital-cpe"} == set(modes)
    assert states == {
        "hospital-a": {"shown"},
        "hospital-b": {"shown"},
        "hospital-c": {"not-released"},
    }
    refused = page.locator(".tile[data-owner=hospital-c]").first
    assert "Not released" in refused.inner_text() and "refused (403)" in refused.inner_text()
    ranks = [int(tiles.nth(i).get_attribute("data-rank")) for i in range(tiles.count())]
    assert ranks == list(range(1, 3 * N_IMAGES + 1))
    # the similarity falls with the rank, and the page's legend says how it is made
    exported = json.loads(page.request.get(page.get_attribute("#export-json", "href")).text())
    similarities = [hit["similarity"] for hit in exported["hits"]]
    assert similarities == sorted(similarities, reverse=True) and similarities[0] > 0
    assert "less one point per case searched that is closer" in page.inner_text(".legend")
    # what the cloud sees (key c): the query's and hospital-a's hits' cipher images
    page.keyboard.press("c")
    assert page.locator(".query.cloud-only img").is_visible()
    own = page.locator(".tile[data-owner=hospital-a] img.cloud").first
    own.wait_for(state="visible")
    page.wait_for_function(
        "i => i.complete && i.naturalWidth === 48", arg=own.element_handle(), polling=50
    )
    cipher = _decoded(page, own.get_attribute("src"))
    image_id = own.evaluate("i => i.closest('.tile').dataset.imageId")
    assert cipher.shape == (48, 48)
    assert not np.array_equal(cipher, world["originals"][image_id])
    # the tiles came through the page's script under the strict CSP, which refused nothing
    assert not [m for m in messages if "Content Security Policy" in m], messages


def test_filters_exports_keyboard_and_the_audit_trail(world, page, tmp_path):
    system = world["system"]
    _browser_sign_in(page, system.user_token())
    image, mask = _query_files(world, tmp_path)
    page.set_input_files("#image", str(image))
    page.set_input_files("#mask", str(mask))
    page.fill("#k", "4")
    page.uncheck("input[name=hospital][value=hospital-c]")
    page.select_option("#class", "1")
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    _settled(page)
    tiles = page.locator(".tile")
    assert 1 <= tiles.count() <= 4
    owners = {tiles.nth(i).get_attribute("data-owner") for i in range(tiles.count())}
    assert owners <= {"hospital-a", "hospital-b"}
    assert all("meningioma" in tiles.nth(i).inner_text() for i in range(tiles.count()))
    # exports: the same ids and scores as the tiles
    rows = list(
        csv.DictReader(
            io.StringIO(page.request.get(page.get_attribute("#export-csv", "href")).text())
        )
    )
    assert [r["image_id"] for r in rows] == [
        tiles.nth(i).get_attribute("data-image-id") for i in range(tiles.count())
    ]
    exported = json.loads(page.request.get(page.get_attribute("#export-json", "href")).text())
    assert exported["filters"]["class"] == 1 and len(exported["hits"]) == tiles.count()
    montage = page.request.get(page.get_attribute("#export-png", "href"))
    assert montage.headers["content-type"] == "image/png"
    # keyboard: arrows move between the cases, Enter enlarges, Escape closes, o hides outlines
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.rank") == "1"
    if tiles.count() > 1:
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.dataset.rank") == "2"
    page.keyboard.press("Enter")
    assert page.locator("#zoom").is_visible()
    page.keyboard.press("Escape")
    assert not page.locator("#zoom").is_visible()
    page.keyboard.press("o")
    assert page.evaluate("document.body.classList.contains('no-outline')")
    page.keyboard.press("c")
    assert page.locator(".query.cloud-only img").is_visible()
    # the audit trail names the user, the view and each decryption
    page.goto("/ui/audit")
    trail = page.locator("#audit-table").inner_text()
    assert "ui-view" in trail and "decrypt" in trail and "radiologist@hospital-a" in trail


def test_query_by_a_stored_study_leaves_the_study_out(world, page):
    _browser_sign_in(page, world["system"].user_token())
    options = page.locator("#study option")
    assert options.count() == N_IMAGES  # hospital-a's own uploads only
    value = options.first.get_attribute("value")
    page.select_option("#study", value)
    page.wait_for_function("() => document.getElementById('study-preview').naturalWidth > 0")
    page.uncheck("input[name=hospital][value=hospital-b]")
    page.uncheck("input[name=hospital][value=hospital-c]")
    page.fill("#k", "5")
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    _settled(page)
    ids = page.locator(".tile").evaluate_all("ts => ts.map(t => t.dataset.imageId)")
    assert len(ids) == 5 and value.split(":")[1] not in ids
    assert "stored study" in page.locator(".query figcaption").first.inner_text()
    # the study is one of this hospital's stored images: searched by reference, nothing sent
    cloud = page.locator(".query.cloud-only figcaption").text_content()
    assert "by reference" in cloud


def test_a_signed_in_page_refuses_a_cross_site_post(world, page, served):
    """A form on another origin cannot use the session: SameSite keeps the cookie, and the
    CSRF check refuses the request even when the cookie is sent."""
    _browser_sign_in(page, world["system"].user_token())
    answer = page.request.post(
        "/ui/search", multipart={"k": "3", "hospital": "hospital-a", "csrf": "forged"}
    )
    assert answer.status == 403 and "CSRF" in answer.text()
    # and one that has no session at all gets the login page, not the API's 401 JSON
    page.context.clear_cookies()
    page.goto("/ui/audit")
    assert "/ui/login" in page.url


def test_the_result_page_comes_before_any_hit_is_opened_and_each_tile_opens_once(world, anonymous):
    """Progressive result: the page lists the k tiles pending, and a tile is opened (and its
    decryption and view audited) only when it is asked for, once however often."""
    system = world["system"]
    _sign_in(anonymous, system.user_token())
    csrf = re.search(r'name="csrf" value="([^"]+)"', anonymous.get("/ui/").text).group(1)
    files = {"image": ("q.png", world["query"]["image"]), "mask": ("m.png", world["query"]["mask"])}
    answer = anonymous.post(
        "/ui/search",
        files=files,
        data={"k": "5", "hospital": ["hospital-a", "hospital-c"], "csrf": csrf},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    page = anonymous.get(answer.headers["location"])
    query = answer.headers["location"].rsplit("/", 1)[1]
    states = re.findall(r'class="tile state-([a-z-]+)"', page.text)
    assert states == ["pending"] * 5
    assert len(re.findall(rf'data-tile="/ui/queries/{query}/hits/\d+"', page.text)) == 5

    def records(action):
        audit = system.encryptor_app.state.context.encryptor.audit
        return [r for r in audit.read(actions={action}) if r.get("query") == query]

    assert records("decrypt") == [] and records("key-request") == []
    for _ in range(2):
        tile = anonymous.get(f"/ui/queries/{query}/hits/1")
        assert tile.status_code == 200 and 'data-rank="1"' in tile.text
        assert "state-pending" not in tile.text and "data-tile=" not in tile.text
    opened = records("decrypt") + records("key-request")
    assert len(opened) == 1 and opened[0]["image_id"] in tile.text  # opened once
    views = [r for r in records("ui-view") if r.get("rank") == 1]
    assert len(views) == 2  # each view of the tile is audited
    assert anonymous.get(f"/ui/queries/{query}/hits/99").status_code == 404
    # the exports list every tile: they open the rest
    exported = json.loads(anonymous.get(f"/ui/queries/{query}/export.json").text)
    assert [h["state"] for h in exported["hits"]].count("pending") == 0
    assert len(records("decrypt") + records("key-request")) == 5


def test_sign_in_goes_nowhere_but_the_pages_and_sign_out_needs_the_csrf_token(world, anonymous):
    for target in ("https://elsewhere.example/", "//elsewhere.example/ui/", "/v1/keys/release"):
        # each sign-in uses up its form's CSRF cookie: a fresh form each time
        page = anonymous.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        answer = anonymous.post(
            "/ui/login",
            data={"token": world["system"].user_token(), "csrf": csrf, "next": target},
            follow_redirects=False,
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/", target
    assert anonymous.post("/ui/logout", data={"csrf": "x"}).status_code == 403
    assert anonymous.get("/ui/audit").url.path == "/ui/audit"  # still signed in
    home = anonymous.get("/ui/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', home.text).group(1)
    assert anonymous.post("/ui/logout", data={"csrf": csrf}).url.path == "/ui/login"
    assert anonymous.get("/ui/audit").url.path == "/ui/login"


def test_a_drawn_outline_becomes_the_querys_mask(world, page, tmp_path):
    """No mask, no SEG: the radiologist outlines the tumour on the uploaded slice; the page
    sends the filled outline as the mask (an NPY array of the image's size)."""
    _browser_sign_in(page, world["system"].user_token())
    image, _ = _query_files(world, tmp_path)
    page.set_input_files("#image", str(image))
    page.click("#draw-open")
    canvas = page.locator("#draw-canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    # an octagon of radius 8 px around the 48×48 slice's centre (the tumour is near it)
    for angle in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        x = (24 + 8 * np.cos(angle)) / 48 * box["width"]
        y = (24 + 8 * np.sin(angle)) / 48 * box["height"]
        canvas.click(position={"x": float(x), "y": float(y)})
    assert page.inner_text("#draw-status") == "8 points"
    page.click("#draw-use")
    sent = page.evaluate(
        "async () => Array.from(new Uint8Array("
        "await document.getElementById('mask').files[0].arrayBuffer()))"
    )
    mask = np.load(io.BytesIO(bytes(sent)))
    assert mask.shape == (48, 48) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert 150 <= int(mask.sum()) <= 230  # the octagon's area, 181 px, give or take its edge
    assert mask[24, 24] == 1 and mask[0, 0] == 0
    page.uncheck("input[name=hospital][value=hospital-b]")
    page.uncheck("input[name=hospital][value=hospital-c]")
    page.fill("#k", "3")
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    _settled(page)
    assert page.locator(".tile[data-state=shown]").count() == 3
    outline = _decoded(page, page.get_attribute(".query img.outline", "src"))
    assert outline[24 - 8, 24, 3] == 255 or outline[24, 24 + 8, 3] == 255  # drawn edge shown
