// Keel status page of a proxy: whom it follows, its writer state, its
// cache, the servers as it sees them, and the charts of what it served.
"use strict";

(() => {
  const { $, el, setText, setNodes, getJSON, bytes, num, badge, pageLink } = keel;
  const charts = keel.ioCharts($("charts"));
  const history = new keel.History();
  charts.push(new keel.Chart($("charts"), "chart-hits", "Cache hit rate (%)", [
    { label: "hits", color: "#18794e", get: (s) => (s.cache_hit_rate === undefined ? undefined : 100 * s.cache_hit_rate) },
  ], keel.short));

  function render(p) {
    const c = p.counters || {};
    setText("self", p.writer);
    const leader = (p.servers || []).find((s) => s.http === p.leader);
    if (p.leader) setNodes("leader", pageLink(p.leader, leader && leader.id ? leader.id : p.leader));
    else setNodes("leader", el("span", { class: "muted" }, "none known"));
    setNodes("writer", el("span", {}, p.writer + " "), p.fenced ? badge("fenced") : p.holding ? badge("holding") : badge("not holding", "Candidate"));
    setNodes("epoch", p.epoch ? el("span", {}, num(p.epoch)) : el("span", { class: "muted" }, "none"),
      p.fenced ? el("small", {}, " " + p.fenced) : "");
    setText("acked", num(p.last_acked_index));
    setNodes("cache", p.cache_bytes ? el("span", {}, bytes(p.cached_bytes), el("small", {}, " of " + bytes(p.cache_bytes))) : el("span", { class: "muted" }, "off"));
    const looked = (c.cache_hits || 0) + (c.cache_misses || 0);
    setNodes("hitrate", looked ? el("span", {}, (100 * c.cache_hits / looked).toFixed(1) + "%", el("small", {}, " of " + num(looked) + " blocks")) : el("span", { class: "muted" }, "–"));
    setNodes("rw", el("span", {}, num(c.reads) + " / " + num(c.writes)));
    setText("version", (p.version || "?") + " / " + (p.level || "?"));
    setText("headline", "volume " + bytes(p.size || 0));
    setNodes("servers", ...(p.servers || []).map((s) => el("tr", { "data-id": s.id || s.http },
      el("td", {}, s.http === p.leader ? el("b", {}, (s.id || "?") + " (leader)") : (s.id || "?")),
      el("td", {}, pageLink(s.http, s.http)),
      el("td", {}, s.up ? badge("up") : badge("down")),
      el("td", {}, s.state ? badge(s.state) : "–"),
      el("td", { class: "num" }, num(s.applied_index)),
      el("td", {}, s.syncing ? badge("syncing") : el("span", { class: "muted" }, "–")),
      el("td", { class: "num" }, num(s.reads)))));
    setNodes("counters", ...Object.keys(c).sort().map((k) => el("tr", {}, el("th", {}, k.replaceAll("_", " ")), el("td", { class: "num" }, num(c[k])))));
  }

  keel.poll(async () => {
    const [s, h] = await Promise.allSettled([getJSON("/v1/status"), history.update()]);
    if (s.status === "rejected") throw s.reason;
    render(s.value);
    if (h.status === "fulfilled") {
      for (const ch of charts) ch.draw(h.value, history.now);
    }
  });
})();
