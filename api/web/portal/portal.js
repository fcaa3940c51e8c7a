// The clinic portal: the API key, submitting an image, following the case live, showing its result,
// the case list and erasure with a confirmation step. See docs/API.md, "Clinic portal".

import { getJson } from "../common/http.js";
import { announce, setUpKeyForm, showProblem } from "../common/ui.js";
import { CaseList } from "./cases.js";
import { STATUS_TEXT, wordsFor } from "./labels.js";
import { renderCase } from "./result.js";
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
let original = null; // object URL of the chosen image, shown under the heat map

const cases = new CaseList(
  {
    rows: $("case-rows"),
    status: $("cases-status"),
    problem: $("cases-problem"),
    newer: $("cases-newer"),
    older: $("cases-older"),
    page: $("cases-page"),
    filter: $("case-filter"),
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
    if (prefix) {
      cases.reload();
    } else {
      cases.clear();
      resultSection.hidden = true;
      resultBody.replaceChildren();
    }
  },
});

// --------------------------------------------------------------------------- choosing an image

function chosen(file) {
  pending = null; // a new image is a new submission
  if (original) URL.revokeObjectURL(original);
  original = file ? URL.createObjectURL(file) : null;
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
for (const id of ["client-ref", "urgent"]) $(id).addEventListener("change", () => (pending = null));

// --------------------------------------------------------------------------- submitting and following

function stopFollowing() {
  following?.abort();
  following = null;
}

function showStatus(item) {
  announce(caseStatus, `Case ${item.id.slice(0, 8)}: ${wordsFor(STATUS_TEXT, item.status)}.`, item.status);
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
  pending ??= newSubmission(file, $("client-ref").value, $("urgent").checked);
  const submission = pending;
  stopFollowing();
  following = new AbortController();
  const { signal } = following;
  const button = $("submit-button");
  button.disabled = true;
  announce(caseStatus, "Uploading the image…", "uploading");
  try {
    const { body, replayed } = await submitCase(submission, { signal });
    pending = null;
    if (replayed) announce(caseStatus, "This submission had already reached dermq: here is its case.", body.status);
    else showStatus(body);
    renderCase(resultSection, resultBody, body, { original, onErase: confirmErase });
    button.disabled = false;
    let ended = body;
    if (!TERMINAL.has(body.status)) {
      cases.reload(); // the new case, queued
      ended = await waitForEnd(body.id, {
        signal,
        onUpdate: (item) => {
          showStatus(item);
          renderCase(resultSection, resultBody, item, { original, onErase: confirmErase });
        },
      });
    }
    showStatus(ended);
    cases.reload();
  } catch (error) {
    if (error.name === "AbortError") return;
    button.disabled = false;
    if (!retryable(error)) pending = null;
    announce(
      caseStatus,
      pending ? "Not submitted yet, or not confirmed: submitting again is safe (the same Idempotency-Key is sent)." : "Not submitted.",
      "error",
    );
    showProblem(submitProblem, error);
  } finally {
    button.disabled = false;
  }
});

// --------------------------------------------------------------------------- opening and erasing cases

async function openCase(caseId) {
  stopFollowing();
  following = new AbortController();
  const { signal } = following;
  showProblem(submitProblem, null);
  try {
    const { body } = await getJson(`/v1/cases/${encodeURIComponent(caseId)}`, { signal });
    showStatus(body);
    renderCase(resultSection, resultBody, body, { onErase: confirmErase });
    $("result-heading").focus();
    if (!TERMINAL.has(body.status)) {
      const ended = await waitForEnd(caseId, {
        signal,
        onUpdate: (item) => renderCase(resultSection, resultBody, item, { onErase: confirmErase }),
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

dialog.addEventListener("close", () => {
  if (eraseTarget?.opener?.isConnected) eraseTarget.opener.focus();
});
$("erase-cancel").addEventListener("click", () => {
  dialog.close();
  eraseTarget = null;
});
$("erase-confirm").addEventListener("click", async () => {
  const target = eraseTarget;
  dialog.close();
  eraseTarget = null;
  if (!target) return;
  try {
    const item = await eraseCase(target.caseId);
    announce(caseStatus, `Case ${item.id.slice(0, 8)}: images erased.`, "purged");
    if (resultSection.dataset.caseId === item.id) renderCase(resultSection, resultBody, item, { onErase: confirmErase });
    cases.load();
  } catch (error) {
    showProblem(submitProblem, error);
  }
});
document.documentElement.dataset.ready = "true";
