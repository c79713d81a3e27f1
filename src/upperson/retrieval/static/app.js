// The upperson search page: talks to the API of the server that served it; nothing from elsewhere.
"use strict";

const TOKEN_KEY = "upperson-token";
const el = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  generation: 0,   // the latest result set; older thumbnail loads are dropped
  objectUrls: [],  // thumbnails of the shown results, released when they are replaced
  hits: [],
  viewerHit: null,
};

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    showTokenForm();
    throw new ApiError(state.token ? "the token was not accepted; enter it again" : "this server needs an access token", 401);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) { /* not JSON: keep the status text */ }
    throw new ApiError(detail, response.status);
  }
  return response;
}

async function apiJson(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  return (await api(path, options)).json();
}

function setStatus(text, isError = false) {
  const status = el("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function showTokenForm() {
  el("token-form").hidden = false;
  el("token").focus();
}

async function loadScenarios() {
  try {
    const scenarios = await apiJson("/api/scenarios");
    const select = el("scenario");
    const previous = select.value;
    select.replaceChildren(...scenarios.map((scenario) => {
      const option = document.createElement("option");
      option.value = scenario.name;
      option.textContent = `${scenario.name} (${scenario.images} images, ${scenario.method})`;
      return option;
    }));
    if (scenarios.some((scenario) => scenario.name === previous)) select.value = previous;
    el("token-form").hidden = true;
    setStatus(scenarios.length ? "Describe a person and press Enter." : "The server has no scenarios.");
    el("query").focus();
  } catch (error) {
    setStatus(`Could not load the scenarios: ${error.message}`, true);
  }
}

function topK() {
  const value = Number.parseInt(el("top-k").value, 10);
  return Number.isFinite(value) ? value : 20;
}

async function runSearch(label, source, request) {
  setStatus(`Searching ${label}…`);
  const started = performance.now();
  try {
    const result = await request();
    const roundTrip = performance.now() - started;
    render(result, source);
    setStatus(
      `${result.hits.length} results for ${label} in ${Math.round(roundTrip)} ms ` +
      `(server ${result.took_ms.toFixed(1)} ms, scenario ${result.scenario})`,
    );
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  }
}

function searchText(event) {
  event.preventDefault();
  const query = el("query").value.trim();
  if (!query) {
    setStatus("Type a description first.", true);
    return;
  }
  const scenario = el("scenario").value;
  runSearch(`“${query}”`, `text:${query}`, () => apiJson("/api/search", { scenario, query, top_k: topK() }));
}

function searchRow(scenario, row, path) {
  runSearch(`images like ${path}`, `row:${row}`, () => apiJson("/api/search/image", { scenario, row, top_k: topK() }));
}

function searchUpload(file) {
  if (!file) return;
  const form = new FormData();
  form.append("scenario", el("scenario").value);
  form.append("top_k", String(topK()));
  form.append("file", file);
  runSearch(`images like ${file.name}`, `upload:${file.name}`,
    async () => (await api("/api/search/image", { method: "POST", body: form })).json());
}

function render(result, source) {
  state.generation += 1;
  const generation = state.generation;
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
  state.hits = result.hits.map((hit, index) => ({ ...hit, rank: index + 1, scenario: result.scenario }));
  const list = el("results");
  list.replaceChildren(...state.hits.map((hit) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.row = String(hit.row);
    button.dataset.path = hit.path;
    button.dataset.rank = String(hit.rank);
    button.setAttribute("aria-label", `Rank ${hit.rank}, score ${hit.score.toFixed(3)}: ${hit.path}. Open larger view.`);
    button.title = hit.path;
    const image = document.createElement("img");
    image.alt = "";
    image.width = 96;
    image.height = 192;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.innerHTML = '<span class="rank"></span><span class="score"></span>';
    meta.querySelector(".rank").textContent = `#${hit.rank}`;
    meta.querySelector(".score").textContent = hit.score.toFixed(3);
    button.append(image, meta);
    button.addEventListener("click", () => openViewer(hit));
    item.append(button);
    return item;
  }));
  list.dataset.source = source;
  list.dataset.thumbnails = "loading";
  Promise.all(state.hits.map((hit, index) => loadThumbnail(hit, list.children[index].querySelector("img"), generation)))
    .then(() => { if (generation === state.generation) list.dataset.thumbnails = "loaded"; });
}

async function loadThumbnail(hit, image, generation) {
  try {
    const blob = await (await api(`/api/images/${encodeURIComponent(hit.scenario)}/${hit.row}/thumbnail`)).blob();
    if (generation !== state.generation) return;
    const url = URL.createObjectURL(blob);
    state.objectUrls.push(url);
    image.src = url;
  } catch (_) {
    image.alt = "thumbnail not available";
  }
}

async function openViewer(hit) {
  state.viewerHit = hit;
  const viewer = el("viewer");
  el("viewer-title").textContent = `#${hit.rank} ${hit.path}`;
  const size = hit.width && hit.height ? `${hit.width}×${hit.height} px, ` : "";
  el("viewer-info").textContent = `${size}score ${hit.score.toFixed(4)}, row ${hit.row}`;
  const image = el("viewer-image");
  image.removeAttribute("src");
  image.alt = hit.path;
  viewer.showModal();
  el("more-like-this").focus();
  try {
    const blob = await (await api(`/api/images/${encodeURIComponent(hit.scenario)}/${hit.row}`)).blob();
    if (state.viewerHit === hit) {
      if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
      image.src = URL.createObjectURL(blob);
    }
  } catch (error) {
    el("viewer-info").textContent += ` (image not available: ${error.message})`;
  }
}

function closeViewer() {
  const image = el("viewer-image");
  if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
  image.removeAttribute("src");
  el("viewer").close();
}

function setUpDropZone() {
  const zone = el("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    searchUpload(event.dataTransfer.files[0]);
  });
  el("image-file").addEventListener("change", (event) => {
    searchUpload(event.target.files[0]);
    event.target.value = "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  el("search-form").addEventListener("submit", searchText);
  el("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = el("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    el("token").value = "";
    loadScenarios();
  });
  el("more-like-this").addEventListener("click", () => {
    const hit = state.viewerHit;
    closeViewer();
    if (hit) searchRow(hit.scenario, hit.row, hit.path);
  });
  el("viewer-close").addEventListener("click", closeViewer);
  el("viewer").addEventListener("close", () => state.viewerHit && el("results").querySelector(`[data-row="${state.viewerHit.row}"]`)?.focus());
  setUpDropZone();
  loadScenarios();
});
