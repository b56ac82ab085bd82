"""The playground end to end in headless chromium against the real server (CPU, shipped models, API key).

Each test drives the page as a person would (fills the form, presses Generate or Ctrl+Enter, clicks,
drops files) and checks what the page shows against what the API answers for the same request: on CPU in
fp32 a seed gives the same bytes, so the page's image must equal the API's pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server.pngmeta import parameters_chunks, read_parameters
from tests.browser.conftest import GALLERY_STORE, KEY_STORE, Page, new_page
from tests.integration.conftest import SHIPPED_MODELS, Server

pytestmark = pytest.mark.integration

STEPS = 8  # short CPU runs that still show several progress steps


def pixels(png_b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as img:
        return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)


def data_url_b64(src: str) -> str:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return src.split(",", 1)[1]


def edge_map(size: int = 32) -> bytes:
    """A grayscale PNG edge map: the outline of a dress-like shape, white on black."""
    a = np.zeros((size, size), np.uint8)
    a[4, 11:21] = 255
    a[4:12, 11] = a[4:12, 20] = 255
    for i, row in enumerate(range(12, 28)):
        a[row, max(11 - i // 2, 0)] = a[row, min(20 + i // 2, size - 1)] = 255
    a[27, 3:29] = 255
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


# The control canvas's PNG (base64) once it holds a white pixel.
CANVAS_HAS_EDGES = """() => {
    const c = document.getElementById('control-canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    return d.some((v, i) => i % 4 === 0 && v > 0) && c.toDataURL().split(',')[1];
}"""


def api_generate(server: Server, body: dict) -> dict:
    with server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def fill(pg: Page, model: str, params: dict) -> None:
    """Fill the form as a person would."""
    page = pg.page
    page.select_option("#model", model)
    if "prompt" in params:
        page.fill("#prompt", params["prompt"])
    if "negative_prompt" in params:
        page.fill("#negative_prompt", params["negative_prompt"])
    if "class_label" in params:
        page.select_option("#class_label", str(params["class_label"]))
    if "sampler" in params:
        page.select_option("#sampler", params["sampler"])
    for name in ("num_inference_steps", "guidance_scale", "num_images", "seed"):
        if name in params:
            page.fill(f"#{name}", str(params[name]))


def wait_done(pg: Page) -> list[str]:
    """Wait for the results; their base64 PNGs."""
    pg.page.wait_for_function("() => document.querySelectorAll('#results img').length > 0 && "
                              "document.getElementById('job-status').textContent.startsWith('Done')")
    srcs = pg.page.eval_on_selector_all("#results img", "els => els.map(e => e.src)")
    return [data_url_b64(s) for s in srcs]


# Per shipped model: the form a person fills, and the request it must turn into.
CASES = {
    "fashion-class": {"class_label": 7, "sampler": "euler", "guidance_scale": 2.5, "seed": 1234,
                      "num_images": 2},
    "fashion-text": {"prompt": "a red sneaker", "negative_prompt": "blue", "seed": 42, "num_images": 2},
    "fashion-text-edges": {"prompt": "a yellow dress", "seed": 5, "num_images": 1},
}


@pytest.mark.parametrize("model", SHIPPED_MODELS)
def test_generate_each_model_matches_the_api(pg: Page, server: Server, model: str, screenshot_dir) -> None:
    spec = server.models[model]
    params = {**CASES[model], "num_inference_steps": STEPS}
    fill(pg, model, params)
    # The form shows only what this model accepts.
    assert pg.page.is_visible("#prompt") == spec["conditioning"]["text"]
    assert pg.page.is_visible("#class_label") == bool(spec["conditioning"]["classes"])
    assert pg.page.is_visible("#control-canvas") == bool(spec["conditioning"]["control"])
    control = None
    if spec["conditioning"]["control"]:
        control = edge_map(spec["defaults"]["width"])
        pg.page.set_input_files("#control-file", files=[
            {"name": "edges.png", "mimeType": "image/png", "buffer": control}])
        pg.page.wait_for_function(CANVAS_HAS_EDGES)
    pg.page.keyboard.press("Control+Enter")
    images = wait_done(pg)

    body = pg.job_bodies()[-1]
    expected = {
        "model": model,
        "sampler": params.get("sampler", spec["defaults"]["sampler"]),
        "guidance_scale": params.get("guidance_scale", spec["defaults"]["guidance_scale"]),
        "width": spec["defaults"]["width"],
        "height": spec["defaults"]["height"],
        **{k: v for k, v in params.items() if k != "sampler" and k != "guidance_scale"},
    }
    sent = {k: v for k, v in body.items() if k not in ("preview_every", "control_image", "control_scale")}
    assert sent == expected
    if control is not None:
        # The canvas sends exactly the uploaded map's pixels at the request's size.
        assert np.array_equal(pixels(body["control_image"])[..., 0], pixels(base64.b64encode(control)))
        expected["control_image"] = base64.b64encode(control).decode()
        expected["control_scale"] = body["control_scale"]

    # The progress bar went through the steps, ending full.
    progress = pg.seen()["progress"]
    shown = [v for v, m in progress if m == STEPS] + [pg.page.eval_on_selector("#progress", "e => e.value")]
    assert shown == sorted(shown) and shown[-1] == STEPS
    assert len({v for v in shown if 0 < v < STEPS}) >= 2, progress

    # What the page shows is the API's image for the same request and seeds.
    reference = api_generate(server, expected)
    assert reference["seeds"] == [params["seed"] + i for i in range(params["num_images"])]
    assert len(images) == params["num_images"]
    for mine, theirs in zip(images, reference["images"], strict=True):
        assert np.array_equal(pixels(mine), pixels(theirs))
    seeds = pg.page.eval_on_selector_all("#results img", "els => els.map(e => Number(e.dataset.seed))")
    assert seeds == reference["seeds"]
    # Each image is in the gallery, kept in localStorage.
    gallery = json.loads(pg.page.evaluate(f"localStorage.getItem({GALLERY_STORE!r})"))
    assert sorted(item["params"]["seed"] for item in gallery) == reference["seeds"]
    pg.page.screenshot(path=str(screenshot_dir / f"playground-{model}.png"), full_page=True)


def test_live_preview_appears(pg: Page) -> None:
    fill(pg, "fashion-text", {"prompt": "a green bag", "seed": 3, "num_inference_steps": 12, "num_images": 2})
    pg.page.fill("#preview_every", "2")
    pg.page.click("#generate")
    wait_done(pg)
    assert pg.job_bodies()[-1].get("preview_every") == 2, "the server refused preview_every"
    previews = pg.seen()["previews"]  # each src the first preview image took, as it changed
    assert len(previews) >= 3, previews
    for src in previews:
        with Image.open(io.BytesIO(base64.b64decode(data_url_b64(src)))) as img:
            assert img.format == "PNG" and img.size == (32, 32)
    assert len(set(previews)) == len(previews), "each preview shows a new estimate"
    assert pg.page.is_visible("#preview")
    assert pg.page.eval_on_selector_all("#previews img", "els => els.length") == 2  # one per image
    assert pg.page.inner_text("#preview-caption").endswith("/ 12")


def test_queue_position_then_cancel_a_long_job(pg: Page, server: Server) -> None:
    steps = 200
    with server.client() as c:
        # A job that takes every row of a forward pass (8 images x 2 guidance halves = max_batch_rows 16),
        # so the page's job has to wait behind it.
        blocker = c.post("/v1/jobs", json={"model": "fashion-text", "prompt": "a bag", "num_images": 8,
                                           "num_inference_steps": steps, "seed": 1}).json()
    assert blocker["status"] in ("queued", "running"), blocker
    try:
        fill(pg, "fashion-text", {"prompt": "a dark blue coat", "seed": 9, "num_inference_steps": steps,
                                  "num_images": 4})
        with pg.page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.status == 202) as info:
            pg.page.click("#generate")
        job_id = info.value.json()["id"]
        # Once the blocker runs, this job is next in line (the page keeps asking while it waits).
        with server.client() as c:
            for _ in range(100):
                if c.get(f"/v1/jobs/{job_id}").json()["queue_position"] == 0:
                    break
                time.sleep(0.1)
        pg.page.wait_for_function(
            "() => document.getElementById('job-status').textContent === 'Queued: next in line.'")
        assert pg.page.eval_on_selector("#progress", "e => e.value") == 0
    finally:
        with server.client() as c:
            c.post(f"/v1/jobs/{blocker['id']}/cancel")
    # Once the blocker is gone the job runs; Cancel stops it mid-run.
    pg.page.wait_for_function("() => document.getElementById('progress').value >= 2")
    assert pg.page.is_enabled("#cancel")
    pg.page.click("#cancel")
    pg.page.wait_for_function("() => document.getElementById('job-status').textContent === 'Cancelled.'")
    with server.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert 2 <= job["step"] < steps
    assert pg.page.is_enabled("#generate") and not pg.page.is_enabled("#cancel")
    assert pg.page.eval_on_selector_all("#results img", "els => els.length") == 0


def test_a_drawn_control_map_is_what_is_sent(pg: Page) -> None:
    fill(pg, "fashion-text-edges", {"prompt": "a white shirt", "seed": 4, "num_inference_steps": 3})
    box = pg.page.locator("#control-canvas").bounding_box()
    cell = box["width"] / 32  # the canvas holds 32 x 32 pixels, shown enlarged
    pg.page.mouse.move(box["x"] + 4.5 * cell, box["y"] + 16.5 * cell)
    pg.page.mouse.down()
    for x in range(5, 28):
        pg.page.mouse.move(box["x"] + (x + 0.5) * cell, box["y"] + 16.5 * cell)
    pg.page.mouse.up()
    pg.page.click("#generate")
    wait_done(pg)
    sent = pixels(pg.job_bodies()[-1]["control_image"])[..., 0]  # (32, 32) red channel of the canvas PNG
    assert sent.shape == (32, 32)
    assert (sent[16, 6:26] > 200).all()  # the stroke, white
    assert sent[:12].max() == 0 and sent[21:].max() == 0  # black away from it


def test_validation_errors_show_next_to_their_field(pg: Page, server: Server, tmp_path) -> None:
    fill(pg, "fashion-class", {"class_label": 1, "num_inference_steps": 100000, "seed": 1})
    pg.page.fill("#width", "30")
    pg.page.click("#generate")
    pg.page.wait_for_selector("[data-error-for=num_inference_steps]:not(:empty)")
    with server.client() as c:
        r = c.post("/v1/jobs", json=pg.job_bodies()[-1])
    assert r.status_code == 422
    api_msgs = {e["loc"][1]: e["msg"] for e in r.json()["detail"]}
    shown = pg.page.inner_text("[data-error-for=num_inference_steps]")
    assert shown == api_msgs["num_inference_steps"]
    assert pg.page.get_attribute("#num_inference_steps", "aria-invalid") == "true"
    assert pg.page.inner_text("#job-status") == "Not submitted."
    # Fix that one: the next error the API finds (the size) appears beside its own field.
    pg.page.fill("#num_inference_steps", "4")
    pg.page.click("#generate")
    pg.page.wait_for_selector("[data-error-for=width]:not(:empty)")
    assert pg.page.inner_text("[data-error-for=num_inference_steps]") == ""
    with server.client() as c:
        r = c.post("/v1/jobs", json=pg.job_bodies()[-1])
    assert pg.page.inner_text("[data-error-for=width]") == r.json()["detail"][0]["msg"]
    assert "multiple of 4" in pg.page.inner_text("[data-error-for=width]")
    pg.page.screenshot(path=str(tmp_path / "validation.png"))


def read_form(pg: Page) -> dict:
    return pg.page.evaluate("""() => Object.fromEntries(
        ['model','prompt','negative_prompt','class_label','sampler','num_inference_steps','guidance_scale',
         'num_images','width','height','seed'].map(id => [id, document.getElementById(id).value]))""")


def test_gallery_click_restores_every_parameter(browser, server: Server) -> None:
    context, pg = new_page(browser, server)
    try:
        pg.open()
        params = {"class_label": 8, "sampler": "ddim", "guidance_scale": 4.0, "seed": 77, "num_images": 2,
                  "num_inference_steps": 6}
        fill(pg, "fashion-class", params)
        pg.page.click("#generate")
        first = wait_done(pg)
        # Change everything, then come back later (a reload: the gallery lives in localStorage).
        fill(pg, "fashion-text", {"prompt": "something else", "seed": 1, "num_inference_steps": 3})
        pg.page.reload()
        pg.page.wait_for_selector("body[data-ready=true]")
        assert pg.page.eval_on_selector_all("#gallery .thumb", "els => els.length") == 2
        pg.page.click("#gallery .thumb[data-seed='78']")
        form = read_form(pg)
        assert form["model"] == "fashion-class" and form["class_label"] == "8"
        assert form["sampler"] == "ddim" and form["num_inference_steps"] == "6"
        assert float(form["guidance_scale"]) == 4.0 and form["seed"] == "78" and form["num_images"] == "2"
        assert form["width"] == form["height"] == "32"
        # The restored recipe makes the same image again.
        pg.page.click("#generate")
        pg.page.wait_for_function("() => document.querySelector('#results img')?.dataset.seed === '78'")
        again = wait_done(pg)
        assert np.array_equal(pixels(again[0]), pixels(first[1]))
        assert pg.outside_requests() == [] and pg.errors == []
    finally:
        context.close()


def png_with(params: dict | None, text_only: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    if params is not None:
        image.save(buf, format="PNG", pnginfo=parameters_chunks(params))
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text_only or "")
        image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def drop(pg: Page, selector: str, data: bytes, name: str = "image.png") -> None:
    handle = pg.page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            return dt;
        }""",
        [base64.b64encode(data).decode(), name],
    )
    pg.page.dispatch_event(selector, "drop", {"dataTransfer": handle})


def test_dropped_png_restores_its_parameters(pg: Page) -> None:
    # Our JSON chunk (a prompt with a comma, a colon and non-Latin-1 text goes through iTXt).
    params = {"model": "fashion-text", "prompt": "a red, warm coat: größe ☂", "negative_prompt": "blue",
              "sampler": "flow_heun", "num_inference_steps": 7, "guidance_scale": 2.0, "seed": 31337,
              "width": 32, "height": 32}
    drop(pg, "#gallery-section", png_with(params))
    pg.page.wait_for_function("() => document.getElementById('seed').value === '31337'")
    form = read_form(pg)
    assert form["model"] == "fashion-text" and form["prompt"] == params["prompt"]
    assert form["negative_prompt"] == "blue" and form["sampler"] == "flow_heun"
    assert form["num_inference_steps"] == "7" and float(form["guidance_scale"]) == 2.0
    # Another tool's PNG with only the A1111 "parameters" text (parsed in the page).
    text = 'a pair of "trousers", grey ☂\nNegative prompt: red\nSteps: 9, Sampler: euler, CFG scale: 1.5, ' \
           'Seed: 99, Size: 32x32, Model: fashion-class, Class: 1'
    drop(pg, "main", png_with(None, text))
    pg.page.wait_for_function("() => document.getElementById('seed').value === '99'")
    form = read_form(pg)
    assert form["model"] == "fashion-class" and form["class_label"] == "1" and form["sampler"] == "euler"
    assert form["prompt"] == 'a pair of "trousers", grey ☂' and form["negative_prompt"] == "red"
    assert form["num_inference_steps"] == "9" and float(form["guidance_scale"]) == 1.5
    # A PNG that carries nothing says so; an image dropped on the control canvas becomes the control map.
    drop(pg, "main", png_with(None, ""))
    pg.page.wait_for_selector("#form-error:not(:empty)")
    assert "carries no generation parameters" in pg.page.inner_text("#form-error")
    pg.page.select_option("#model", "fashion-text-edges")
    edges = edge_map()
    drop(pg, "#control-canvas", edges)
    pg.page.wait_for_function("() => document.getElementById('form-error').textContent === ''")
    sent = pg.page.wait_for_function(CANVAS_HAS_EDGES).json_value()
    assert np.array_equal(pixels(sent)[..., 0], pixels(base64.b64encode(edges)))


def test_server_png_dropped_back_restores_its_request(pg: Page, server: Server) -> None:
    body = {"model": "fashion-class", "class_label": 3, "sampler": "heun", "num_inference_steps": 5,
            "guidance_scale": 2.0, "seed": 2024}
    with server.client() as c:
        r = c.post("/generate", json=body, headers={"Accept": "image/png"})
    assert r.status_code == 200
    carried = read_parameters(r.content)
    assert {k: carried.get(k) for k in body} == body
    drop(pg, "main", r.content)
    pg.page.wait_for_function("() => document.getElementById('seed').value === '2024'")
    form = read_form(pg)
    assert form["class_label"] == "3" and form["sampler"] == "heun" and form["num_inference_steps"] == "5"


def test_api_key_is_asked_for_and_kept_in_the_browser(browser, server: Server) -> None:
    context, pg = new_page(browser, server, with_key=False)
    try:
        pg.page.goto(server.url + "/playground")
        pg.page.wait_for_selector("#key-dialog[open]")
        pg.page.fill("#key-input", "wrong")
        refused = "() => document.getElementById('key-error').textContent.includes('refused')"
        pg.page.click("#key-form button[value=save]")
        pg.page.wait_for_function(refused)
        key = server.headers["Authorization"].split(" ", 1)[1]
        pg.page.fill("#key-input", key)
        pg.page.click("#key-form button[value=save]")
        pg.page.wait_for_selector("body[data-ready=true]")
        assert pg.page.evaluate(f"localStorage.getItem({KEY_STORE!r})") == key
        options = pg.page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
        assert sorted(options) == sorted(server.models)
        # The key went with the API calls, and only to this server.
        api_calls = [r for r in pg.requests if "/v1/" in r.url]
        assert api_calls and api_calls[-1].headers.get("authorization") == f"Bearer {key}"
        assert pg.outside_requests() == [] and pg.errors == []
    finally:
        context.close()


def test_page_loads_nothing_from_outside(browser, server: Server) -> None:
    context, pg = new_page(browser, server)
    try:
        pg.open()
        urls = [r.url for r in pg.requests]
        assert urls[0] == server.url + "/"
        assert any(u.endswith("/playground.js") for u in urls) and any(u.endswith("/playground.css")
                                                                          for u in urls)
        assert pg.outside_requests() == []
        # The page is the server's own: without the server there is nothing it could load instead.
        r = httpx.get(server.url + "/")
        assert "default-src 'self'" in r.headers["content-security-policy"]
    finally:
        context.close()
