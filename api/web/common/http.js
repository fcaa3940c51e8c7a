// Calls to the dermq API from a page, with the API key the user pasted.
//
// The key lives in this module's memory only: never in localStorage, sessionStorage, a cookie or a URL.
// Reloading, closing or leaving the page forgets it (ui.setUpKeyForm). Every error becomes an ApiProblem
// holding the API's RFC 9457 problem details (or a problem of our own when the API could not be reached or
// answered something else).

let apiKey = null;

/** Why `key` cannot be an API key, or null: a key is printable ASCII only. */
export function keyProblem(key) {
  // a key copied from a message or a document can carry a line break, a space or an invisible
  // character (a zero-width space); sent, the browser refuses the header before any request leaves,
  // which read as "the API could not be reached"
  return /^[\x21-\x7e]+$/.test(key.trim())
    ? null
    : "this key holds a character an API key never has (a space, a line break or an invisible character copied with it): copy it again, whole, and paste it";
}

/**
 * Remember `key` for this page's requests (trimmed); returns what may be shown of it: its prefix.
 * Throws (keeping the key in use) when it cannot be a key (`keyProblem`).
 */
export function setKey(key) {
  const problem = keyProblem(key);
  if (problem !== null) throw new Error(problem);
  apiKey = key.trim();
  return keyPrefix();
}

export function forgetKey() {
  apiKey = null;
}

export function hasKey() {
  return apiKey !== null;
}

/**
 * The public part of the key (`dq_0a1b2c3d4e5f`), never its secret: only a key of dermq's form has one
 * (pasted without its `dq_`, the part before the next `_` would be the secret itself).
 */
export function keyPrefix() {
  if (apiKey === null) return null;
  const match = /^dq_([0-9a-f]{12})_/.exec(apiKey);
  return match ? `dq_${match[1]}` : "a key";
}

/** An error answered by the API (its problem details), or met on the way to it. */
export class ApiProblem extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "request failed");
    this.name = "ApiProblem";
    this.problem = problem;
    this.status = problem.status ?? 0;
    this.code = problem.code ?? "error";
  }
}

async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  let body = null;
  if (type.includes("json")) {
    try {
      body = await response.json();
    } catch {
      body = null;
    }
  }
  const problem =
    body && typeof body === "object" && !Array.isArray(body)
      ? { ...body }
      : { title: response.statusText || "Error", detail: `the API answered HTTP ${response.status}` };
  if (typeof problem.title !== "string" || !problem.title) problem.title = response.statusText || "Error"; // a proxy's JSON
  problem.status ??= response.status;
  problem.request_id ??= response.headers.get("x-request-id");
  const retryAfter = retryAfterSeconds(response.headers.get("retry-after"));
  if (retryAfter !== null) problem.retry_after = retryAfter;
  return new ApiProblem(problem);
}

/** `Retry-After` in seconds from now: a number of seconds, or an HTTP date (RFC 9110); null if neither. */
export function retryAfterSeconds(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  if (!/^[A-Za-z]{3},/.test(value.trim())) return null; // Date.parse would take "-1" for a date
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

/**
 * Send one request to the API with the key. Resolves with the Response when it is 2xx; rejects with an
 * ApiProblem otherwise (or with the AbortError of `signal`).
 */
export async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  if (apiKey === null) {
    throw new ApiProblem({
      title: "No API key",
      detail: "paste your API key above first",
      code: "missing_key",
      status: 0,
    });
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      body,
      headers: { ...headers, Authorization: `Bearer ${apiKey}` },
      signal,
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiProblem({
      title: "Network error",
      detail: "the API could not be reached; check the connection and try again",
      code: "network_error",
      status: 0,
    });
  }
  if (!response.ok) throw await problemOf(response);
  return response;
}

export async function getJson(path, options) {
  const response = await request(path, options);
  return { body: await response.json(), status: response.status, headers: response.headers };
}

/** Fetch `path` and keep it as a blob: URL (for <img> and downloads); the caller revokes it. */
export async function blobUrl(path, options) {
  const response = await request(path, options);
  const blob = await response.blob();
  return { url: URL.createObjectURL(blob), blob, headers: response.headers };
}

/** `?a=1&b=2` from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
