// The playground: one page over this server's own API (GET /v1/models, /v1/samplers, POST /v1/jobs and the
// job's server-sent events, POST /v1/jobs/{id}/cancel). No library, no build step; every URL is relative, so
// the page also works behind a path prefix, and nothing is fetched from anywhere else.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "unet-playground.apiKey";
  const GALLERY_STORE = "unet-playground.gallery";
  const GALLERY_MAX = 60;
  // Every request field the form can set, in the order a restore applies them (model first: its defaults).
  const NUMBER_FIELDS = ["num_inference_steps", "guidance_scale", "num_images", "width", "height"];

  const state = {
    models: {}, // id -> /v1/models entry
    samplers: [], // /v1/samplers entries
    model: null, // the chosen model's entry
    job: null, // {id, abort: AbortController} while one runs
    lastSeed: null,
    previews: true, // false once the server has said it does not know preview_every
    controlDirty: false, // whether the control canvas holds a map to send
  };

  // -- API -----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const message = (body && (body.message || (typeof body.detail === "string" && body.detail))) || `HTTP ${status}`;
      super(message);
      this.status = status;
      this.body = body || {};
    }
  }

  function authHeaders() {
    const key = localStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // fetch with the stored key; a 401 asks for the key and tries again (or throws if the user cancels).
  async function request(path, options = {}) {
    for (;;) {
      const headers = { ...authHeaders(), ...(options.headers || {}) };
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      await askKey(headers.Authorization ? "The server refused this key." : "");
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const options = { method };
    if (body !== undefined) {
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    }
    const response = await request(path, options);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { message: text };
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // Server-sent events over fetch (EventSource cannot send the Authorization header).
  async function* events(path, signal) {
    const response = await request(path, { signal, headers: { Accept: "text/event-stream" } });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r/g, "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  // -- API key ---------------------------------------------------------------------------------------

  let keyPrompt = null; // one dialog for every request waiting on a key

  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    const dialog = $("key-dialog");
    $("key-error").textContent = reason;
    $("key-input").value = "";
    keyPrompt = new Promise((resolve, reject) => {
      const done = (event) => {
        event.preventDefault();
        const save = event.submitter ? event.submitter.value === "save" : true;
        const key = $("key-input").value.trim();
        if (save && !key) {
          $("key-error").textContent = "Enter the key, or cancel.";
          return;
        }
        $("key-form").removeEventListener("submit", done);
        dialog.close();
        keyPrompt = null;
        if (save) {
          localStorage.setItem(KEY_STORE, key);
          resolve();
        } else {
          reject(new ApiError(401, { message: "this server needs an API key" }));
        }
      };
      $("key-form").addEventListener("submit", done);
    });
    dialog.showModal();
    $("key-input").focus();
    return keyPrompt;
  }

  // -- form ------------------------------------------------------------------------------------------

  function setStatus(text) {
    $("job-status").textContent = text;
  }

  function clearErrors() {
    for (const el of document.querySelectorAll("[data-error-for]")) el.textContent = "";
    for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  function showFormError(text) {
    $("form-error").textContent = text;
  }

  // A 422 lists errors with loc ["body", field]: each message goes next to its field, as the API phrased it.
  function showApiError(error) {
    const detail = error.body && error.body.detail;
    if (error.status === 422 && Array.isArray(detail)) {
      for (const err of detail) {
        const loc = Array.isArray(err.loc) ? err.loc : [];
        const field = loc[0] === "body" && loc.length > 1 ? String(loc[1]) : "body";
        const target = document.querySelector(`[data-error-for="${CSS.escape(field)}"]`) || $("form-error");
        target.textContent = target.textContent ? `${target.textContent} ${err.msg}` : err.msg;
        const input = document.getElementById(field);
        if (input) input.setAttribute("aria-invalid", "true");
      }
      return;
    }
    showFormError(error.status ? `${error.status}: ${error.message}` : String(error.message || error));
  }

  function fillSelect(select, options) {
    select.replaceChildren(
      ...options.map(({ value, text, title }) => {
        const option = new Option(text, value);
        if (title) option.title = title;
        return option;
      }),
    );
  }

  function applyModel() {
    const model = state.models[$("model").value];
    state.model = model;
    if (!model) return;
    const cond = model.conditioning;
    const needs = { text: !!cond.text, classes: !!(cond.classes && cond.classes.length), control: !!cond.control };
    for (const el of document.querySelectorAll("[data-needs]")) el.hidden = !needs[el.dataset.needs];
    if (needs.classes) {
      fillSelect($("class_label"), [
        { value: "", text: "(unconditional)" },
        ...cond.classes.map((c) => ({ value: String(c.index), text: `${c.index} · ${c.name}` })),
      ]);
    }
    const samplers = state.samplers.filter((s) => !s.model_kinds.length || s.model_kinds.includes(model.schedule));
    fillSelect(
      $("sampler"),
      samplers.map((s) => ({ value: s.name, text: `${s.name} (${s.kind})`, title: s.description })),
    );
    const d = model.defaults;
    $("sampler").value = d.sampler;
    $("num_inference_steps").value = d.num_inference_steps;
    $("guidance_scale").value = d.guidance_scale;
    $("width").value = d.width;
    $("height").value = d.height;
    for (const id of ["width", "height"]) {
      $(id).step = model.size_multiple;
      $(id).min = model.size_multiple;
    }
    const kind = needs.control ? `text + ${cond.control.type} map` : needs.text ? "text" : "class";
    $("model-hint").textContent =
      `${kind} · ${model.schedule} schedule · ${model.image_channels === 1 ? "grayscale" : "colour"} · ` +
      `sizes in multiples of ${model.size_multiple}`;
    resizeCanvas();
  }

  function numberOrUndefined(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }

  // The request body the form describes (API field names; unset fields take the model's defaults).
  function readForm() {
    const model = state.model;
    const cond = model.conditioning;
    const body = { model: model.id };
    if (cond.text) {
      if ($("prompt").value) body.prompt = $("prompt").value;
      if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
    }
    if (cond.classes && cond.classes.length && $("class_label").value !== "") {
      body.class_label = Number($("class_label").value);
    }
    if (cond.control && state.controlDirty) {
      body.control_image = $("control-canvas").toDataURL("image/png").split(",")[1];
      body.control_scale = numberOrUndefined("control_scale");
    }
    body.sampler = $("sampler").value;
    for (const field of NUMBER_FIELDS) body[field] = numberOrUndefined(field);
    body.seed = numberOrUndefined("seed");
    for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
    return body;
  }

  // Set every field from saved parameters (gallery, a dropped PNG); fields it lacks are reset.
  function restore(params) {
    clearErrors();
    if (params.model && !state.models[params.model]) {
      showFormError(`model ${JSON.stringify(params.model)} is not loaded on this server`);
      return false;
    }
    if (params.model) $("model").value = params.model;
    applyModel();
    const cond = state.model.conditioning;
    $("prompt").value = params.prompt || "";
    $("negative_prompt").value = params.negative_prompt || "";
    if (cond.classes && cond.classes.length) {
      let label = params.class_label;
      if (typeof label === "string" && !/^\d+$/.test(label)) {
        const found = cond.classes.find((c) => c.name.toLowerCase() === label.toLowerCase());
        label = found ? found.index : undefined;
      }
      $("class_label").value = label === undefined || label === null ? "" : String(label);
    }
    if (params.sampler) {
      if (![...$("sampler").options].some((o) => o.value === params.sampler)) {
        $("sampler").add(new Option(params.sampler, params.sampler));
      }
      $("sampler").value = params.sampler;
    }
    for (const field of NUMBER_FIELDS) if (params[field] !== undefined) $(field).value = params[field];
    $("num_images").value = params.num_images || 1;
    $("seed").value = params.seed === undefined || params.seed === null ? "" : params.seed;
    $("control_scale").value = params.control_scale ?? 1;
    resizeCanvas();
    clearCanvas();
    if (params.control_image) loadControl(`data:image/png;base64,${params.control_image}`);
    setStatus(`Parameters restored${params.seed !== undefined ? ` (seed ${params.seed})` : ""}.`);
    return true;
  }

  // -- control canvas ----------------------------------------------------------------------------------

  // The canvas holds exactly the pixels sent (width x height of the request), shown enlarged.
  function clearCanvas() {
    const canvas = $("control-canvas");
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    state.controlDirty = false;
  }

  function resizeCanvas() {
    const canvas = $("control-canvas");
    const w = Number($("width").value) || canvas.width;
    const h = Number($("height").value) || canvas.height;
    if (w === canvas.width && h === canvas.height) return;
    const old = document.createElement("canvas");
    old.width = canvas.width;
    old.height = canvas.height;
    old.getContext("2d").drawImage(canvas, 0, 0);
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(old, 0, 0, w, h);
  }

  function loadControl(src) {
    const image = new Image();
    image.onload = () => {
      const canvas = $("control-canvas");
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
      state.controlDirty = true;
      if (src.startsWith("blob:")) URL.revokeObjectURL(src);
    };
    image.onerror = () => {
      document.querySelector('[data-error-for="control_image"]').textContent = "could not read that image";
    };
    image.src = src;
  }

  function setupCanvas() {
    const canvas = $("control-canvas");
    clearCanvas();
    let last = null;
    const point = (event) => {
      const rect = canvas.getBoundingClientRect();
      return [
        ((event.clientX - rect.left) / rect.width) * canvas.width,
        ((event.clientY - rect.top) / rect.height) * canvas.height,
      ];
    };
    const draw = (event) => {
      const ctx = canvas.getContext("2d");
      const [x, y] = point(event);
      ctx.strokeStyle = ctx.fillStyle = $("eraser").checked ? "#000" : "#fff";
      ctx.lineWidth = Number($("brush").value) || 1;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(...(last || [x, y]));
      ctx.lineTo(x, y);
      ctx.stroke();
      last = [x, y];
      state.controlDirty = true;
    };
    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      last = null;
      draw(event);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (event.buttons & 1) draw(event);
    });
    canvas.addEventListener("pointerup", () => {
      last = null;
    });
    $("control-clear").addEventListener("click", clearCanvas);
    $("control-file").addEventListener("change", () => {
      const file = $("control-file").files[0];
      if (file) loadControl(URL.createObjectURL(file));
      $("control-file").value = "";
    });
  }

  // -- running a job -----------------------------------------------------------------------------------

  function setRunning(running) {
    $("generate").disabled = running || !state.model;
    $("cancel").disabled = !running;
    document.body.classList.toggle("running", running);
  }

  async function generate() {
    if (state.job || !state.model) return;
    clearErrors();
    const params = readForm();
    const body = { ...params };
    const every = numberOrUndefined("preview_every") || 0;
    if (every > 0 && state.previews) body.preview_every = every;
    setRunning(true);
    $("progress").max = 1;
    $("progress").value = 0;
    $("preview-box").hidden = true;
    setStatus("Submitting…");
    let job;
    try {
      try {
        job = await api("v1/jobs", { method: "POST", body });
      } catch (error) {
        // A server without live previews names the field it does not know; ask again without it.
        const unknown = error.status === 422 && (error.body.detail || []).some((e) => (e.loc || []).includes("preview_every"));
        if (!unknown || !body.preview_every) throw error;
        state.previews = false;
        delete body.preview_every;
        job = await api("v1/jobs", { method: "POST", body });
      }
    } catch (error) {
      setRunning(false);
      setStatus("Not submitted.");
      showApiError(error);
      return;
    }
    const abort = new AbortController();
    state.job = { id: job.id, abort };
    showQueued(job.queue_position);
    const poll = pollQueue(job.id);
    try {
      const info = await follow(job, abort.signal);
      finish(info, params);
    } catch (error) {
      if (error.name !== "AbortError") {
        setStatus("Failed.");
        showApiError(error);
      }
    } finally {
      poll.stop();
      state.job = null;
      setRunning(false);
    }
  }

  function showQueued(position) {
    if (position === null || position === undefined) return;
    setStatus(position === 0 ? "Queued: next in line." : `Queued: position ${position + 1} (${position} ahead).`);
    document.body.dataset.queuePosition = position;
  }

  // The queued event comes once; the position changes as requests ahead start, so ask while queued.
  function pollQueue(id) {
    let stopped = false;
    const tick = async () => {
      while (!stopped) {
        await new Promise((r) => setTimeout(r, 1000));
        if (stopped || !state.job || state.job.id !== id || state.job.started) return;
        try {
          const info = await api(`v1/jobs/${id}`);
          if (!stopped && info.status === "queued") showQueued(info.queue_position);
          else return;
        } catch {
          return;
        }
      }
    };
    tick();
    return { stop: () => (stopped = true) };
  }

  // Follow the job's events to its end; the completed job (with its result), or an error.
  async function follow(job, signal) {
    for await (const { event, data } of events(`v1/jobs/${job.id}/events`, signal)) {
      if (event === "queued") {
        showQueued(data.queue_position);
      } else if (event === "started") {
        state.job.started = true;
        setStatus("Running…");
      } else if (event === "progress") {
        state.job.started = true;
        $("progress").max = data.total_steps;
        $("progress").value = data.step;
        setStatus(`Step ${data.step} / ${data.total_steps}`);
      } else if (event === "preview") {
        showPreviews(data.images || [data.image]);
        $("preview-caption").textContent = `preview at step ${data.step} / ${data.total_steps}`;
        $("preview-box").hidden = false;
      } else if (event === "completed") {
        return data.result ? data : await api(`v1/jobs/${job.id}`);
      } else if (event === "failed") {
        const err = data.error || {};
        throw new ApiError(err.status_code || 500, { message: err.message || "the job failed" });
      } else if (event === "cancelled") {
        setStatus("Cancelled.");
        throw Object.assign(new Error("cancelled"), { name: "AbortError" });
      }
    }
    // The stream ended without an outcome (connection lost): ask once.
    const info = await api(`v1/jobs/${job.id}`);
    if (info.status === "completed") return info;
    throw new ApiError(0, { message: `the event stream ended while the job was ${info.status}` });
  }

  // One preview per image of the job; the first keeps id "preview".
  function showPreviews(images) {
    const box = $("previews");
    while (box.children.length < images.length) {
      const img = document.createElement("img");
      img.alt = "live preview";
      box.append(img);
    }
    while (box.children.length > Math.max(images.length, 1)) box.lastElementChild.remove();
    images.forEach((image, i) => {
      box.children[i].src = `data:image/png;base64,${image}`;
    });
  }

  function finish(info, params) {
    const result = info.result;
    $("progress").max = result.num_inference_steps;
    $("progress").value = result.num_inference_steps;
    const t = result.timings;
    setStatus(
      `Done: ${result.images.length} image${result.images.length > 1 ? "s" : ""} in ` +
        `${t.total_seconds.toFixed(2)} s (queue ${t.queue_seconds.toFixed(2)} s, sampling ${t.sampling_seconds.toFixed(2)} s).`,
    );
    const figures = result.images.map((image, i) => {
      const seed = result.seeds[i];
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${image}`;
      img.alt = `result, seed ${seed}`;
      img.dataset.seed = seed;
      const caption = document.createElement("figcaption");
      const link = document.createElement("a");
      link.href = img.src;
      link.download = `${result.model}-${seed}.png`;
      link.textContent = "PNG";
      caption.append(`seed ${seed} · `, link);
      figure.append(img, caption);
      return figure;
    });
    $("results").replaceChildren(...figures);
    state.lastSeed = result.seeds[0];
    $("seed-reuse").disabled = false;
    // The server's resolved values (sampler, steps, guidance, size) fill in what the form left unset.
    const saved = {
      ...params,
      sampler: result.sampler,
      num_inference_steps: result.num_inference_steps,
      guidance_scale: result.guidance_scale,
      width: result.width,
      height: result.height,
    };
    addToGallery(result.images.map((image, i) => ({ params: { ...saved, seed: result.seeds[i] }, image })));
  }

  async function cancel() {
    const job = state.job;
    if (!job) return;
    setStatus("Cancelling…"); // before the answer: the job's "cancelled" event may arrive first
    try {
      await api(`v1/jobs/${job.id}/cancel`, { method: "POST" });
    } catch (error) {
      // 409: sampling has finished and the result is on its way (its events say how it ended)
      if (state.job === job) setStatus(error.message);
    }
  }

  // -- gallery ------------------------------------------------------------------------------------------

  function loadGallery() {
    try {
      const items = JSON.parse(localStorage.getItem(GALLERY_STORE) || "[]");
      return Array.isArray(items) ? items : [];
    } catch {
      return [];
    }
  }

  function saveGallery(items) {
    // localStorage holds a few MB: when full, forget the oldest half and try again.
    for (;;) {
      try {
        localStorage.setItem(GALLERY_STORE, JSON.stringify(items));
        return items;
      } catch (error) {
        if (!items.length) throw error;
        items = items.slice(0, Math.floor(items.length / 2));
      }
    }
  }

  function addToGallery(entries) {
    const now = Date.now();
    const items = entries.map((e, i) => ({ id: `${now}-${i}`, created: now, ...e }));
    renderGallery(saveGallery([...items, ...loadGallery()].slice(0, GALLERY_MAX)));
  }

  function describe(params) {
    const model = state.models[params.model];
    let what = params.prompt ? JSON.stringify(params.prompt) : "";
    if (params.class_label !== undefined && model && model.conditioning.classes) {
      const c = model.conditioning.classes[params.class_label];
      what = c ? c.name : String(params.class_label);
    }
    return `${params.model} · ${what || "unconditional"} · seed ${params.seed} · ${params.sampler} ` +
      `${params.num_inference_steps} steps · guidance ${params.guidance_scale}`;
  }

  function renderGallery(items = loadGallery()) {
    $("gallery").replaceChildren(
      ...items.map((item) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "thumb";
        button.title = describe(item.params);
        button.dataset.seed = item.params.seed;
        button.dataset.model = item.params.model;
        const img = document.createElement("img");
        img.src = `data:image/png;base64,${item.image}`;
        img.alt = button.title;
        button.append(img);
        button.addEventListener("click", () => restore(item.params));
        return button;
      }),
    );
  }

  // -- PNG parameters -----------------------------------------------------------------------------------

  const latin1 = (bytes) => Array.from(bytes, (b) => String.fromCharCode(b)).join("");

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // keyword -> text of every tEXt, zTXt and iTXt chunk of a PNG.
  async function pngText(buffer) {
    const bytes = new Uint8Array(buffer);
    const signature = [137, 80, 78, 71, 13, 10, 26, 10];
    if (bytes.length < 8 || signature.some((b, i) => bytes[i] !== b)) return null;
    const view = new DataView(buffer);
    const out = {};
    for (let offset = 8; offset + 12 <= bytes.length; ) {
      const length = view.getUint32(offset);
      const type = latin1(bytes.subarray(offset + 4, offset + 8));
      const data = bytes.subarray(offset + 8, offset + 8 + length);
      offset += 12 + length;
      if (type === "IEND") break;
      if (!["tEXt", "zTXt", "iTXt"].includes(type)) continue;
      const nul = data.indexOf(0);
      if (nul < 0) continue;
      const key = latin1(data.subarray(0, nul));
      try {
        if (type === "tEXt") {
          out[key] = latin1(data.subarray(nul + 1));
        } else if (type === "zTXt") {
          out[key] = latin1(await inflate(data.subarray(nul + 2)));
        } else {
          const compressed = data[nul + 1] === 1;
          let rest = data.subarray(nul + 3);
          rest = rest.subarray(rest.indexOf(0) + 1); // language tag
          rest = rest.subarray(rest.indexOf(0) + 1); // translated keyword
          out[key] = new TextDecoder().decode(compressed ? await inflate(rest) : rest);
        }
      } catch {
        // a damaged chunk: skip it
      }
    }
    return out;
  }

  // API field names from an A1111 "parameters" text (the same reading as server/pngmeta.py).
  function parseA1111(text) {
    const labels = {
      Steps: "num_inference_steps", Sampler: "sampler", "CFG scale": "guidance_scale", Seed: "seed",
      Model: "model", Class: "class_label", "Class name": "class_name", "Control scale": "control_scale",
    };
    const numeric = new Set(["num_inference_steps", "guidance_scale", "seed", "control_scale"]);
    const pair = /\s*([\w ][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    const lines = text.replace(/\n+$/, "").split("\n");
    const last = lines[lines.length - 1] || "";
    const pairs = [...last.matchAll(pair)].filter((m) => m[0].trim());
    const hasPairs = pairs.length >= 3; // as A1111: fewer is a prompt line holding colons
    const prompt = [];
    const negative = [];
    let target = prompt;
    for (let line of hasPairs ? lines.slice(0, -1) : lines) {
      if (line.startsWith("Negative prompt:")) {
        target = negative;
        line = line.slice("Negative prompt:".length).trim();
      }
      target.push(line);
    }
    const out = {};
    if (prompt.join("\n").trim()) out.prompt = prompt.join("\n").trim();
    if (negative.length) out.negative_prompt = negative.join("\n").trim();
    for (const [, rawLabel, raw] of hasPairs ? pairs : []) {
      const label = rawLabel.trim();
      const value = raw.startsWith('"') ? JSON.parse(raw) : raw.trim();
      if (label === "Size") {
        const [w, h] = value.split("x").map(Number);
        if (w && h) Object.assign(out, { width: w, height: h });
        continue;
      }
      const name = labels[label] || label;
      out[name] = numeric.has(name) && value !== "" && !Number.isNaN(Number(value)) ? Number(value) : value;
    }
    return out;
  }

  async function restoreFromPng(file) {
    const chunks = await pngText(await file.arrayBuffer());
    if (!chunks) {
      showFormError(`${file.name} is not a PNG`);
      return;
    }
    let params = null;
    try {
      if (chunks.unet_server) params = JSON.parse(chunks.unet_server);
    } catch {
      params = null;
    }
    if (!params && chunks.parameters) params = parseA1111(chunks.parameters);
    if (!params) {
      showFormError(`${file.name} carries no generation parameters`);
      return;
    }
    restore(params);
  }

  function setupDrop() {
    let depth = 0;
    const overlay = $("drop-overlay");
    const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
    document.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      depth += 1;
      overlay.hidden = !!event.target.closest?.("#control-canvas");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) overlay.hidden = true;
    });
    document.addEventListener("dragover", (event) => {
      if (hasFiles(event)) event.preventDefault();
    });
    document.addEventListener("drop", (event) => {
      depth = 0;
      overlay.hidden = true;
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (!file) return;
      event.preventDefault();
      clearErrors();
      // On the control canvas a dropped image is a control map; anywhere else, a recipe to restore.
      if (event.target.closest && event.target.closest("#control-canvas")) {
        loadControl(URL.createObjectURL(file));
      } else {
        restoreFromPng(file);
      }
    });
  }

  // -- start ---------------------------------------------------------------------------------------------

  async function load() {
    for (;;) {
      try {
        const [models, samplers] = await Promise.all([api("v1/models"), api("v1/samplers")]);
        state.models = Object.fromEntries(models.data.map((m) => [m.id, m]));
        state.samplers = samplers.data;
        break;
      } catch (error) {
        if (error.status === 503) {
          $("server-status").textContent = "models loading…";
          await new Promise((r) => setTimeout(r, 2000));
          continue;
        }
        $("server-status").textContent = `unavailable: ${error.message}`;
        showFormError(error.status === 401 ? "This server needs an API key (button above)." : error.message);
        return;
      }
    }
    const ids = Object.keys(state.models);
    fillSelect($("model"), ids.map((id) => ({ value: id, text: id })));
    $("server-status").textContent = `ready · ${ids.length} model${ids.length === 1 ? "" : "s"}`;
    applyModel();
    setRunning(false);
    document.body.dataset.ready = "true";
  }

  function init() {
    setupCanvas();
    setupDrop();
    renderGallery();
    $("model").addEventListener("change", () => {
      clearErrors();
      applyModel();
    });
    for (const id of ["width", "height"]) $(id).addEventListener("change", resizeCanvas);
    $("form").addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    $("cancel").addEventListener("click", cancel);
    $("seed-random").addEventListener("click", () => {
      $("seed").value = "";
    });
    $("seed-reuse").addEventListener("click", () => {
      if (state.lastSeed !== null) $("seed").value = state.lastSeed;
    });
    $("gallery-clear").addEventListener("click", () => {
      localStorage.removeItem(GALLERY_STORE);
      renderGallery([]);
    });
    $("key-button").addEventListener("click", () => {
      askKey("").then(() => (state.model ? null : load()), () => null);
    });
    document.addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
        event.preventDefault();
        generate();
      }
    });
    load();
  }

  init();
})();
