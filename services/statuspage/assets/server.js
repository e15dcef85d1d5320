// Keel status page of a server: this node's status, the cluster as this
// node sees it, and the charts of what its NBD export served.
"use strict";

(() => {
  const { $, el, setText, setNodes, getJSON, bytes, num, badge, pageLink, bar } = keel;
  const charts = keel.ioCharts($("charts"));
  const history = new keel.History();

  function syncCell(s) {
    if (!s || !s.sync) return el("span", { class: "muted" }, "–");
    const y = s.sync;
    if (y.active) return bar(y.bytes_compared, y.bytes_total);
    if (y.error) return el("span", { class: "badge down" }, "failed");
    return el("span", { class: "muted" }, "done");
  }

  function renderResync(s) {
    const y = s.sync;
    if (!y) return setNodes("resync", el("span", { class: "muted" }, "No resync since this process started."));
    const facts = [
      "to snapshot index " + num(y.index), "compared " + bytes(y.bytes_compared) + " of " + bytes(y.bytes_total),
      "moved " + bytes(y.bytes_moved), "zeroed " + bytes(y.bytes_zeroed), "from " + y.peers + " peer(s)",
    ];
    if (y.active) {
      setNodes("resync", badge("syncing"), " ", bar(y.bytes_compared, y.bytes_total), " " + facts.join(", ") +
        ", " + bytes(y.rate_bytes_per_sec) + "/s");
    } else if (y.error) {
      setNodes("resync", badge("failed", "down"), " " + y.error);
    } else {
      setNodes("resync", badge("done", "up"), " last resync finished " + new Date(y.finished).toLocaleString() + ": " + facts.join(", "));
    }
  }

  function renderSelf(s) {
    setText("self", s.self && s.self.id ? s.self.id : "");
    setNodes("state", badge(s.state));
    setText("term", num(s.term));
    setText("commit", num(s.commit_index));
    setNodes("applied", el("span", {}, num(s.applied_index)), el("small", {}, " last log " + num(s.last_log_index)));
    setNodes("writer", s.writer ? el("span", {}, s.writer, el("small", {}, " epoch " + num(s.epoch))) : el("span", { class: "muted" }, "none"));
    setText("volume", s.image_size ? bytes(s.image_size) : "–");
    setText("version", (s.version || "?") + " / " + (s.level || "?"));
    setText("headline", s.image_path || "");
    renderResync(s);
  }

  function renderCluster(s, c) {
    const leaderID = c ? c.leader : s.leader;
    const members = c ? c.members : [];
    const leader = members.find((m) => m.id === leaderID);
    if (!leaderID) setNodes("leader", el("span", { class: "muted" }, "none known"));
    else setText("leader", leaderID);
    const isLeader = s.state === "Leader";
    if (isLeader) {
      setText("view", "This node leads: lag is each member's applied index behind this node's.");
    } else if (leader && leader.http) {
      setNodes("view", el("span", {}, "This node follows " + leaderID + " and shows what it knows; lag is behind the leader's applied index as the leader reported it. "),
        pageLink(leader.http, "Open the leader's page"));
    } else {
      setText("view", "No leader known to this node: the table is what this node knows.");
    }
    const ref = leader && leader.status ? leader.status.applied_index : (isLeader ? s.applied_index : undefined);
    const rows = members.map((m) => {
      const st = m.status;
      const lag = st && ref !== undefined ? Math.max(0, ref - st.applied_index) : undefined;
      return el("tr", { "data-id": m.id },
        el("td", {}, m.id === s.self.id ? el("b", {}, m.id + " (this)") : m.id),
        el("td", {}, m.suffrage),
        el("td", {}, st ? badge(st.state) : el("span", { class: "badge down", title: m.error || "" }, "unreachable")),
        el("td", { class: "num" }, st ? num(st.applied_index) : "–"),
        el("td", { class: "num" }, st ? num(st.commit_index) : "–"),
        el("td", { class: "num" }, lag === undefined ? "–" : num(lag)),
        el("td", {}, syncCell(st)),
        el("td", {}, st ? (st.version || "?") + " / " + (st.level || "?") : "–"),
        el("td", {}, m.http ? pageLink(m.http, m.http) : "–"));
    });
    setNodes("members", ...rows);
  }

  keel.poll(async () => {
    const [s, c, h] = await Promise.allSettled([getJSON("/v1/status"), getJSON("/v1/cluster"), history.update()]);
    if (s.status === "rejected") throw s.reason;
    renderSelf(s.value);
    renderCluster(s.value, c.status === "fulfilled" ? c.value : null);
    if (h.status === "fulfilled") {
      for (const ch of charts) ch.draw(h.value, history.now);
    }
  });
})();
