// Audit events as table rows, and the filters of the search form as the API's query parameters.

import { el, formatTime } from "../common/ui.js";

/** The value of a datetime-local field (the reader's local time) as ISO 8601 in UTC, or "" when empty. */
function isoTime(value) {
  if (!value) return "";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? value : date.toISOString();
}

/** The search form's filters as query parameters (empty ones left out by http.query). */
export function filters(form) {
  const field = (name) => form.elements.namedItem(name).value.trim();
  return {
    since: isoTime(field("since")),
    until: isoTime(field("until")),
    clinic: field("clinic"),
    action: field("action"),
    outcome: field("outcome"),
    case: field("case"),
    actor: field("actor"),
  };
}

function short(id) {
  return id ? el("code", { title: id, text: id }) : "—";
}

function entity(event) {
  if (!event.entity_type && !event.entity_id) return "—";
  return el("span", {}, `${event.entity_type ?? ""} `, event.entity_id ? short(event.entity_id) : "");
}

function actor(event) {
  const who = event.actor_role ? `${event.actor_type} (${event.actor_role})` : event.actor_type;
  return el("span", {}, who, event.actor_key_id ? el("br") : "", event.actor_key_id ? short(event.actor_key_id) : "");
}

function source(event) {
  const parts = [event.source_ip ?? "—"];
  if (event.user_agent) parts.push(el("br"), el("span", { className: "hint", text: event.user_agent }));
  return el("span", {}, parts);
}

/** One event as a table row (`data-action`, `data-outcome`, `data-entity-id` for whoever scripts the page). */
export function eventRow(event) {
  const detail = Object.keys(event.detail ?? {}).length ? JSON.stringify(event.detail) : "—";
  return el(
    "tr",
    {
      "data-event-id": String(event.id),
      "data-action": event.action,
      "data-outcome": event.outcome,
      "data-entity-id": event.entity_id ?? "",
    },
    el("th", { scope: "row" }, el("time", { datetime: event.occurred_at, text: formatTime(event.occurred_at) })),
    el("td", {}, el("code", { text: event.action })),
    el("td", { className: `outcome outcome-${event.outcome}`, text: event.outcome }),
    el("td", {}, entity(event)),
    el("td", {}, short(event.clinic_id)),
    el("td", {}, actor(event)),
    el("td", {}, source(event)),
    el("td", {}, short(event.request_id)),
    el("td", { className: "detail" }, el("code", { text: detail })),
  );
}
