package statuspage

import (
	"context"
	"net/http"
)

// Service is one process's status page: the Meter its NBD export is
// wrapped in, the History of it, the Sampler (this service's Serve) that
// feeds the history once a second, and the Page's routes.
type Service struct {
	meter   Meter
	history *History
	sampler Sampler
	page    Page
}

// NewService returns the status page of a process of kind (KindServer or
// KindProxy). more, if not nil, adds what the meter does not count to each
// observation (a proxy's cache hits and misses).
func NewService(kind string, more func(*Totals)) *Service {
	s := &Service{history: NewHistory(HistoryLen)}
	s.sampler = Sampler{History: s.history, Name: kind + " status history", Read: func() Totals {
		t := s.meter.Totals()
		if more != nil {
			more(&t)
		}
		return t
	}}
	s.page = Page{Kind: kind, History: s.history, Every: s.sampler.Interval()}
	if err := s.page.Validate(); err != nil {
		panic(err) // a kind that is not one of the constants: a programming error
	}
	return s
}

// Meter is what the process's NBD export is to be wrapped in
// (Meter.Wrap).
func (s *Service) Meter() *Meter { return &s.meter }

// History is the page's history.
func (s *Service) History() *History { return s.history }

// Register adds the page's routes to mux (see Page).
func (s *Service) Register(mux *http.ServeMux) { s.page.Register(mux) }

func (s *Service) String() string { return s.sampler.String() }

// Serve samples until ctx ends.
func (s *Service) Serve(ctx context.Context) error { return s.sampler.Serve(ctx) }
