package statuspage

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/http"
	"strconv"
	"time"
)

// The page's files: one HTML page per process kind, the script and the
// style they share, and each kind's script.
//
//go:embed assets
var assets embed.FS

// Kinds of page: which one GET / serves.
const (
	KindServer = "server"
	KindProxy  = "proxy"
)

// contentSecurityPolicy lets the page load nothing but its own files and
// talk to nothing but its own origin, so a page that reached for a CDN
// would fail in every browser rather than work only online.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Page serves the status page of one process on its HTTP API:
//
//	GET /                    the page (Kind's)
//	GET /ui/...              its script and style
//	GET /v1/status/history   HistoryResponse; with ?since=T (Unix ms),
//	                         only the samples after T
//
// The page is read-only: it calls only GET endpoints of the same origin.
type Page struct {
	// Kind is KindServer or KindProxy. Required.
	Kind string
	// History is what /v1/status/history answers. Required.
	History *History
	// Every is the interval History's samples are taken at (reported to
	// the page). Default SampleEvery.
	Every time.Duration
}

// Validate checks the page's configuration; errors name the bad field.
func (p *Page) Validate() error {
	if p.Kind != KindServer && p.Kind != KindProxy {
		return fmt.Errorf("statuspage: Kind %q: must be %q or %q", p.Kind, KindServer, KindProxy)
	}
	if p.History == nil {
		return fmt.Errorf("statuspage: History is required")
	}
	return nil
}

// Register adds the page's routes to mux. It panics if the page's
// configuration is not valid, as http.ServeMux does on a bad pattern: both
// are programming errors found by the first test that serves it.
func (p *Page) Register(mux *http.ServeMux) {
	if err := p.Validate(); err != nil {
		panic(err)
	}
	ui, err := fs.Sub(assets, "assets")
	if err != nil {
		panic(fmt.Sprintf("statuspage: embedded assets: %v", err))
	}
	files := http.StripPrefix("/ui/", http.FileServerFS(ui))
	mux.HandleFunc("GET /{$}", p.serveIndex)
	mux.Handle("GET /ui/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pageHeaders(w)
		files.ServeHTTP(w, r)
	}))
	mux.HandleFunc("GET /v1/status/history", p.serveHistory)
}

// pageHeaders are the headers of the page's files.
func pageHeaders(w http.ResponseWriter) {
	w.Header().Set("Content-Security-Policy", contentSecurityPolicy)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "no-cache")
}

func (p *Page) serveIndex(w http.ResponseWriter, r *http.Request) {
	b, err := assets.ReadFile("assets/" + p.Kind + ".html")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	pageHeaders(w)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write(b)
}

func (p *Page) serveHistory(w http.ResponseWriter, r *http.Request) {
	every := p.Every
	if every <= 0 {
		every = SampleEvery
	}
	var since int64
	if q := r.URL.Query().Get("since"); q != "" {
		var err error
		if since, err = strconv.ParseInt(q, 10, 64); err != nil {
			http.Error(w, fmt.Sprintf("since %q: want Unix milliseconds", q), http.StatusBadRequest)
			return
		}
	}
	// Filtered, not searched: after the clock went back, later samples
	// may be stamped before earlier ones.
	var samples []Sample
	for _, s := range p.History.Samples() {
		if s.At > since {
			samples = append(samples, s)
		}
	}
	if samples == nil {
		samples = []Sample{}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(HistoryResponse{Now: time.Now().UnixMilli(), EveryMs: every.Milliseconds(), Samples: samples})
}
