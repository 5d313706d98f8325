/* A small line chart drawn as SVG: the console's own, no library, no CDN.
 *
 *   const chart = new FarmChart(svgElement, [{key: "loss", color: "#1f6feb"}, {key: "eval_loss", color: "#d1242f", dots: true}]);
 *   chart.add({step: 3, loss: 2.1});   // redraws; svg[data-points] counts the points drawn
 */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PAD = {left: 56, right: 12, top: 10, bottom: 26};

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 1) return String(Number(v.toPrecision(3)));
    if (a >= 1e-4) return String(Number(v.toPrecision(3)));
    return v.toExponential(2);
  }

  class FarmChart {
    constructor(svg, lines) {
      this.svg = svg;
      this.lines = lines.map(l => Object.assign({points: []}, l));
      this.width = +svg.getAttribute("width");
      this.height = +svg.getAttribute("height");
      this.draw();
    }

    add(point) {
      let added = false;
      for (const line of this.lines) {
        const v = point[line.key];
        if (typeof v === "number" && isFinite(v)) {
          // A resumed attempt repeats steps: the newest value for a step wins.
          const pts = line.points;
          while (pts.length && pts[pts.length - 1][0] >= point.step) pts.pop();
          pts.push([point.step, v]);
          added = true;
        }
      }
      return added;
    }

    addAll(points) {
      let any = false;
      for (const p of points) any = this.add(p) || any;
      if (any) this.draw();
    }

    count() {
      return this.lines.reduce((n, l) => n + l.points.length, 0);
    }

    draw() {
      const svg = this.svg, w = this.width, h = this.height;
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      const all = this.lines.flatMap(l => l.points);
      svg.setAttribute("data-points", String(this.count()));
      svg.appendChild(el("rect", {x: 0, y: 0, width: w, height: h, fill: "#fff"}));
      if (!all.length) {
        svg.appendChild(el("text", {x: w / 2, y: h / 2, "text-anchor": "middle", fill: "#8c959f", "font-size": 12}, "no points yet"));
        return;
      }
      let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
      let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
      if (x1 === x0) x1 = x0 + 1;
      if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
      const sx = x => PAD.left + (x - x0) / (x1 - x0) * (w - PAD.left - PAD.right);
      const sy = y => h - PAD.bottom - (y - y0) / (y1 - y0) * (h - PAD.top - PAD.bottom);
      for (let i = 0; i <= 4; i++) {
        const yv = y0 + (y1 - y0) * i / 4, y = sy(yv);
        svg.appendChild(el("line", {x1: PAD.left, x2: w - PAD.right, y1: y, y2: y, stroke: "#eaeef2"}));
        svg.appendChild(el("text", {x: PAD.left - 6, y: y + 4, "text-anchor": "end", "font-size": 10, fill: "#57606a"}, fmt(yv)));
        const xv = Math.round(x0 + (x1 - x0) * i / 4);
        svg.appendChild(el("text", {x: sx(xv), y: h - 8, "text-anchor": "middle", "font-size": 10, fill: "#57606a"}, String(xv)));
      }
      svg.appendChild(el("text", {x: 4, y: h - 8, "font-size": 10, fill: "#8c959f"}, "step"));
      for (const line of this.lines) {
        if (!line.points.length) continue;
        const d = line.points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
        svg.appendChild(el("path", {d: d, fill: "none", stroke: line.color, "stroke-width": 1.6, class: "series-" + line.key}));
        if (line.dots || line.points.length === 1) {
          for (const p of line.points) svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.8, fill: line.color}));
        }
      }
    }
  }

  window.FarmChart = FarmChart;
})();
