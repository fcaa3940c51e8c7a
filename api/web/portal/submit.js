// Submitting a case and following it to its end with the API's long poll (`?wait=`).

import { getJson, request } from "../common/http.js";

/** Seconds the API holds each poll open (it answers as soon as the case ends; at most 30). */
export const WAIT_SECONDS = 20;
export const TERMINAL = new Set(["succeeded", "failed", "purged"]);

const EXTENSIONS = {
  "image/jpeg": "jpg",
  "image/png": "png",
  "image/tiff": "tif",
  "image/webp": "webp",
  "image/bmp": "bmp",
};

/** A fresh Idempotency-Key (random; getRandomValues also works where crypto.randomUUID does not, on plain http). */
function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `portal-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/**
 * One submission: what is sent, and its Idempotency-Key. Sending the same submission again (after a
 * network error, a 5xx or a 429) reuses the key, so the API returns the case it may already have stored
 * instead of making a second one.
 */
export function newSubmission(file, clientRef, urgent) {
  return { file, clientRef: clientRef.trim(), urgent, key: idempotencyKey() };
}

/** Whether sending `submission` again may help (and is safe, with its key). */
export function retryable(error) {
  return error.code === "network_error" || error.status === 429 || error.status >= 500;
}

/**
 * POST the case, waiting up to WAIT_SECONDS for it to end within the same request. The file goes under a
 * neutral name: a local file name may hold patient data.
 */
export async function submitCase(submission, { signal } = {}) {
  const form = new FormData();
  const extension = EXTENSIONS[submission.file.type] ?? "img";
  form.append("image", submission.file, `image.${extension}`);
  if (submission.clientRef) form.append("client_ref", submission.clientRef);
  form.append("priority", submission.urgent ? "urgent" : "routine");
  const response = await request(`/v1/cases?wait=${WAIT_SECONDS}`, {
    method: "POST",
    body: form,
    headers: { "Idempotency-Key": submission.key },
    signal,
  });
  return { body: await response.json(), replayed: response.headers.get("idempotent-replayed") === "true" };
}

/** Longest pause between two polls, in seconds. */
export const MAX_PAUSE_SECONDS = 30;

/** The pause before the `retry`-th poll after a failed or early one: 1, 2, 4 … up to MAX_PAUSE_SECONDS. */
export function backoffSeconds(retry) {
  return Math.min(MAX_PAUSE_SECONDS, 2 ** Math.min(retry, 10));
}

/** The pause after `error`: the API's Retry-After (seconds, at least 1) when it sent one, else the backoff. */
export function pauseSeconds(error, retry) {
  const asked = Number.parseFloat(error.problem?.retry_after);
  return Number.isFinite(asked) && asked >= 0 ? Math.min(Math.max(asked, 1), MAX_PAUSE_SECONDS) : backoffSeconds(retry);
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const aborted = () => reject(new DOMException("stopped following the case", "AbortError"));
    if (signal?.aborted) return aborted();
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        aborted();
      },
      { once: true },
    );
  });
}

/**
 * Long-poll the case until it has ended; `onUpdate(case)` sees every answer. Resolves with the ended case.
 *
 * A network error, a 429 or a 5xx does not stop it: it pauses (the API's Retry-After, else 1, 2, 4 … 30 s),
 * tells `onRetry(error, seconds)` and asks again. An answer that comes back early without the end (the
 * server holds no more waiting requests) is followed by the same backoff, so a full server is not asked in
 * a loop. Any other error (a revoked key, an erased case) rejects.
 */
export async function waitForEnd(caseId, { signal, onUpdate, onRetry }) {
  let retry = 0;
  for (;;) {
    const asked = performance.now();
    let body;
    try {
      ({ body } = await getJson(`/v1/cases/${encodeURIComponent(caseId)}?wait=${WAIT_SECONDS}`, { signal }));
    } catch (error) {
      if (error.name === "AbortError" || !retryable(error)) throw error;
      const seconds = pauseSeconds(error, retry++);
      onRetry?.(error, seconds);
      await sleep(seconds, signal);
      continue;
    }
    onUpdate(body);
    if (TERMINAL.has(body.status)) return body;
    if (performance.now() - asked < (WAIT_SECONDS * 1000) / 2) await sleep(backoffSeconds(retry++), signal);
    else retry = 0;
  }
}

/** Crypto-shred the case's image and heat map (DELETE); resolves with the case as it is now. */
export async function eraseCase(caseId) {
  const response = await request(`/v1/cases/${encodeURIComponent(caseId)}`, { method: "DELETE" });
  return response.json();
}
