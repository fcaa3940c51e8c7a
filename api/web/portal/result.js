// Showing one case: its status, and once it has ended its result: a diagnosis (label, calibrated
// probabilities as bars, uncertainty, referral and reasons, the heat map over the image), "not a lesion:
// no answer" for an out-of-distribution image, or the failure.

import { blobUrl } from "../common/http.js";
import { el, formatTime, percent, showProblem } from "../common/ui.js";
import {
  GRADCAM_TEXT,
  OOD_REASONS,
  REFERRAL_REASONS,
  STATUS_TEXT,
  className,
  wordsFor,
} from "./labels.js";

/** Object URLs of the result on show (the heat map): revoked when the next one replaces it. */
let shownUrls = [];
let renders = 0; // a heat map fetched for a result no longer on show is dropped, not shown

function releaseUrls() {
  for (const url of shownUrls) URL.revokeObjectURL(url);
  shownUrls = [];
  renders += 1;
}

/** Take the result off the page, its heat map's object URL with it. */
export function clearCase(section, body) {
  releaseUrls();
  body.replaceChildren();
  section.hidden = true;
  delete section.dataset.caseId;
}

function facts(item) {
  const rows = [
    ["Case", el("code", { text: item.id })],
    ["Client reference", item.client_ref ?? "—"],
    ["Priority", item.priority],
    ["Status", wordsFor(STATUS_TEXT, item.status)],
    ["Submitted", formatTime(item.created_at)],
  ];
  if (item.finished_at) rows.push(["Finished", formatTime(item.finished_at)]);
  return el("dl", { className: "facts" }, rows.map(([term, value]) => [el("dt", { text: term }), el("dd", {}, value)]));
}

function probabilityBars(probabilities, label) {
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  return el(
    "div",
    { className: "probabilities" },
    el("h3", { id: "probabilities-heading", text: "Calibrated probabilities" }),
    el(
      "ul",
      { "aria-labelledby": "probabilities-heading" },
      entries.map(([code, value]) =>
        el(
          "li",
          { className: code === label ? "probability chosen" : "probability", "data-class": code },
          el("label", { for: `probability-${code}`, text: `${className(code)} (${code})` }),
          el("meter", { id: `probability-${code}`, min: "0", max: "1", value: String(value) }),
          el("span", { className: "value", text: percent(value) }),
        ),
      ),
    ),
  );
}

function referral(result) {
  if (!result.referral) {
    return el(
      "div",
      { id: "referral", className: "referral referral-no", "data-referral": "false" },
      el("p", {}, el("strong", { text: "No referral flag." }), " The model found no reason to refer; a clinician still reviews the lesion."),
    );
  }
  return el(
    "div",
    { id: "referral", className: "referral referral-yes", "data-referral": "true" },
    el("p", {}, el("strong", { text: "Referral: a clinician should review this lesion." }), " Why:"),
    el("ul", {}, result.referral_reasons.map((code) => el("li", { "data-reason": code, text: wordsFor(REFERRAL_REASONS, code) }))),
  );
}

function heatmapFigure(item, original) {
  const opacity = el("input", {
    id: "heatmap-opacity",
    type: "range",
    min: "0",
    max: "100",
    value: "70",
    step: "5",
    "aria-valuetext": "70 percent",
  });
  const overlay = el("img", {
    id: "heatmap",
    className: "heatmap-overlay",
    alt: "Grad-CAM heat map over the image: warmer colours mark the regions that weighed most in the model's answer",
    "data-loaded": "false",
  });
  const layers = el("div", { className: "heatmap-stack" });
  if (original) layers.append(el("img", { className: "heatmap-original", src: original, alt: "The submitted image" }));
  layers.append(overlay);
  const status = el("p", { id: "heatmap-status", className: "hint", role: "status", text: "Loading the heat map…" });
  const problem = el("div", { className: "problem", role: "alert", hidden: true });
  const setOpacity = () => {
    overlay.style.opacity = String(Number(opacity.value) / 100); // CSSOM, not a style attribute: allowed by the CSP
    opacity.setAttribute("aria-valuetext", `${opacity.value} percent`);
  };
  opacity.addEventListener("input", setOpacity);
  setOpacity();
  const render = renders;
  blobUrl(item.links.heatmap)
    .then(({ url }) => {
      if (render !== renders) {
        URL.revokeObjectURL(url); // another result (or none) is on show by now
        return;
      }
      shownUrls.push(url);
      overlay.addEventListener(
        "load",
        () => {
          overlay.dataset.loaded = "true";
          status.textContent = original
            ? "Heat map over your image: slide to change its opacity."
            : "Heat map over the image (the original is not kept by the portal): slide to change its opacity.";
        },
        { once: true },
      );
      overlay.src = url;
    })
    .catch((error) => {
      status.textContent = "The heat map could not be shown.";
      showProblem(problem, error);
    });
  return el(
    "figure",
    { className: "heatmap" },
    layers,
    el("figcaption", {}, status),
    el("div", { className: "row" }, el("label", { for: "heatmap-opacity", text: "Heat map opacity" }), opacity),
    problem,
  );
}

function diagnosis(item, original) {
  const result = item.result;
  const parts = [
    el(
      "p",
      { className: "diagnosis" },
      el("span", { className: "caption", text: "The model's label" }),
      el("strong", { id: "diagnosis-name", "data-label": result.label, text: result.label_name }),
      el("span", { className: "hint", text: ` (${result.label}), its probability ${percent(result.confidence)}` }),
    ),
    referral(result),
    probabilityBars(result.probabilities, result.label),
    el(
      "p",
      { className: "uncertainty" },
      el("label", { for: "uncertainty", text: "Uncertainty " }),
      el("meter", { id: "uncertainty", min: "0", max: "1", value: String(result.uncertainty), high: "0.6", optimum: "0" }),
      el("span", { className: "value", text: ` ${result.uncertainty.toFixed(2)} (0 certain, 1 no idea)` }),
    ),
  ];
  if (result.gradcam_status === "ok" && item.links.heatmap) parts.push(heatmapFigure(item, original));
  else if (item.status === "purged") parts.push(el("p", { className: "hint", text: "The heat map was erased with the image." }));
  else parts.push(el("p", { id: "heatmap-status", className: "hint", text: wordsFor(GRADCAM_TEXT, result.gradcam_status) }));
  return parts;
}

function outOfDistribution(result) {
  return el(
    "div",
    { id: "ood", className: "ood", role: "note", "aria-labelledby": "ood-title" },
    el("h3", { id: "ood-title", text: "Not a lesion: no answer" }),
    el("p", { text: result.message }),
    el("p", { className: "hint", text: `Why: ${result.ood_reasons.map((code) => wordsFor(OOD_REASONS, code)).join("; ")}.` }),
    el("p", { text: "No diagnosis, probabilities or heat map were made. Take a new dermoscopy image and submit it as a new case." }),
  );
}

function modelLine(result) {
  const id = result.model.id;
  return el(
    "p",
    { className: "hint model" },
    "Model ",
    el("code", { text: id }),
    " · ",
    el("a", { href: `/model-card/${encodeURIComponent(id)}`, target: "_blank", rel: "noopener", text: "its model card" }),
  );
}

/**
 * Show `item` (a case as the API returns it) in `body`; `original` is an object URL of the image the
 * clinician submitted from this page (the API never sends images back), or null.
 */
export function renderCase(section, body, item, { original = null, onErase } = {}) {
  releaseUrls();
  const outcome = item.result?.outcome ?? null;
  section.dataset.caseId = item.id;
  section.dataset.status = item.status;
  section.dataset.state = outcome ?? item.status;
  const parts = [facts(item)];
  if (item.result && outcome === "diagnosis") parts.push(...diagnosis(item, original));
  else if (item.result && outcome === "out_of_distribution") parts.push(outOfDistribution(item.result));
  else if (item.failure) {
    parts.push(
      el("div", { id: "failure", className: "failure", role: "note" }, el("strong", { text: "The case failed: " }), `${item.failure.message} (${item.failure.code})`),
    );
  } else if (!item.result && item.status !== "purged") {
    parts.push(el("p", { className: "hint", text: "The result appears here as soon as the case has ended." }));
  }
  if (item.status === "purged") parts.push(el("p", { id: "erased-note", text: "This case's patient data were erased: its image, heat map, result and reported outcome." }));
  if (item.result) parts.push(modelLine(item.result), el("p", { className: "disclaimer-inline", text: "Decision support, not a diagnosis." }));
  if (onErase && item.status !== "purged" && (item.status === "succeeded" || item.status === "failed")) {
    const erase = el("button", { type: "button", className: "danger", id: "result-erase", text: "Erase this case's data…" });
    erase.addEventListener("click", () => onErase(item.id, erase));
    parts.push(erase);
  }
  body.replaceChildren(...parts);
  section.hidden = false;
}
