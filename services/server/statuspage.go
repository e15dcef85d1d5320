package server

import "github.com/keelstore/keel/services/statuspage"

// newStatusPage is the server's status page on its HTTP API (GET /; see
// services/statuspage): the page reads /v1/status, /v1/cluster and
// /v1/status/history, and its charts show what this node's NBD export
// served (the Volume is wrapped in the page's meter) and the writes
// committed through its API (POST /v1/apply, from proxies and followers,
// through the meter's WriteHandler). The returned service
// samples that history once a second; New adds it to the tree.
func newStatusPage() *statuspage.Service {
	return statuspage.NewService(statuspage.KindServer, nil)
}
