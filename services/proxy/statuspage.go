package proxy

import "github.com/keelstore/keel/services/statuspage"

// newStatusPage is the proxy's status page on its --http (GET /; see
// services/statuspage): the page reads /v1/status and /v1/status/history,
// and its charts show what the proxy's NBD export served (the Proxy is
// wrapped in the page's meter) and its cache's hit rate. The returned
// service samples that history once a second; Run adds it to the tree
// with the API.
func newStatusPage(p *Proxy) *statuspage.Service {
	return statuspage.NewService(statuspage.KindProxy, func(t *statuspage.Totals) {
		t.CacheHits, t.CacheMisses = p.stats.CacheHits.Load(), p.stats.CacheMisses.Load()
	})
}
