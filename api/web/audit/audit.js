// The auditor console: the API key, the log's integrity, searching the audit trail a page at a time,
// and exporting a time range as CSV or NDJSON. See docs/API.md, "Auditor console".

import { blobUrl, getJson, query } from "../common/http.js";
import { announce, setUpKeyForm, showProblem } from "../common/ui.js";
import { clearChain, loadChain } from "./chain.js";
import { eventRow, filters } from "./events.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 50;

const chain = {
  verifyStatus: $("verify-status"),
  verifyFacts: $("verify-facts"),
  checkpointStatus: $("checkpoint-status"),
  checkpointFacts: $("checkpoint-facts"),
  checkpointNote: $("checkpoint-note"),
  problem: $("chain-problem"),
};
const form = $("search-form");
const rows = $("event-rows");
const searchStatus = $("search-status");
const searchProblem = $("search-problem");
const newer = $("events-newer");
const older = $("events-older");

let search = null; // the filters of the search on show, and the cursors of its pages so far
let exportUrl = null; // the last export's object URL (revoked when the next one is made)
let exportsAsked = 0; // an export that answers after the key changed (or a newer one began) is dropped
let pagesAsked = 0; // only the latest page asked for may fill the table (an older answer can arrive last)

setUpKeyForm({
  form: $("key-form"),
  input: $("api-key"),
  state: $("key-state"),
  forget: $("forget-key"),
  onChange: (prefix) => {
    // another key may be another auditor's: nothing found or exported with the last one stays, nor
    // what was searched for (the clinic or case under investigation)
    form.reset();
    rows.replaceChildren();
    search = null;
    pagesAsked += 1;
    newer.disabled = older.disabled = true;
    announce(searchStatus, "");
    showProblem(searchProblem, null);
    forgetExport();
    if (prefix) loadChain(chain);
    else clearChain(chain);
  },
});

/** The last export's link and its object URL, gone. */
function forgetExport() {
  exportsAsked += 1;
  if (exportUrl) URL.revokeObjectURL(exportUrl);
  exportUrl = null;
  const status = $("export-status");
  announce(status, "", "none");
  delete status.dataset.records;
  delete status.dataset.format;
  showProblem($("export-problem"), null);
}

$("chain-refresh").addEventListener("click", () => loadChain(chain));

// --------------------------------------------------------------------------- search

async function showPage() {
  const cursor = search.cursors.at(-1);
  const asked = ++pagesAsked;
  newer.disabled = older.disabled = true; // until this page is in: a second click cannot step twice
  announce(searchStatus, "Searching…", "loading");
  showProblem(searchProblem, null);
  try {
    const { body } = await getJson(`/v1/audit-events${query({ ...search.filters, cursor, limit: PAGE_SIZE })}`);
    if (asked !== pagesAsked) return;
    search.undo = null;
    search.next = body.next_cursor;
    rows.replaceChildren(...body.items.map(eventRow));
    newer.disabled = search.cursors.length <= 1;
    older.disabled = !search.next;
    $("events-page").textContent = `Page ${search.cursors.length}`;
    announce(
      searchStatus,
      body.items.length
        ? `${body.items.length} event(s) on page ${search.cursors.length}${search.next ? "; older ones on the next page" : ""}.`
        : "No events match.",
      "loaded",
    );
  } catch (error) {
    if (asked !== pagesAsked) return;
    if (search.undo) ({ cursors: search.cursors, next: search.next } = search.undo); // back where it was
    search.undo = null;
    newer.disabled = search.cursors.length <= 1;
    older.disabled = !search.next;
    announce(searchStatus, "The search failed.", "error");
    showProblem(searchProblem, error);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search = { filters: filters(form), cursors: [null], next: null };
  showPage();
});
newer.addEventListener("click", () => {
  if (!search) return;
  search.undo = { cursors: [...search.cursors], next: search.next }; // put back if the page fails
  if (search.cursors.length > 1) search.cursors.pop();
  showPage();
});
older.addEventListener("click", () => {
  if (!search?.next) return;
  search.undo = { cursors: [...search.cursors], next: search.next };
  search.cursors.push(search.next);
  search.next = null;
  showPage();
});

// --------------------------------------------------------------------------- export

function savedName(headers, format) {
  const match = /filename="([^"]+)"/.exec(headers.get("content-disposition") || "");
  return match ? match[1] : `dermq-audit.${format}`;
}

function countRecords(text, format) {
  const lines = text.split("\n").filter((line) => line.trim() !== "").length;
  return format === "csv" ? Math.max(0, lines - 1) : lines; // CSV has a header row (fields may not hold newlines)
}

async function exportAs(format) {
  const status = $("export-status");
  const problem = $("export-problem");
  showProblem(problem, null);
  announce(status, `Exporting ${format.toUpperCase()}…`, "loading");
  const asked = ++exportsAsked;
  try {
    const { url, blob, headers } = await blobUrl(`/v1/audit-events/export${query({ ...filters(form), format })}`);
    const text = await blob.text();
    if (asked !== exportsAsked) {
      URL.revokeObjectURL(url); // the key changed meanwhile: not this page's to save any more
      return;
    }
    if (exportUrl) URL.revokeObjectURL(exportUrl);
    exportUrl = url;
    const name = savedName(headers, format);
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    link.textContent = `Save ${name} again`;
    link.className = "export-link";
    const records = countRecords(text, format);
    status.dataset.records = String(records);
    status.dataset.format = format;
    announce(status, `Exported ${records} event(s) as ${name} (${blob.size} bytes). `, "done");
    status.append(link);
    link.click(); // the browser saves it (the request needed the key, so a plain link could not do it)
  } catch (error) {
    if (asked !== exportsAsked) return;
    announce(status, "The export failed.", "error");
    showProblem(problem, error);
  }
}

$("export-csv").addEventListener("click", () => exportAs("csv"));
$("export-ndjson").addEventListener("click", () => exportAs("ndjson"));

document.documentElement.dataset.ready = "true";
