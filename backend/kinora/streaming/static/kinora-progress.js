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
