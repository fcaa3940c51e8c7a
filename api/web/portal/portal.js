// The clinic portal: the API key, submitting an image, following the case live, showing its result,
// the case list and erasure with a confirmation step. See docs/API.md, "Clinic portal".

import { getJson } from "../common/http.js";
import { announce, setUpKeyForm, showProblem } from "../common/ui.js";
import { CaseList } from "./cases.js";
import { STATUS_TEXT, wordsFor } from "./labels.js";
import { clearCase, renderCase } from "./result.js";
import { TERMINAL, eraseCase, newSubmission, retryable, submitCase, waitForEnd } from "./submit.js";

const $ = (id) => document.getElementById(id);

const form = $("submit-form");
const fileInput = $("image");
const dropzone = $("dropzone");
const caseStatus = $("case-status");
const submitProblem = $("submit-problem");
const resultSection = $("result");
const resultBody = $("result-body");

let pending = null; // the submission that may be sent again with its Idempotency-Key (after a retryable error)
let following = null; // the AbortController of the case being followed
let original = null; // object URL of the chosen image
let shownOver = null; // object URL of the image the case on show was submitted with (under its heat map)
const submitting = new Map(); // object URL -> how many submissions still under way were made with it
let epoch = 0; // counts key changes: what a submission of an earlier key ends with is not shown

const cases = new CaseList(
  {
    rows: $("case-rows"),
    status: $("cases-status"),
    problem: $("cases-problem"),
    newer: $("cases-newer"),
    older: $("cases-older"),
    page: $("cases-page"),
    filter: $("case-filter"),
    refresh: $("cases-refresh"),
  },
  { open: openCase, erase: confirmErase },
);

setUpKeyForm({
  form: $("key-form"),
  input: $("api-key"),
  state: $("key-state"),
  forget: $("forget-key"),
  onChange: (prefix) => {
    stopFollowing();
    resetPage(); // another key may be another clinic's: nothing of the last one stays on screen
    if (prefix) cases.reload();
    else cases.clear();
  },
});

/** Everything a user of the last key entered or was shown: the image, the form, the result, the messages. */
function resetPage() {
  epoch += 1;
  pending = null;
  fileInput.value = "";
  chosen(null);
  $("client-ref").value = "";
  $("urgent").checked = false;
  showProblem(submitProblem, null);
  announce(caseStatus, "");
  show(null, null);
}

/** Release an object URL that neither the chosen image nor the case on show still uses. */
function release(url) {
  if (url && url !== original && url !== shownOver && !submitting.get(url)) URL.revokeObjectURL(url);
}

/**
 * Show `item` (or nothing), with `over`, the object URL of the image it was submitted with, under its
 * heat map: an image chosen since then is another patient's, and is never shown under this result.
 */
function show(item, over) {
  const previous = shownOver;
  shownOver = item ? over : null;
  if (item) {
    renderCase(resultSection, resultBody, item, { original: shownOver, onErase: confirmErase });
  } else {
    clearCase(resultSection, resultBody);
  }
  release(previous);
}

// --------------------------------------------------------------------------- choosing an image

function chosen(file) {
  pending = null; // a new image is a new submission
  const previous = original;
  original = file ? URL.createObjectURL(file) : null;
  release(previous); // unless the case on show was submitted with it
  $("image-chosen").textContent = file
    ? `Chosen: ${file.name} (${Math.max(1, Math.round(file.size / 1024))} KiB).`
    : "No image chosen.";
  dropzone.classList.toggle("has-file", Boolean(file));
}

fileInput.addEventListener("change", () => chosen(fileInput.files[0] ?? null));
for (const type of ["dragenter", "dragover"]) {
  dropzone.addEventListener(type, (event) => {
    event.preventDefault();
    dropzone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
}
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  const files = event.dataTransfer?.files;
  if (!files || !files.length) return;
  const transfer = new DataTransfer();
  transfer.items.add(files[0]);
  fileInput.files = transfer.files;
  chosen(files[0]);
});
// A submission not yet confirmed keeps its key when its reference or priority changes: if the first
// attempt was stored after all, dermq answers 409 idempotency_key_reused instead of storing a second case.
for (const id of ["client-ref", "urgent"]) {
  $(id).addEventListener("change", () => {
    if (pending) pending = { ...pending, clientRef: $("client-ref").value.trim(), urgent: $("urgent").checked };
  });
}

// --------------------------------------------------------------------------- submitting and following

function stopFollowing() {
  following?.abort();
  following = null;
}

function showStatus(item) {
  announce(caseStatus, `Case ${item.id.slice(0, 8)}: ${wordsFor(STATUS_TEXT, item.status)}.`, item.status);
}

/** Said while following a case pauses after a network error, a 429 or a 5xx (waitForEnd asks again). */
function showRetry(caseId) {
  return (error, seconds) => {
    const why = error.code === "network_error" ? "dermq could not be reached" : `dermq answered ${error.status}`;
    announce(caseStatus, `Case ${caseId.slice(0, 8)}: ${why}; asking again in ${Math.round(seconds)} s.`, "retrying");
  };
}

/** Following an accepted case stopped on an error that asking again would not mend (a revoked key, say). */
function followingStopped(caseId, error) {
  announce(caseStatus, `Case ${caseId.slice(0, 8)} was accepted, but following it stopped: open it from the list.`, "error");
  showProblem(submitProblem, error);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showProblem(submitProblem, null);
  const file = fileInput.files[0];
  if (!file) {
    announce(caseStatus, "Choose an image first.", "idle");
    fileInput.focus();
    return;
  }
  const over = original; // this submission's image, whatever is chosen while it runs
  submitting.set(over, (submitting.get(over) ?? 0) + 1);
  try {
    await submitAndFollow(file, over);
  } finally {
    const left = submitting.get(over) - 1;
    if (left) submitting.set(over, left);
    else submitting.delete(over);
    release(over); // unless it is still chosen, on show or in another submission
  }
});

/** What the page says of a submission that failed: whether sending it again is safe, or may store it twice. */
function failedSubmission(error) {
  if (pending) return "Not submitted yet, or not confirmed: submitting again is safe (the same Idempotency-Key is sent).";
  if (error.code === "idempotency_key_reused") {
    return "The first attempt reached dermq with the reference and priority it had then: its case is in the list. Submitting again stores a new case with these values.";
  }
  if (error.status === 401) {
    // a key revoked while the request waited for the case is refused after the case was stored
    return "dermq refused this key. If it was revoked while dermq answered, the case may have been stored: check the case list with a valid key before submitting again.";
  }
  return "Not submitted.";
}

async function submitAndFollow(file, over) {
  const mine = epoch;
  pending ??= newSubmission(file, $("client-ref").value, $("urgent").checked);
  const submission = pending;
  stopFollowing();
  following = new AbortController();
  const { signal } = following;
  const button = $("submit-button");
  button.disabled = true;
  announce(caseStatus, "Uploading the image…", "uploading");
  let body;
  try {
    let replayed;
    ({ body, replayed } = await submitCase(submission, { signal }));
    pending = null;
    if (replayed) announce(caseStatus, "This submission had already reached dermq: here is its case.", body.status);
    else showStatus(body);
    show(body, over);
  } catch (error) {
    if (error.name === "AbortError") {
      if (mine !== epoch) return; // the key changed: the page is another user's now
      // another case was opened: the upload may have reached dermq or not (its list row will say)
      announce(caseStatus, "Submission interrupted before dermq answered: submitting again is safe.", "idle");
      cases.load();
      return;
    }
    if (mine !== epoch) return;
    if (!retryable(error)) pending = null;
    announce(caseStatus, failedSubmission(error), "error");
    showProblem(submitProblem, error);
    return;
  } finally {
    button.disabled = false;
  }
  if (TERMINAL.has(body.status)) {
    cases.reload();
    return;
  }
  cases.reload(); // the new case, queued
  try {
    const ended = await waitForEnd(body.id, {
      signal,
      onUpdate: (item) => {
        showStatus(item);
        show(item, over);
      },
      onRetry: showRetry(body.id),
    });
    showStatus(ended);
    cases.reload();
  } catch (error) {
    if (error.name !== "AbortError" && mine === epoch) followingStopped(body.id, error);
  }
}

// --------------------------------------------------------------------------- opening and erasing cases

async function openCase(caseId) {
  stopFollowing();
  following = new AbortController();
  const { signal } = following;
  showProblem(submitProblem, null);
  try {
    const { body } = await getJson(`/v1/cases/${encodeURIComponent(caseId)}`, { signal });
    showStatus(body);
    show(body, null);
    $("result-heading").focus();
    if (!TERMINAL.has(body.status)) {
      const ended = await waitForEnd(caseId, {
        signal,
        onUpdate: (item) => {
          showStatus(item); // replaces a retry message once an answer comes
          show(item, null);
        },
        onRetry: showRetry(caseId),
      });
      showStatus(ended);
    }
  } catch (error) {
    if (error.name !== "AbortError") showProblem(submitProblem, error);
  }
}

const dialog = $("erase-dialog");
let eraseTarget = null; // {caseId, opener}: the case to erase, and the button to give focus back to

function confirmErase(caseId, opener) {
  eraseTarget = { caseId, opener };
  $("erase-case").textContent = caseId;
  dialog.showModal();
  $("erase-cancel").focus(); // the safe choice has the focus
}

// Closing without erasing (Cancel, Escape) gives the focus back to the button that opened the dialog.
dialog.addEventListener("close", () => {
  if (eraseTarget?.opener?.isConnected) eraseTarget.opener.focus();
  eraseTarget = null;
});
$("erase-cancel").addEventListener("click", () => dialog.close());
$("erase-confirm").addEventListener("click", async () => {
  const target = eraseTarget;
  eraseTarget = null; // the erase redraws the button that opened the dialog: the focus goes below instead
  dialog.close();
  if (!target) return;
  const mine = epoch;
  try {
    const item = await eraseCase(target.caseId);
    if (mine !== epoch) return; // the key changed meanwhile: the page is another user's now
    announce(caseStatus, `Case ${item.id.slice(0, 8)}: patient data erased.`, "purged");
    if (resultSection.dataset.caseId === item.id) {
      show(item, null); // erased: no image of it stays on screen either
      $("result-heading").focus();
    } else {
      $("cases-heading").focus();
    }
    cases.load();
  } catch (error) {
    if (mine === epoch) showProblem(submitProblem, error);
  }
});
document.documentElement.dataset.ready = "true";
