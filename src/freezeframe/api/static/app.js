// freezeframe dashboard: a little plain JavaScript, no framework, no build step.
// Every text from the server is put in with textContent (never innerHTML).
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({ code: "bad-response", message: r.statusText }));
  if (!r.ok) throw body;
  return body;
}

// VM list: one doctor call per row, filled in as each answers.
function doctorRows() {
  document.querySelectorAll("tr[data-doctor]").forEach(async (row) => {
    const level = row.querySelector(".doctor-level");
    const fails = row.querySelector(".doctor-fails");
    try {
      const rep = await getJson(row.dataset.doctor);
      level.replaceChildren(el("span", rep.predicted_level, "level level-" + rep.predicted_level));
      const failed = rep.checks.filter((c) => c.status === "fail").map((c) => c.name);
      fails.replaceChildren(failed.length ? el("span", failed.join(", "), "fail") : el("span", "none", "muted"));
    } catch (err) {
      level.replaceChildren(el("span", (err.code || "error") + ": " + (err.message || ""), "bad"));
    }
  });
}

// VM page: the doctor's whole checklist.
async function doctorCard() {
  const card = document.getElementById("doctor");
  if (!card) return;
  const verdict = card.querySelector(".doctor-verdict");
  const table = card.querySelector(".doctor-checks");
  try {
    const rep = await getJson(card.dataset.doctor);
    verdict.replaceChildren(el("span", rep.verdict, "level level-" + rep.predicted_level));
    verdict.dataset.level = rep.predicted_level;
    const body = table.querySelector("tbody");
    for (const c of rep.checks) {
      const tr = el("tr");
      tr.append(el("th", c.name), el("td", c.status, c.status), el("td", c.detail), el("td", c.fix || ""));
      tr.firstChild.scope = "row";
      body.append(tr);
    }
    table.hidden = false;
  } catch (err) {
    verdict.replaceChildren(el("span", (err.code || "error") + ": " + (err.message || ""), "bad"));
  }
}

// Snapshot page while a job runs: follow its Server-Sent Events, then show the result.
function followProgress() {
  const card = document.getElementById("progress");
  if (!card) return;
  const list = document.getElementById("steps");
  const es = new EventSource(card.dataset.events);
  const done = () => { es.close(); window.location.reload(); };
  es.addEventListener("step", (m) => {
    const ev = JSON.parse(m.data);
    const li = el("li");
    li.append(el("span", (ev.t || "").slice(11, 23), "t"), el("b", ev.name), document.createTextNode(" " + (ev.detail || "")));
    list.append(li);
  });
  es.addEventListener("record", done);
  es.addEventListener("verification", done);
  es.addEventListener("error", (m) => {
    if (m.data) { // an error document from the server (not a dropped connection)
      const e = JSON.parse(m.data);
      list.append(el("li", (e.code || "error") + ": " + (e.message || ""), "bad"));
      done();
    }
  });
  es.addEventListener("end", done);
}

document.addEventListener("DOMContentLoaded", () => { doctorRows(); doctorCard(); followProgress(); });
