// The review page of anomnet's inspection service: score images, move the false-alarm rate, mark mistakes.
// Plain JavaScript, no library: everything this page needs is served by the same app.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    models: [],
    model: null,      // the chosen model's info from GET /v1/models
    items: [],        // {id, file, name, result, error, mark, markFile, order}
    review: false,    // marks can be saved (the server has a review folder)
    nextOrder: 0,
    atModel: true,    // decisions are the model's own (from the service); false once the slider moved
  };
  const MARK_TEXT = {
    false_alarm: "false alarm",
    missed_defect: "missed defect",
    confirmed_good: "confirmed good",
    confirmed_defect: "confirmed defect",
  };

  // ---------------------------------------------------------------- server calls
  function headers() {
    const key = sessionStorage.getItem("anomnet-api-key");
    return key ? { "X-API-Key": key } : {};
  }

  async function call(method, url, body) {
    const response = await fetch(url, { method, body, headers: headers() });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) {
      $("key-box").hidden = false;
    }
    if (!response.ok) {
      const reason = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
      throw new Error(`${response.status}: ${reason}`);
    }
    return data;
  }

  // ---------------------------------------------------------------- models
  async function loadModels() {
    try {
      const data = await call("GET", "/v1/models");
      state.models = data.models;
      state.review = data.review;
      const select = $("model");
      select.textContent = "";
      for (const m of data.models) {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = m.detector ? `${m.name} (${m.detector})` : m.name;
        select.appendChild(option);
      }
      chooseModel(select.value);
      setStatus("");
    } catch (err) {
      setStatus(`cannot list the models: ${err.message}`);
    }
  }

  function chooseModel(name) {
    const model = state.models.find((m) => m.name === name) || null;
    state.model = model;
    state.items = [];
    $("cards").textContent = "";
    if (!model) return;
    const n = model.validation_images;
    $("model-info").textContent =
      `score threshold ${number(model.threshold)} (${model.image_method}; a score at or above it is defective), ` +
      `${n} good validation images, false-alarm rate ${percent(model.achieved_false_alarm)} ` +
      `(asked ${percent(model.max_false_alarm)})` + (model.version ? `, version ${model.version}` : "");
    $("model-info").dataset.threshold = String(model.threshold);
    renderLegend(model);
    state.atModel = true;
    const rate = $("rate");
    rate.min = "1";
    rate.max = String(n + 1);
    rate.disabled = n === 0;
    // start where the model's own threshold is: the largest k with k / (n + 1) <= max_false_alarm
    rate.value = String(Math.max(1, Math.floor(model.max_false_alarm * (n + 1) + 1e-9)));
    $("review-note").textContent = state.review
      ? "Marks are saved on the server as a labelled validation folder (good/ and defective/) " +
        "for `anomnet calibrate --labelled`."
      : "This server has no review folder (--review-dir): marks cannot be saved.";
    render();
  }

  function toModel() {
    state.atModel = true;
    render();
  }

  function fromSlider() {
    state.atModel = false;
    render();
  }

  function currentRate() {
    const n = state.model ? state.model.validation_images : 0;
    return Number($("rate").value) / (n + 1);
  }

  // ---------------------------------------------------------------- scoring
  async function addFiles(files) {
    if (!state.model) return;
    const list = Array.from(files);
    let done = 0;
    setStatus(`scoring 0 of ${list.length} ...`);
    const model = state.model.name;
    const queue = list.map((file) => {
      const item = { id: null, file, name: file.name, result: null, error: null, mark: null, markFile: null,
                     order: state.nextOrder++ };
      state.items.push(item);
      return item;
    });
    render();
    const worker = async () => {
      while (queue.length) {
        const item = queue.shift();
        const form = new FormData();
        form.append("file", item.file, item.file.name);
        try {
          const data = await call("POST", `/v1/models/${encodeURIComponent(model)}/predict?overlay=true&heatmap=true`, form);
          item.result = data.results[0];
        } catch (err) {
          item.error = err.message;
        }
        done += 1;
        setStatus(done < list.length ? `scoring ${done} of ${list.length} ...` : `scored ${list.length} image(s)`);
        render();
      }
    };
    await Promise.all([worker(), worker()]);
  }

  // ---------------------------------------------------------------- marks
  async function mark(item, kind) {
    if (!state.review) {
      item.markFile = "not saved: the server has no review folder";
      render();
      return;
    }
    const model = encodeURIComponent(state.model.name);
    try {
      if (item.mark === kind && item.id) {  // the same button again takes the mark back
        await call("DELETE", `/v1/models/${model}/review/${item.id}`);
        item.mark = null;
        item.markFile = "mark removed";
      } else {
        const form = new FormData();
        form.append("file", item.file, item.file.name);
        form.append("mark", kind);
        const entry = await call("POST", `/v1/models/${model}/review`, form);
        item.id = entry.id;
        item.mark = entry.mark;
        item.markFile = `saved as ${entry.file}`;
      }
    } catch (err) {
      item.markFile = `not saved: ${err.message}`;
    }
    render();
  }

  // ---------------------------------------------------------------- the heat maps' colour scale
  // The same scale as anomnet.predict.visualize: blue at map_low (the median map value of the good validation
  // images), the middle at map_high (the highest value seen on them), red at twice that distance.
  function colour(v) {  // visualize.colormap: a jet-like ramp, piecewise linear between multiples of 1/8
    const c = (x) => Math.floor(Math.min(Math.max(x, 0), 1) * 255 + 0.5);
    return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
  }

  function scaleValue(x) {  // visualize.format_value: 4 significant digits
    return String(Number(Number(x).toPrecision(4)));
  }

  function renderLegend(model) {
    const legend = $("legend");
    legend.hidden = model.map_low === null || model.map_low === undefined || model.map_high === null;
    if (legend.hidden) return;
    const low = model.map_low;
    const top = low + 2 * Math.max(model.map_high - low, 1e-12);
    const where = (x) => Math.min(Math.max((x - low) / (top - low), 0), 1);
    const stops = [];
    for (let i = 0; i <= 8; i++) stops.push(`rgb(${colour(i / 8).join(",")}) ${(100 * i) / 8}%`);
    const ramp = $("legend-ramp");
    ramp.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
    ramp.dataset.low = String(low);
    ramp.dataset.top = String(top);
    const place = (el, x) => {
      const at = where(x);
      el.style.left = `${100 * at}%`;
      el.classList.toggle("end", at > 0.75);
      el.dataset.value = String(x);
      el.dataset.at = String(at);
    };
    const ticks = $("legend-ticks");
    ticks.textContent = "";
    for (const [kind, value, words] of [
      ["low", low, "median of good images"],
      ["high", model.map_high, "highest on good images"],
      ["top", top, ""],
    ]) {
      const tick = document.createElement("span");
      tick.className = "tick";
      tick.dataset.kind = kind;
      tick.textContent = scaleValue(value) + (words ? ` ${words}` : "");
      place(tick, value);
      ticks.appendChild(tick);
    }
    const marks = $("legend-marks");
    marks.textContent = "";
    ramp.textContent = "";
    const thr = model.pixel_threshold;
    if (thr !== null && thr !== undefined) {
      const mark = document.createElement("span");
      mark.className = "mark";
      mark.dataset.kind = "pixel threshold";
      const off = thr > top ? " (beyond the scale)" : thr < low ? " (below the scale)" : "";
      mark.textContent = `pixel threshold ${scaleValue(thr)}${off}: a defective image's mask starts here`;
      place(mark, thr);
      marks.appendChild(mark);
      const line = document.createElement("span");
      line.className = "threshold-line";
      line.style.left = `${100 * where(thr)}%`;
      ramp.appendChild(line);
    }
  }

  // ---------------------------------------------------------------- drawing
  function percent(x) {
    if (x === null || x === undefined) return "-";
    const p = 100 * x;
    return `${p >= 10 ? p.toFixed(0) : p >= 1 ? p.toFixed(1) : p.toPrecision(2)} %`;
  }

  function number(x) {
    return x === null || x === undefined ? "-" : Number(x).toPrecision(5);
  }

  function setStatus(text) { $("status").textContent = text; }

  function sorted(items) {
    const how = $("sort").value;
    const score = (it) => (it.result && it.result.score !== null ? it.result.score : -Infinity);
    const copy = items.slice();
    if (how === "score-desc") copy.sort((a, b) => score(b) - score(a) || a.order - b.order);
    else if (how === "score-asc") copy.sort((a, b) => score(a) - score(b) || a.order - b.order);
    else copy.sort((a, b) => a.order - b.order);
    return copy;
  }

  function render() {
    const rate = currentRate();
    // At first the cards show the service's decisions (the model's own threshold, whatever its method);
    // the slider then shows what a conformal threshold at another false-alarm rate would decide.
    const atModel = state.atModel;
    $("rate-value").textContent = !state.model ? "" : atModel ? "the model's threshold" : percent(rate);
    $("rate-value").dataset.atModel = String(atModel);
    $("at-model").disabled = atModel;
    const scored = state.items.filter((it) => it.result);
    let flagged = 0;
    let flips = 0;
    const cards = $("cards");
    cards.textContent = "";
    for (const item of sorted(state.items)) {
      const card = $("card-template").content.firstElementChild.cloneNode(true);
      card.dataset.name = item.name;
      card.querySelector(".name").textContent = item.name;
      const r = item.result;
      if (!r) {
        card.classList.add("error");
        card.querySelector(".decision").textContent = item.error ? "error" : "...";
        card.querySelector(".numbers").textContent = item.error || "scoring ...";
        cards.appendChild(card);
        continue;
      }
      const defective = atModel ? r.defective : r.p_value !== null && r.p_value <= rate + 1e-12;
      const flipped = defective !== r.defective;
      flagged += defective ? 1 : 0;
      flips += flipped ? 1 : 0;
      card.classList.add(defective ? "defective" : "good");
      card.classList.toggle("flipped", flipped);
      card.dataset.decision = defective ? "defective" : "good";
      card.dataset.score = String(r.score);
      card.querySelector(".decision").textContent = defective ? "defective" : "good";
      const regions = r.regions.length;
      card.querySelector(".numbers").textContent =
        `score ${r.score.toPrecision(5)} (threshold ${number(r.threshold)}) · p ${r.p_value.toPrecision(3)} · ` +
        `${r.defect_pixels} defect px · ${regions} region${regions === 1 ? "" : "s"}`;
      const overlayImg = card.querySelector(".overlay");
      overlayImg.src = `data:image/png;base64,${r.overlay_png}`;
      overlayImg.alt = `heat-map overlay of ${item.name}`;
      const heatImg = card.querySelector(".heatmap");
      heatImg.src = `data:image/png;base64,${r.heatmap_png}`;
      heatImg.alt = `heat map of ${item.name}`;
      const original = card.querySelector(".original");
      const showOriginal = card.querySelector(".show-original");
      const showPicture = () => {
        const heat = $("picture").value === "heatmap";
        original.hidden = !showOriginal.checked;
        overlayImg.hidden = showOriginal.checked || heat;
        heatImg.hidden = showOriginal.checked || !heat;
      };
      showOriginal.addEventListener("change", () => {
        if (!item.objectUrl) item.objectUrl = URL.createObjectURL(item.file);
        original.src = item.objectUrl;
        original.alt = item.name;
        showPicture();
      });
      showPicture();
      const wrong = card.querySelector(".mark-wrong");
      const right = card.querySelector(".mark-right");
      const wrongKind = defective ? "false_alarm" : "missed_defect";
      const rightKind = defective ? "confirmed_defect" : "confirmed_good";
      wrong.textContent = defective ? "False alarm" : "Missed defect";
      right.textContent = defective ? "Confirm defect" : "Confirm good";
      wrong.dataset.mark = wrongKind;
      right.dataset.mark = rightKind;
      wrong.classList.toggle("active", item.mark === wrongKind);
      right.classList.toggle("active", item.mark === rightKind);
      wrong.addEventListener("click", () => mark(item, wrongKind));
      right.addEventListener("click", () => mark(item, rightKind));
      card.querySelector(".marked").textContent = item.mark
        ? `${MARK_TEXT[item.mark]}: ${item.markFile || ""}`
        : item.markFile || "";
      cards.appendChild(card);
    }
    const summary = $("summary");
    summary.dataset.flagged = String(flagged);
    summary.dataset.flips = String(flips);
    summary.textContent = scored.length
      ? `${flagged} of ${scored.length} flagged ${atModel ? "by the model's threshold" : "at this rate"}; ` +
        `${flips} flip${flips === 1 ? "" : "s"} against the model's threshold`
      : "";
  }

  // ---------------------------------------------------------------- wiring
  $("model").addEventListener("change", (e) => chooseModel(e.target.value));
  $("rate").addEventListener("input", fromSlider);
  $("at-model").addEventListener("click", toModel);
  $("sort").addEventListener("change", render);
  $("picture").addEventListener("change", render);
  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem("anomnet-api-key", e.target.value);
    loadModels();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
  });
  loadModels();
})();
