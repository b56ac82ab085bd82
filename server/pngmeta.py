"""A generation's parameters inside its PNG: an A1111-style "parameters" text chunk and a JSON chunk.

Other tools (A1111, ComfyUI, image viewers, the playground) read the "parameters" chunk, whose form is

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: dpmpp_2m, CFG scale: 3.0, Seed: 42, Size: 32x32, Model: fashion-text

(the negative line only when there is one; more "Key: value" pairs follow as they apply, a value holding
a comma, colon or quote is JSON-quoted as A1111 does). The "unet_server" chunk holds the same parameters
as JSON under the API's own field names, so a request can be rebuilt from it exactly. Pillow writes a
value that is not Latin-1 as iTXt (UTF-8) instead of tEXt; the JSON chunk is ASCII.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
JSON_KEY = "unet_server"

# API field -> A1111 label, in the order A1111 writes them; later entries are ours.
_LABELS = {
    "num_inference_steps": "Steps",
    "sampler": "Sampler",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model": "Model",
    "class_label": "Class",
    "class_name": "Class name",
    "control_scale": "Control scale",
    "strength": "Denoising strength",  # A1111's name for img2img / inpainting strength
    "inpaint_mode": "Inpaint mode",
    "loras": "LoRAs",  # ours: "name:scale, name:scale"
}
_FIELDS = {label: name for name, label in _LABELS.items()}
_INT_FIELDS = {"num_inference_steps", "seed", "width", "height", "num_images", "class_label"}
_FLOAT_FIELDS = {"guidance_scale", "control_scale", "strength"}
# A1111's own splitter: `key: value` where value is a JSON string or runs to the next comma.
_PAIR_RE = re.compile(r'\s*([\w ][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def parameters_text(params: dict[str, Any]) -> str:
    """The A1111 "parameters" string for one image's ``params`` (API field names; ``seed`` is that
    image's own seed)."""
    lines = [params.get("prompt") or ""]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    values = dict(params)
    if params.get("width") is not None and params.get("height") is not None:
        values["size"] = f"{params['width']}x{params['height']}"
    if isinstance(params.get("loras"), list):
        values["loras"] = ", ".join(f"{a['name']}:{a['scale']:g}" for a in params["loras"])
    pairs = [f"{label}: {_quote(values[name])}" for name, label in _LABELS.items()
             if values.get(name) is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def image_parameters(request: Any, index: int = 0, class_name: str | None = None) -> dict[str, Any]:
    """The parameters of image ``index`` of a ``server.request.ResolvedRequest`` (API field names, its own
    seed, None values left out). ``class_name``: the model's name for ``request.class_label``. The control
    map itself is not carried (an image, not a parameter); its scale is, when one was sent."""
    params = {
        "model": request.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "class_label": request.class_label,
        "class_name": class_name if request.class_label is not None else None,
        "sampler": request.sampler,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed + index,
        "width": request.width,
        "height": request.height,
        "control_scale": request.control_scale if request.control is not None else None,
        # image-to-image / inpainting: the strength and mode (the init image and mask, like the control
        # map, are images, not parameters)
        "strength": request.strength if getattr(request, "image", None) is not None else None,
        "inpaint_mode": getattr(request, "inpaint_mode", None),
        # LoRA adapters, as the request's ``loras`` field takes them
        "loras": [{"name": a.name, "scale": a.scale} for a in getattr(request, "loras", ())] or None,
    }
    for name in ("original_size", "crops_coords_top_left", "target_size"):  # SDXL, when sent
        value = getattr(request, name, None)
        params[name] = list(value) if value is not None else None
    return {k: v for k, v in params.items() if v is not None}


def parameters_chunks(params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """Pillow ``PngInfo`` with both chunks, for ``Image.save(..., pnginfo=...)``.

    ``params``: API field names (model, prompt, negative_prompt, class_label, class_name, sampler,
    num_inference_steps, guidance_scale, seed, width, height, control_scale, …); None values are left out.
    """
    clean = {k: v for k, v in params.items() if v is not None}
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(clean))  # iTXt when not Latin-1 (Pillow decides)
    info.add_text(JSON_KEY, json.dumps(clean, sort_keys=True))
    return info


def parse_parameters_text(text: str) -> dict[str, Any]:
    """API field names from an A1111 "parameters" string (ours or another tool's; unknown keys are kept
    under their own label)."""
    lines = text.rstrip("\n").split("\n")
    last = lines[-1] if lines else ""
    has_pairs = len(_PAIR_RE.findall(last)) >= 3  # as A1111: fewer is a prompt line holding colons
    body = lines[:-1] if has_pairs else lines
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    out: dict[str, Any] = {}
    if "\n".join(prompt).strip():
        out["prompt"] = "\n".join(prompt).strip()
    if negative:
        out["negative_prompt"] = "\n".join(negative).strip()
    for label, raw in _PAIR_RE.findall(last) if has_pairs else []:
        value: Any = json.loads(raw) if raw.startswith('"') else raw.strip()
        name = _FIELDS.get(label.strip(), label.strip())
        if name == "size":
            w, _, h = str(value).partition("x")
            if w.isdigit() and h.isdigit():
                out["width"], out["height"] = int(w), int(h)
            continue
        out[name] = _typed(name, value)
    return out


def _typed(name: str, value: Any) -> Any:
    try:
        if name in _INT_FIELDS:
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
    except (TypeError, ValueError):
        pass
    return value


def read_parameters(png_bytes: bytes) -> dict[str, Any]:
    """The parameters a PNG carries: the JSON chunk when present, else the parsed "parameters" chunk,
    else {}."""
    with Image.open(io.BytesIO(png_bytes)) as img:
        text = dict(getattr(img, "text", None) or img.info)
    raw = text.get(JSON_KEY)
    if isinstance(raw, str):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return data
    if isinstance(text.get(PARAMETERS_KEY), str):
        return parse_parameters_text(text[PARAMETERS_KEY])
    return {}
