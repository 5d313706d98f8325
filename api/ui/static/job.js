/* A job's page, live: chart points from progress and eval events, new rows in the event log, the state badge. */
(function () {
  "use strict";
  const series = JSON.parse(document.getElementById("series").textContent);
  const charts = [
    new FarmChart(document.getElementById("chart-loss"), [{key: "loss", color: "#1f6feb"}, {key: "eval_loss", color: "#d1242f", dots: true}]),
    new FarmChart(document.getElementById("chart-lr"), [{key: "lr", color: "#8250df"}]),
    new FarmChart(document.getElementById("chart-tps"), [{key: "tokens_per_s", color: "#2da44e"}]),
  ];
  charts.forEach(c => c.addAll(series));

  const table = document.getElementById("events");
  const rows = document.getElementById("event-rows");
  const stateBadge = document.getElementById("job-state");
  const terminal = ["succeeded", "failed", "cancelled"];

  function num(v) {
    return (typeof v === "number" && !Number.isInteger(v)) ? String(Number(v.toPrecision(4))) : String(v);
  }

  function setState(state) {
    stateBadge.textContent = state;
    stateBadge.className = "state state-" + state;
    if (terminal.includes(state)) {
      const form = document.getElementById("cancel-form");
      if (form) form.remove();
    }
  }

  function addRow(ev) {
    const tr = document.createElement("tr");
    const data = ev.data ? Object.entries(ev.data).map(([k, v]) => k + "=" + num(v)).join(" ") : "";
    const cells = [ev.id, ev.at.substring(11, 19), ev.attempt, ev.type, ev.state || "", data];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 0 || i === 2) td.className = "num";
      if (i === 5) td.className = "mono small";
      tr.appendChild(td);
    });
    rows.insertBefore(tr, rows.firstChild);
  }

  function progress(data) {
    if (typeof data.step !== "number") return;
    const total = data.total_steps;
    if (total) document.getElementById("job-bar").style.width = Math.min(100, 100 * data.step / total) + "%";
    const parts = ["step " + data.step + "/" + (total || "?")];
    if (typeof data.loss === "number") parts.push("loss " + num(data.loss));
    if (typeof data.tokens_per_s === "number") parts.push(Math.round(data.tokens_per_s) + " tok/s");
    document.getElementById("job-progress").textContent = parts.join(" · ");
  }

  if (!terminal.includes(stateBadge.textContent.trim())) {
    const source = new EventSource(table.dataset.stream);
    const onEvent = msg => {
      const ev = JSON.parse(msg.data);
      addRow(ev);
      if (ev.type === "progress" || ev.type === "eval") {
        const point = Object.assign({step: ev.data.step}, ev.type === "eval" ? {eval_loss: ev.data.eval_loss} : ev.data);
        charts.forEach(c => c.addAll([point]));
        if (ev.type === "progress") progress(ev.data);
      }
      if (ev.state) setState(ev.state);
      document.getElementById("job-attempt").textContent = ev.attempt;
    };
    ["state", "progress", "eval", "checkpoint", "log"].forEach(t => source.addEventListener(t, onEvent));
    source.onmessage = onEvent;
    source.addEventListener("end", msg => {
      source.close();
      setState(JSON.parse(msg.data).state);
      // The finished job's page has its adapter, checkpoints and final figures: show it.
      setTimeout(() => window.location.replace(window.location.pathname), 500);
    });
  }
})();
