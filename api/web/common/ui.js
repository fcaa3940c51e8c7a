// DOM helpers shared by the pages: elements built from text (never from HTML strings: the pages run
// under Trusted Types with no policy), problem details shown in words, and the API key form.

import { forgetKey, hasKey, keyPrefix, setKey } from "./http.js";

/**
 * A new element. `attributes`: `text` sets its text, `className` its classes, `hidden` hides it, anything
 * else becomes an attribute (never a style or an event handler: the CSP would refuse them).
 */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "className") node.className = value;
    else if (name === "hidden") node.hidden = Boolean(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Put `text` in a live region (role=status): screen readers announce it. */
export function announce(region, text, state) {
  region.textContent = text;
  if (state !== undefined) region.dataset.state = state;
}

/** A problem (an ApiProblem or any error) in words, in `container` (a role=alert region); cleared with null. */
export function showProblem(container, error) {
  container.replaceChildren();
  if (!error) {
    container.hidden = true;
    delete container.dataset.code;
    return;
  }
  const problem = error.problem ?? { title: "Something went wrong", detail: String(error.message || error) };
  const status = problem.status ? ` (HTTP ${problem.status})` : "";
  container.append(el("p", { className: "problem-title" }, el("strong", { text: `${problem.title}${status}` })));
  if (problem.detail) container.append(el("p", { className: "problem-detail", text: capitalise(problem.detail) }));
  if (Array.isArray(problem.errors) && problem.errors.length) {
    container.append(
      el(
        "ul",
        {},
        problem.errors.map((item) => el("li", { text: `${(item.loc || []).join(".")}: ${item.msg}` })),
      ),
    );
  }
  if (problem.retry_after) {
    container.append(el("p", { text: `Try again in ${problem.retry_after} seconds.` }));
  }
  const facts = [];
  if (problem.code) facts.push(`code ${problem.code}`);
  if (problem.request_id) facts.push(`request id ${problem.request_id} (quote it when reporting a problem)`);
  if (facts.length) container.append(el("p", { className: "problem-facts", text: facts.join(" · ") }));
  container.dataset.code = problem.code || "error";
  container.hidden = false;
}

function capitalise(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** A timestamp in the reader's own time zone, to the second. */
export function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime())
    ? iso
    : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "long" }); // "long": with its time zone
}

/** `0.3142` as `31.4%`. */
export function percent(value) {
  return `${(value * 100).toFixed(1)}%`;
}

/**
 * Wire the API key form: the pasted key goes to http.js (memory only) and the field is emptied at once.
 * `onChange(prefix)` runs with the key's public prefix, or with null once it is forgotten (by the button,
 * or as the page is left): it clears what the page shows and holds.
 */
export function setUpKeyForm({ form, input, state, forget, onChange }) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!input.value.trim()) {
      // nothing pasted (spaces): the key in use, if any, stays, and so does what it shows
      input.value = "";
      announce(state, hasKey() ? `Still using key ${keyPrefix()}: paste a key to change it.` : "No key set: paste a key first.", hasKey() ? "set" : "none");
      return;
    }
    let prefix;
    try {
      prefix = setKey(input.value);
    } catch (error) {
      // not a key: the key in use, if any, stays
      input.value = "";
      announce(state, `${error.message}.${hasKey() ? ` Still using key ${keyPrefix()}.` : ""}`, hasKey() ? "set" : "none");
      return;
    }
    input.value = "";
    announce(state, `Using key ${prefix} (held in this page's memory only).`, "set");
    forget.hidden = false;
    onChange(prefix);
  });
  forget.addEventListener("click", () => {
    forgetKey();
    forget.hidden = true;
    announce(state, "Key forgotten. Paste a key to continue.", "none");
    input.focus();
    onChange(null);
  });
  // A page left for another in its tab (a link followed, an address typed) may be kept whole in the
  // browser's back/forward cache: the back button, the next user's of a shared computer included, would
  // bring it back with the key and what it showed. Leaving forgets both, as a reload does.
  window.addEventListener("pagehide", () => {
    input.value = "";
    if (hasKey()) {
      forgetKey();
      forget.hidden = true;
      announce(state, "Key forgotten when you left the page. Paste a key to continue.", "none");
    }
    onChange(null);
  });
}
