// Package statuspage is the status page that `keel server` and `keel
// proxy` serve on --http for people: the embedded page (HTML, plain JS
// drawing its charts as inline SVG, CSS; nothing fetched from elsewhere),
// and the per-second history behind its charts.
//
//   - Meter counts an NBD export's requests (ops and bytes by kind, and a
//     latency histogram) by wrapping its nbd.Backend;
//   - History keeps the last ten minutes of per-second Samples computed
//     from successive Totals (pure: time comes in as an argument);
//   - Sampler is the supervised service that feeds a History once a
//     second;
//   - Assets and Page serve the embedded files.
//
// The page reads the process's own JSON API (/v1/status, /v1/cluster on a
// server) and GET /v1/status/history (HistoryResponse), every second.
//
// It imports nbd only: never services/server, services/proxy, cmd or
// chaos. Both processes import it.
package statuspage
