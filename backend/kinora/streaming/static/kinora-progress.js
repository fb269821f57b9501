// kinora-progress.js: watch a job's live progress in the browser (docs/library.md).
// An ES module with no build step:
//
//   import { watch } from "/progress/kinora-progress.js";
//   const watching = watch({
//     streamUrl: "/progress/42/stream", pollUrl: "/progress/42",
//     onProgress: (percent, event) => ..., onLog: (event) => ...,
//     onError: (event) => ..., onComplete: (event) => ...,
//     onAccessEnd: (event) => ...,  // the URL's token expired or was revoked
//   });
//   watching.close();
//
// EventSource, resumed where it left off (each event once, in order); while the
// stream is down, the snapshot at `pollUrl` is polled so the page keeps moving.
//
// Several jobs on ONE connection (a browser holds six per origin):
//
//   import { watchMany } from "/progress/kinora-progress.js";
//   const watching = watchMany({
//     streamUrl: "/progress/stream?job=41&job=42",
//     jobs: { 41: { onProgress: (percent, event) => ... }, 42: { ... } },
//     onEvent: (jobId, event) => ...,   // every event of every job
//   });

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const ACCESS_ENDED = new Set(["token_expired", "token_revoked"]);

export function progressUrls(prefix, jobId) {
  const base = `${prefix.replace(/\/$/, "")}/${encodeURIComponent(jobId)}`;
  return { streamUrl: `${base}/stream`, pollUrl: base };
}

export function watch(options) {
  const {
    streamUrl, pollUrl = null, headers = {}, lastEventId = 0, pollMs = 2000, reopenMs = 3000,
    onEvent = () => {}, onProgress = () => {}, onLog = () => {}, onError = () => {},
    onComplete = () => {}, onConnection = () => {}, onAccessEnd = () => {},
  } = options;
  let lastSeq = Number(lastEventId) || 0;
  let source = null;
  let poll = null;
  let reopen = null;
  let ended = false;

  function deliver(event) {
    if (ended) return;
    if (ACCESS_ENDED.has(event.code)) {
      // The stream's token expired or was revoked: the same URL would only get a 401.
      // The page decides (a new URL, or sign in again); lastEventId says where it was.
      ended = true;
      stop();
      onConnection("ended");
      onAccessEnd(event);
      return;
    }
    if (event.seq <= lastSeq) return; // each event once, in order
    lastSeq = event.seq;
    onEvent(event);
    if (typeof event.progress === "number") onProgress(event.progress, event);
    if (event.type === "error") onError(event);
    else if (event.type === "complete") {
      finish();
      onComplete(event);
    } else onLog(event);
  }

  function finish() {
    ended = true;
    stop();
    onConnection("done");
  }

  function stop() {
    if (source) source.close();
    clearInterval(poll);
    clearTimeout(reopen);
    source = poll = reopen = null;
  }

  function open() {
    if (ended) return;
    // A new EventSource cannot send Last-Event-ID itself: the query parameter can.
    const url = new URL(streamUrl, location.href);
    if (lastSeq) url.searchParams.set("last_event_id", String(lastSeq));
    source = new EventSource(url);
    source.onopen = () => {
      onConnection("connected");
      clearInterval(poll);
      poll = null;
    };
    source.onmessage = (message) => deliver(JSON.parse(message.data));
    source.onerror = () => {
      if (ended) return;
      onConnection("reconnecting");
      startPolling();
      if (source && source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, or a 204 we have not seen the end of).
        clearTimeout(reopen);
        reopen = setTimeout(open, reopenMs);
      }
    };
  }

  function startPolling() {
    if (poll || !pollUrl) return;
    poll = setInterval(async () => {
      try {
        const response = await fetch(pollUrl, { headers });
        if (!response.ok) return;
        const snapshot = await response.json();
        for (const event of snapshot.logs || []) deliver(event);
        if (TERMINAL.has(snapshot.status) && !ended) {
          // The end without its event (Redis lost it, say): tell it from the state.
          finish();
          onComplete({ type: "complete", status: snapshot.status, progress: snapshot.progress });
        }
      } catch { /* the server is down too: keep trying */ }
    }, pollMs);
  }

  open();
  return {
    close: () => { ended = true; stop(); },
    get lastEventId() { return lastSeq; },
  };
}

// The id of the job an event belongs to: `video_id` (Kinora), `job_id`, or `<kind>_id`.
export function jobOf(event) {
  if (event.video_id !== undefined) return String(event.video_id);
  if (event.job_id !== undefined) return String(event.job_id);
  const key = Object.keys(event).find((name) => name.endsWith("_id") && name !== "trace_id");
  return key === undefined ? null : String(event[key]);
}

export function watchMany(options) {
  const {
    streamUrl, jobs = {}, lastEventId = "", reopenMs = 3000,
    onEvent = () => {}, onProgress = () => {}, onLog = () => {}, onError = () => {},
    onComplete = () => {}, onConnection = () => {}, onAccessEnd = () => {},
  } = options;
  let cursor = lastEventId; // the stream's cursor: every job at once (docs/protocol.md §6)
  const lastSeq = new Map(); // per job: each event once, in order
  const completed = new Set();
  // The jobs the URL lists (none: the server's choice, which never ends by itself).
  const params = new URL(streamUrl, location.href).searchParams;
  const listed = new Set([...params.getAll("job"), ...params.getAll("video")]).size;
  let source = null;
  let reopen = null;
  let ended = false;

  function deliver(event, id) {
    if (ended) return;
    if (ACCESS_ENDED.has(event.code)) {
      ended = true;
      stop();
      onConnection("ended");
      onAccessEnd(event);
      return;
    }
    if (id) cursor = id;
    const job = jobOf(event);
    if (job === null || event.seq <= (lastSeq.get(job) || 0)) return;
    lastSeq.set(job, event.seq);
    const own = jobs[job] || {};
    onEvent(job, event);
    if (own.onEvent) own.onEvent(event);
    if (typeof event.progress === "number") {
      if (own.onProgress) own.onProgress(event.progress, event);
      else onProgress(job, event.progress, event);
    }
    if (event.type === "error") {
      if (own.onError) own.onError(event); else onError(job, event);
    } else if (event.type === "complete") {
      if (own.onComplete) own.onComplete(event); else onComplete(job, event);
      completed.add(job);
      if (listed && completed.size >= listed) { // the stream has nothing more to say
        ended = true;
        stop();
        onConnection("done");
      }
    } else if (own.onLog) own.onLog(event); else onLog(job, event);
  }

  function stop() {
    if (source) source.close();
    clearTimeout(reopen);
    source = reopen = null;
  }

  function open() {
    if (ended) return;
    const url = new URL(streamUrl, location.href);
    if (cursor) url.searchParams.set("last_event_id", cursor);
    source = new EventSource(url);
    source.onopen = () => onConnection("connected");
    source.onmessage = (message) => deliver(JSON.parse(message.data), message.lastEventId);
    source.onerror = () => {
      if (ended) return;
      onConnection("reconnecting");
      if (source && source.readyState === EventSource.CLOSED) {
        // A 204 (every listed job has ended and we have it all) or an HTTP error.
        clearTimeout(reopen);
        reopen = setTimeout(open, reopenMs);
      }
    };
  }

  open();
  return {
    close: () => { ended = true; stop(); },
    get lastEventId() { return cursor; },
  };
}
