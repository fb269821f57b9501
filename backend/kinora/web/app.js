// Kinora's page: submit a video, then watch it with kinora-progress.js (EventSource,
// resumed where it left off, polling while the stream is down). An ES module with no
// build step; talks only to the API it is served from.
import { watch, watchMany } from "/static/kinora-progress.js";

const TOKEN_KEY = "kinora.token";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

let token = null;
let current = null; // {id, streamUrl, lastSeq, watching, status, countdown}
let submitting = false;
let list = null; // the list's one stream: every running video of the user (watchMany)

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
  if (list) list.close();
  list = null;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("sign-in-error").hidden = !message;
}

function start() {
  $("sign-in-error").hidden = true;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  loadVideos().then(() => {
    const match = location.hash.match(/^#video-(\d+)$/);
    if (match) select(Number(match[1]));
    watchList();
  });
}

let reloading = null;
function reloadList() {
  reloading = reloading || loadVideos().finally(() => { reloading = null; });
}

// Every running video's badge moves live, over ONE connection for all of them (a
// browser holds six per origin: one stream per video would leave the page none).
function watchList() {
  if (list) list.close();
  list = watchMany({
    // EventSource sends no headers: the API token goes in the URL (only this stream's).
    streamUrl: `/api/v1/stream?token=${encodeURIComponent(token)}`,
    onEvent: (id, event) => {
      const li = $("videos").querySelector(`li[data-id="${id}"]`);
      if (!li) { reloadList(); return; } // new to the list: it takes it in
      const badge = li.querySelector(".badge");
      const status = event.type === "complete" ? event.status : event.status || "processing";
      badge.className = `badge ${status}`;
      badge.textContent = status === "processing" && typeof event.progress === "number"
        ? `${event.progress}%` : status;
    },
    onConnection: (state) => { $("videos").dataset.stream = state; },
    onAccessEnd: () => signOut("Your API token was rotated or has expired: sign in again"),
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
    reveal($("detail"));
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

// On a phone the progress card sits below the form: bring it into view after Generate.
function reveal(element) {
  const top = element.getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight * 0.6) element.scrollIntoView({ block: "start" });
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

function setOutcome(status) {
  $("bar").dataset.status = status || "";
}

function closeStream() {
  if (!current) return;
  if (current.watching) current.watching.close();
  clearInterval(current.countdown);
  current.watching = current.countdown = null;
}

async function select(id) {
  closeStream();
  current = { id, lastSeq: 0, watching: null, status: null, countdown: null };
  history.replaceState(null, "", `#video-${id}`);
  for (const li of $("videos").children) li.setAttribute("aria-selected", String(li.dataset.id == id));
  $("detail").hidden = false;
  $("detail-title").textContent = `Video ${id}`;
  $("log").replaceChildren();
  showError(null);
  setOutcome(null);
  $("player").hidden = true;
  $("player").removeAttribute("src");
  setProgress(0);
  setConnection("idle");
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
    showError(await detail(response));
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
  const mine = current;
  mine.watching = watch({
    streamUrl: mine.streamUrl,
    pollUrl: `/api/v1/videos/${mine.id}`,
    headers: { Authorization: `Bearer ${token}` },
    lastEventId: mine.lastSeq,
    onEvent: (event) => mine === current && addEvent(event),
    onConnection: (state) => {
      if (mine === current && state !== "done") setConnection(state);
    },
    onComplete: () => {
      if (mine === current) refresh().then((video) => video && finish(video));
    },
    onAccessEnd: (event) => {
      if (mine !== current) return;
      if (event.code === "token_revoked") {
        signOut("Your API token was rotated: sign in with the new one.");
        return;
      }
      // The stream URL's token expired: fetch the video for a new one, and go on from
      // the last event seen.
      refresh().then((video) => {
        if (!video || mine !== current) return;
        mine.streamUrl = video.stream_url;
        if (TERMINAL.has(video.status)) finish(video);
        else openStream();
      });
    },
  });
}

function finish(video) {
  closeStream();
  current.status = video.status;
  setConnection(video.status === "completed" ? "done" : video.status);
  setOutcome(video.status);
  $("cancel").hidden = true;
  setProgress(video.status === "completed" ? 100 : Number($("bar").getAttribute("aria-valuenow")));
  if (video.status === "completed" && video.video_url) {
    showError(null);
    const player = $("player");
    if (video.thumbnail_url) player.poster = video.thumbnail_url;
    player.src = video.video_url;
    player.hidden = false;
  } else if (video.status === "failed") {
    $("step").textContent = "Failed";
    showError(`Failed: ${video.error_message || "the video could not be generated"}`);
  } else {
    $("step").textContent = "Cancelled";
  }
  loadVideos();
}

function showError(text, kind = "failed") {
  if (current) {
    clearInterval(current.countdown);
    current.countdown = null;
  }
  $("error-box").textContent = text || "";
  $("error-box").dataset.kind = kind;
  $("error-box").hidden = !text;
}

// A retry is not a failure: an amber note with its attempt and its real wait, counted
// down (the error event says how long it is), in words rather than the raw error code.
function showRetry(event) {
  const attempt = `attempt ${event.retry_count + 1} of ${event.max_retries + 1} failed`;
  const until = Date.now() + 1000 * (event.retry_in_seconds || 0);
  const draw = () => {
    const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    $("error-box").textContent = `Trying again: ${event.message} — ${attempt}, ` +
      (left ? `retrying in ${left} s` : "retrying now");
  };
  showError(" ", "retrying");
  draw();
  current.countdown = setInterval(draw, 1000);
}

function addEvent(event) {
  if (!current || event.seq <= current.lastSeq) return; // each event once
  current.lastSeq = event.seq;
  const li = document.createElement("li");
  li.dataset.seq = event.seq;
  if ("step" in event) li.dataset.step = event.step;
  li.dataset.type = event.type;
  if (event.type === "complete") li.dataset.status = event.status;
  const time = document.createElement("time");
  time.textContent = new Date(event.timestamp).toLocaleTimeString([], { hour12: false });
  const text = document.createElement("span");
  text.textContent = event.message;
  li.append(time, text);
  const log = $("log");
  log.append(li);
  log.scrollTop = log.scrollHeight;
  if (typeof event.progress === "number") setProgress(event.progress);
  if (event.type !== "complete" && event.type !== "error") $("step").textContent = event.message;
  if (event.type === "error") {
    if (event.is_retryable) showRetry(event);
    else showError(`${event.message} (${event.error_code})`);
  } else if (event.type === "progress" && current.countdown) {
    showError(null); // the retry is under way
  }
  if (event.type === "complete") {
    current.status = event.status;
    setOutcome(event.status);
  }
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
  if (!response.ok) showError(await detail(response));
}

function main() {
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
}

// A module runs after the document is parsed.
main();
