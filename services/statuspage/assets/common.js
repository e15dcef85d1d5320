// Keel status page: what the server's and the proxy's pages share. Plain
// JavaScript, no library: the charts are inline SVG drawn below.
"use strict";

const keel = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  // The charts show the history they have, from one minute up to the ten
  // minutes the process keeps.
  const MIN_WINDOW_MS = 60 * 1000, MAX_WINDOW_MS = 10 * 60 * 1000;
  const TICK_STEPS_S = [10, 15, 30, 60, 120];

  const $ = (id) => document.getElementById(id);

  // el makes an element: el("td", {class: "num"}, "text", child, ...).
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  function setText(id, text) { const e = $(id); if (e.textContent !== String(text)) e.textContent = text; }
  function setNodes(id, ...kids) { $(id).replaceChildren(...kids); }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!r.ok) {
      let msg = "HTTP " + r.status;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      throw new Error(url + ": " + msg);
    }
    return r.json();
  }

  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + u[i];
  }
  const num = (n) => (n === undefined || n === null) ? "–" : Number(n).toLocaleString("en-US");
  function short(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    return v.toFixed(2);
  }
  function badge(text, cls) { return el("span", { class: "badge " + (cls || text) }, text); }
  function pageLink(addr, text) {
    const href = /^https?:\/\//.test(addr) ? addr : location.protocol + "//" + addr + "/";
    return el("a", { href }, text || addr);
  }
  function bar(done, total) {
    const pct = total > 0 ? Math.min(100, (100 * done) / total) : 0;
    const b = el("span", { class: "bar" }, el("span", { style: "width:" + pct.toFixed(1) + "%" }));
    return el("span", {}, b, " " + pct.toFixed(0) + "%");
  }

  // niceMax rounds a chart's top up to 1, 2 or 5 times a power of ten.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // Chart draws series of samples as lines in an SVG over the time the
  // history covers (see MIN_WINDOW_MS): a y axis from 0 to a round top,
  // three grid lines, a legend with each series' latest value.
  class Chart {
    constructor(parent, id, title, series, fmt) {
      this.series = series; // [{label, color, get: sample => number|undefined}]
      this.fmt = fmt;
      this.w = 480; this.h = 150; this.left = 44; this.bottom = 18; this.top = 6;
      this.svg = svg("svg", { viewBox: `0 0 ${this.w} ${this.h}`, role: "img", "aria-label": title });
      this.legend = el("div", { class: "legend" });
      parent.append(el("div", { class: "chart", id }, el("h3", {}, title), this.svg, this.legend));
    }

    draw(samples, now) {
      const { w, h, left, bottom, top } = this, pw = w - left - 4, ph = h - bottom - top;
      const span = Math.min(MAX_WINDOW_MS, Math.max(MIN_WINDOW_MS, samples.length ? now - samples[0].t : 0));
      const from = now - span;
      const shown = samples.filter((s) => s.t >= from);
      let max = 0;
      for (const s of shown) for (const se of this.series) { const v = se.get(s); if (v > max) max = v; }
      const ymax = niceMax(max);
      const x = (t) => left + ((t - from) / span) * pw;
      const y = (v) => top + ph - (v / ymax) * ph;
      const kids = [];
      for (const f of [0, 0.5, 1]) {
        kids.push(svg("line", { class: "grid", x1: left, x2: w - 4, y1: y(f * ymax), y2: y(f * ymax) }));
        const t = svg("text", { x: left - 4, y: y(f * ymax) + 3, "text-anchor": "end" });
        t.textContent = this.fmt(f * ymax);
        kids.push(t);
      }
      const step = TICK_STEPS_S.find((st) => span / 1000 / st <= 6) || 120;
      for (let ago = 0; ago * 1000 <= span; ago += step) {
        const t = svg("text", { x: x(now - ago * 1000), y: h - 4, "text-anchor": ago === 0 ? "end" : "middle" });
        t.textContent = ago === 0 ? "now" : "-" + (ago % 60 === 0 ? ago / 60 + "m" : ago + "s");
        kids.push(t);
      }
      const legend = [];
      for (const se of this.series) {
        const pts = [];
        let last, top = 0;
        for (const s of shown) {
          const v = se.get(s);
          if (v === undefined || v === null) continue;
          pts.push(x(s.t).toFixed(1) + "," + y(v).toFixed(1));
          last = v;
          top = Math.max(top, v);
        }
        // data-max: the series' highest value shown (tests read it).
        if (pts.length) kids.push(svg("polyline", { class: "line", stroke: se.color, points: pts.join(" "), "data-series": se.label, "data-max": top }));
        legend.push(el("span", {}, el("i", { style: "background:" + se.color }), se.label + " ",
          el("b", {}, last === undefined ? "–" : this.fmt(last))));
      }
      this.svg.replaceChildren(...kids);
      this.legend.replaceChildren(...legend);
    }
  }

  // ioCharts are the charts both pages show: operations, throughput and
  // latency of reads and writes.
  function ioCharts(parent) {
    const c = (id, title, series, fmt) => new Chart(parent, id, title, series, fmt);
    return [
      c("chart-ops", "Operations (per second)", [
        { label: "reads/s", color: "#2759cd", get: (s) => s.read_ops },
        { label: "writes/s", color: "#d9480f", get: (s) => s.write_ops },
      ], short),
      c("chart-bytes", "Throughput (MB/s)", [
        { label: "read MB/s", color: "#2759cd", get: (s) => s.read_bytes / 1e6 },
        { label: "write MB/s", color: "#d9480f", get: (s) => s.write_bytes / 1e6 },
      ], short),
      c("chart-latency", "Latency (ms)", [
        { label: "read p50", color: "#2759cd", get: (s) => (s.read_ops > 0 ? s.read_p50_ms : undefined) },
        { label: "read p99", color: "#7a9ff0", get: (s) => (s.read_ops > 0 ? s.read_p99_ms : undefined) },
        { label: "write p50", color: "#d9480f", get: (s) => (s.write_ops > 0 ? s.write_p50_ms : undefined) },
        { label: "write p99", color: "#f59f72", get: (s) => (s.write_ops > 0 ? s.write_p99_ms : undefined) },
      ], short),
    ];
  }

  // History is the page's copy of the process's history: each update
  // fetches only the samples after the latest it has, and keeps the
  // last MAX_WINDOW_MS of them.
  class History {
    constructor() { this.samples = []; this.now = 0; }

    async update() {
      const n = this.samples.length;
      const h = await getJSON("/v1/status/history?since=" + (n ? this.samples[n - 1].t : 0));
      this.samples.push(...h.samples);
      this.now = h.now;
      const cut = h.now - MAX_WINDOW_MS;
      while (this.samples.length && this.samples[0].t < cut) this.samples.shift();
      document.body.dataset.samples = String(this.samples.length);
      return this.samples;
    }
  }

  // poll calls tick every second, one call at a time; a failing call shows
  // its error in the banner until one succeeds. The body's data-polls
  // counts successful calls (tests wait on it).
  function poll(tick) {
    let polls = 0;
    const once = async () => {
      try {
        await tick();
        polls++;
        document.body.dataset.polls = String(polls);
        $("banner").classList.remove("show");
        setText("updated", "updated " + new Date().toLocaleTimeString());
      } catch (e) {
        $("banner").textContent = "Cannot reach this process: " + e.message;
        $("banner").classList.add("show");
      }
      setTimeout(once, 1000);
    };
    once();
  }

  return { $, el, setText, setNodes, getJSON, bytes, num, short, badge, pageLink, bar, Chart, History, ioCharts, poll };
})();
