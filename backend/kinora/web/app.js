// Kinora's page: submit a video, then watch it over EventSource (polling while the
// stream is down). No build step; talks only to the API it is served from.
"use strict";

const TOKEN_KEY = "kinora.token";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

let token = null;
let current = null; // {id, streamUrl, lastSeq, source, poll, reopen, status}
let submitting = false;

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    signOut("Your token was not accepted: paste a valid one.");
    throw new Error("unauthorized");
  }
  return response;
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; }
  catch { return response.statusText; }
}

// -- sign in ------------------------------------------------------------------------

function takeTokenFromUrl() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    localStorage.setItem(TOKEN_KEY, fromUrl);
    url.searchParams.delete("token"); // keep it out of history and screenshots
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return localStorage.getItem(TOKEN_KEY);
}

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  token = null;
  closeStream();
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  if (message) $("token-input").placeholder = message;
}

function start() {
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  loadVideos().then(() => {
    const match = location.hash.match(/^#video-(\d+)$/);
    if (match) select(Number(match[1]));
  });
}

// -- the list -------------------------------------------------------------------------

async function loadVideos() {
  const response = await api("/api/v1/videos?limit=50");
  if (!response.ok) return;
  const { videos } = await response.json();
  const list = $("videos");
  list.replaceChildren(...videos.map((v) => {
    const li = document.createElement("li");
    li.dataset.id = v.id;
    li.setAttribute("aria-selected", String(current && current.id === v.id));
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = v.prompt;
    const badge = document.createElement("span");
    badge.className = `badge ${v.status}`;
    badge.textContent = v.status === "processing" ? `${v.progress}%` : v.status;
    li.append(p, badge);
    li.addEventListener("click", () => select(v.id));
    return li;
  }));
  if (!videos.length) list.innerHTML = '<li class="empty">No videos yet.</li>';
}

// -- generating -------------------------------------------------------------------------

async function onGenerate(event) {
  event.preventDefault();
  if (submitting) return; // a double click submits once
  submitting = true;
  const button = $("generate");
  button.disabled = true;
  $("form-error").hidden = true;
  const form = new FormData($("generate-form"));
  const body = {
    prompt: form.get("prompt"),
    seconds: Number(form.get("seconds")),
    size: form.get("size"),
  };
  if (form.get("image_url")) body.image_url = form.get("image_url");
  try {
    // One key per submission: a retried request cannot make a second video.
    const response = await api("/api/v1/videos/generate", {
      method: "POST", body: JSON.stringify(body), headers: { "Idempotency-Key": newKey() },
    });
    if (response.status !== 202) throw new Error(await detail(response));
    const created = await response.json();
    $("prompt").value = "";
    await select(created.video_id);
    loadVideos();
  } catch (error) {
    if (error.message !== "unauthorized") {
      $("form-error").textContent = error.message;
      $("form-error").hidden = false;
    }
  } finally {
    submitting = false;
    button.disabled = false;
  }
}

// -- watching one video ---------------------------------------------------------------------

function setConnection(state) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = state;
}

function setProgress(value) {
  $("bar").setAttribute("aria-valuenow", String(value));
  $("bar-fill").style.width = `${value}%`;
  $("percent").textContent = `${value}%`;
}

function closeStream() {
  if (!current) return;
  if (current.source) current.source.close();
  clearInterval(current.poll);
  clearTimeout(current.reopen);
  current.source = current.poll = current.reopen = null;
}

async function select(id) {
  closeStream();
  current = { id, lastSeq: 0, source: null, poll: null, reopen: null, status: null };
  history.replaceState(null, "", `#video-${id}`);
  for (const li of $("videos").children) li.setAttribute("aria-selected", String(li.dataset.id == id));
  $("detail").hidden = false;
  $("detail-title").textContent = `Video ${id}`;
  $("log").replaceChildren();
  $("error-box").hidden = true;
  $("player").hidden = true;
  $("player").removeAttribute("src");
  setProgress(0);
  $("step").textContent = "";
  const video = await refresh();
  if (!video) return;
  current.streamUrl = video.stream_url;
  if (TERMINAL.has(video.status)) finish(video);
  else openStream();
}

async function refresh() {
  const watching = current;
  const response = await api(`/api/v1/videos/${watching.id}`);
  if (watching !== current) return null;
  if (!response.ok) {
    $("error-box").textContent = await detail(response);
    $("error-box").hidden = false;
    return null;
  }
  const video = await response.json();
  $("detail-prompt").textContent = video.prompt;
  current.status = video.status;
  for (const event of video.logs) addEvent(event);
  setProgress(Math.max(video.progress, Number($("bar").getAttribute("aria-valuenow"))));
  $("cancel").hidden = TERMINAL.has(video.status);
  return video;
}

function openStream() {
  const watching = current;
  // A new EventSource cannot send Last-Event-ID itself: the query parameter can.
  const url = watching.lastSeq ? `${watching.streamUrl}&last_event_id=${watching.lastSeq}` : watching.streamUrl;
  const source = new EventSource(url);
  watching.source = source;
  source.onopen = () => {
    if (watching !== current) return;
    setConnection("connected");
    clearInterval(watching.poll);
    watching.poll = null;
  };
  source.onmessage = (message) => {
    if (watching !== current) return;
    const event = JSON.parse(message.data);
    addEvent(event);
    if (event.type === "complete") {
      source.close();
      refresh().then((video) => video && finish(video));
    }
  };
  source.onerror = () => {
    if (watching !== current || TERMINAL.has(watching.status)) return;
    setConnection("reconnecting");
    startPolling(watching);
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (an HTTP error or 204): try again shortly ourselves.
      watching.reopen = setTimeout(() => watching === current && openStream(), 3000);
    }
  };
}

function startPolling(watching) {
  if (watching.poll) return;
  watching.poll = setInterval(async () => {
    try {
      const video = await refresh();
      if (video && TERMINAL.has(video.status)) finish(video);
    } catch { /* the server is down too: keep trying */ }
  }, 2000);
}

function finish(video) {
  closeStream();
  setConnection("done");
  $("cancel").hidden = true;
  setProgress(video.status === "completed" ? 100 : Number($("bar").getAttribute("aria-valuenow")));
  if (video.status === "completed" && video.video_url) {
    const player = $("player");
    if (video.thumbnail_url) player.poster = video.thumbnail_url;
    player.src = video.video_url;
    player.hidden = false;
  } else if (video.status !== "completed") {
    $("step").textContent = video.error_message || `Video ${video.status}`;
  }
  loadVideos();
}

function addEvent(event) {
  if (!current || event.seq <= current.lastSeq) return; // each event once
  current.lastSeq = event.seq;
  const li = document.createElement("li");
  li.dataset.seq = event.seq;
  if ("step" in event) li.dataset.step = event.step;
  li.dataset.type = event.type;
  const time = document.createElement("time");
  time.textContent = new Date(event.timestamp).toLocaleTimeString([], { hour12: false });
  const text = document.createElement("span");
  text.textContent = event.message;
  li.append(time, text);
  const log = $("log");
  log.append(li);
  log.scrollTop = log.scrollHeight;
  if (typeof event.progress === "number") setProgress(event.progress);
  if (event.type !== "complete") $("step").textContent = event.message;
  if (event.type === "error") {
    const attempt = `attempt ${event.retry_count + 1} of ${event.max_retries + 1}`;
    const box = $("error-box");
    box.textContent = `${event.message} (${event.error_code}, ${attempt})` +
      (event.is_retryable ? " · retrying shortly" : "");
    box.hidden = false;
  }
  if (event.type === "complete") current.status = event.status;
  const badge = document.querySelector(`#videos li[data-id="${current.id}"] .badge`);
  if (badge) {
    const status = event.type === "complete" ? event.status : event.status || "processing";
    badge.className = `badge ${status}`;
    badge.textContent = status === "processing" && typeof event.progress === "number"
      ? `${event.progress}%` : status;
  }
}

async function onCancel() {
  if (!current) return;
  const response = await api(`/api/v1/videos/${current.id}/cancel`, { method: "POST" });
  if (!response.ok) {
    $("error-box").textContent = await detail(response);
    $("error-box").hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", onGenerate);
  $("cancel").addEventListener("click", onCancel);
  $("sign-out").addEventListener("click", () => signOut());
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    token = localStorage.getItem(TOKEN_KEY);
    start();
  });
  token = takeTokenFromUrl();
  if (token) start();
  else signOut();
});
