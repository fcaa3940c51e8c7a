// The log's integrity: the latest periodic verification (GET /v1/audit-events/verify) and the latest
// signed checkpoint (GET /v1/audit/checkpoints/latest).

import { getJson } from "../common/http.js";
import { announce, el, formatTime, showProblem } from "../common/ui.js";

function facts(list, rows) {
  list.replaceChildren(...rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", {}, value)]));
}

let chainAsked = 0; // only the latest load may fill the panel: a key changed or forgotten meanwhile ends the others

async function showVerification(status, list, asked) {
  const { body } = await getJson("/v1/audit-events/verify");
  if (asked !== chainAsked) return; // asked with a key no longer in use
  if (body.ok === null) {
    status.dataset.ok = "unknown";
    announce(status, "Not verified yet: the periodic check has not run.");
    list.replaceChildren();
    return;
  }
  status.dataset.ok = String(body.ok);
  announce(
    status,
    body.ok
      ? `Verified: all ${body.checked} sealed events match the signed checkpoints.`
      : `Verification FAILED at event ${body.first_bad_id ?? "?"} (position ${body.first_bad_position ?? "?"}): ${body.reason ?? "no reason given"}.`,
  );
  facts(list, [
    ["Checked at", formatTime(body.checked_at)],
    ["Tree size", String(body.tree_size)],
    ["Root hash", el("code", { text: body.last_hash ?? "—" })],
  ]);
}

async function showCheckpoint(status, list, note, asked) {
  try {
    const { body } = await getJson("/v1/audit/checkpoints/latest");
    if (asked !== chainAsked) return;
    status.dataset.size = String(body.size);
    announce(status, `Signed checkpoint of ${body.size} events.`);
    facts(list, [
      ["Signed at", formatTime(body.signed_at)],
      ["Size", String(body.size)],
      ["Root hash", el("code", { text: body.root })],
    ]);
    note.textContent = body.checkpoint;
    note.hidden = false;
  } catch (error) {
    if (error.code !== "no_checkpoint") throw error;
    if (asked !== chainAsked) return;
    delete status.dataset.size;
    announce(status, "No checkpoint yet: the sealer has not sealed any event.");
    list.replaceChildren();
    note.hidden = true;
  }
}

/** Load both into the chain panel; a problem goes to `elements.problem`. */
export async function loadChain(elements) {
  const { verifyStatus, verifyFacts, checkpointStatus, checkpointFacts, checkpointNote, problem } = elements;
  const asked = ++chainAsked;
  showProblem(problem, null);
  announce(verifyStatus, "Loading…");
  announce(checkpointStatus, "Loading…");
  const results = await Promise.allSettled([
    showVerification(verifyStatus, verifyFacts, asked),
    showCheckpoint(checkpointStatus, checkpointFacts, checkpointNote, asked),
  ]);
  if (asked !== chainAsked) return;
  const failed = results.find((result) => result.status === "rejected");
  if (failed) {
    if (results[0].status === "rejected") announce(verifyStatus, "Could not be read.");
    if (results[1].status === "rejected") announce(checkpointStatus, "Could not be read.");
    showProblem(problem, failed.reason);
  }
}

export function clearChain(elements) {
  chainAsked += 1; // a load still on its way shows nothing now
  announce(elements.verifyStatus, "Set a key to see it.");
  elements.verifyStatus.dataset.ok = "unknown";
  announce(elements.checkpointStatus, "Set a key to see it.");
  elements.verifyFacts.replaceChildren();
  elements.checkpointFacts.replaceChildren();
  elements.checkpointNote.hidden = true;
  showProblem(elements.problem, null);
}
