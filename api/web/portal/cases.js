// The clinic's case list: newest first, a page at a time (the API's cursor), each row with its result's
// label and referral flag, and buttons to open or erase the case.

import { getJson, query } from "../common/http.js";
import { announce, el, formatTime, showProblem } from "../common/ui.js";
import { STATUS_TEXT, className, wordsFor } from "./labels.js";

const PAGE_SIZE = 10;

function resultCell(item) {
  if (item.outcome === "out_of_distribution") return el("span", { className: "ood-badge", text: "not a lesion: no answer" });
  if (item.outcome === "diagnosis") return el("span", { title: className(item.label), text: className(item.label) });
  return "—";
}

function referralCell(item) {
  if (item.referral === true) return el("strong", { className: "referral-flag", text: "refer" });
  if (item.referral === false) return "no";
  return "—";
}

export class CaseList {
  /** `elements`: rows (tbody), status, problem, newer, older, page, filter, refresh; `actions`: open(id), erase(id, button). */
  constructor(elements, actions) {
    this.elements = elements;
    this.actions = actions;
    this.cursors = [null]; // the cursor of each page shown so far; the last one is on show
    this.nextCursor = null;
    this.undo = null; // the cursors before a page step whose page has not loaded yet
    this.loads = 0; // only the latest load may fill the table (an older answer can arrive last)
    // each page button is disabled from its click until its page has loaded: a second click cannot
    // step twice on one page's cursor
    elements.newer.addEventListener("click", () =>
      this.step(() => {
        if (this.cursors.length > 1) this.cursors.pop();
      }),
    );
    elements.older.addEventListener("click", () => {
      if (!this.nextCursor) return;
      this.step(() => {
        this.cursors.push(this.nextCursor);
        this.nextCursor = null;
      });
    });
    elements.filter.addEventListener("change", () => this.reload());
    elements.refresh.addEventListener("click", () => this.reload());
  }

  /** Move a page (`change` the cursors) and load it; if that fails, the cursors are put back. */
  step(change) {
    this.undo = { cursors: [...this.cursors], next: this.nextCursor };
    change();
    return this.load();
  }

  /** Back to the first page (after a submission, an erasure, a new filter or a new key). */
  reload() {
    this.undo = null;
    this.cursors = [null];
    this.nextCursor = null; // the last page's, or the last filter's: not this load's
    return this.load();
  }

  clear() {
    this.loads += 1; // a load under way is forgotten
    this.undo = null;
    this.cursors = [null];
    this.nextCursor = null;
    this.elements.rows.replaceChildren();
    this.elements.newer.disabled = this.elements.older.disabled = true;
    this.elements.page.textContent = "";
    announce(this.elements.status, "");
  }

  async load() {
    const { rows, status, problem, newer, older, page, filter } = this.elements;
    const cursor = this.cursors.at(-1);
    const load = ++this.loads;
    newer.disabled = older.disabled = true;
    announce(status, "Loading cases…", "loading");
    showProblem(problem, null);
    try {
      const { body } = await getJson(`/v1/cases${query({ limit: PAGE_SIZE, status: filter.value, cursor })}`);
      if (load !== this.loads) return;
      this.undo = null;
      this.nextCursor = body.next_cursor;
      rows.replaceChildren(...body.items.map((item) => this.row(item)));
      newer.disabled = this.cursors.length <= 1;
      older.disabled = !this.nextCursor;
      page.textContent = `Page ${this.cursors.length}`;
      announce(
        status,
        body.items.length ? `${body.items.length} case(s) on page ${this.cursors.length}.` : "No cases to show.",
        "loaded",
      );
    } catch (error) {
      if (load !== this.loads) return;
      if (this.undo) ({ cursors: this.cursors, next: this.nextCursor } = this.undo); // back where it was
      this.undo = null;
      newer.disabled = this.cursors.length <= 1;
      older.disabled = !this.nextCursor;
      announce(status, "The cases could not be loaded.", "error");
      showProblem(problem, error);
    }
  }

  row(item) {
    const short = item.id.slice(0, 8);
    const open = el("button", { type: "button", className: "secondary", "aria-label": `Open case ${short}`, text: "Open" });
    open.addEventListener("click", () => this.actions.open(item.id));
    const cells = [
      el("th", { scope: "row" }, el("time", { datetime: item.created_at, text: formatTime(item.created_at) })),
      el("td", { text: item.client_ref ?? "—" }),
      el("td", { text: item.priority }),
      el("td", { text: wordsFor(STATUS_TEXT, item.status) }),
      el("td", {}, resultCell(item)),
      el("td", {}, referralCell(item)),
    ];
    const buttons = el("td", { className: "actions" }, open);
    if (item.status === "succeeded" || item.status === "failed") {
      const erase = el("button", { type: "button", className: "danger", "aria-label": `Erase the patient data of case ${short}`, text: "Erase" });
      erase.addEventListener("click", () => this.actions.erase(item.id, erase));
      buttons.append(" ", erase);
    }
    return el("tr", { "data-case-id": item.id, "data-status": item.status }, cells, buttons);
  }
}
