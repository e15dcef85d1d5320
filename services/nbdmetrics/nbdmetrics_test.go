package nbdmetrics

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

// failing fails every write.
type failing struct{ nbd.Backend }

var errBroken = errors.New("broken")

func (failing) WriteAt(context.Context, []byte, uint64, bool) error { return errBroken }

// family finds one gathered family by name.
func family(t *testing.T, reg *prometheus.Registry, name string) *dto.MetricFamily {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			return f
		}
	}
	t.Fatalf("no family %s", name)
	return nil
}

// series finds the metric of f whose labels are all of want.
func series(t *testing.T, f *dto.MetricFamily, want map[string]string) *dto.Metric {
	t.Helper()
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		return m
	}
	t.Fatalf("%s has no series %v", f.GetName(), want)
	return nil
}

func TestRequestsCountKindsBytesAndLatency(t *testing.T) {
	r := New()
	clock := time.Unix(1000, 0)
	r.now = func() time.Time { c := clock; clock = clock.Add(3 * time.Millisecond); return c }
	reg := prometheus.NewRegistry()
	reg.MustRegister(r)
	ctx := context.Background()
	b := r.Wrap(nbdtest.NewMem(1 << 20))
	for i := 0; i < 3; i++ {
		if err := b.WriteAt(ctx, make([]byte, 4096), uint64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.ReadAt(ctx, make([]byte, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Trim(ctx, 0, 65536, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Zero(ctx, 0, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Wrap(failing{nbdtest.NewMem(4096)}).WriteAt(ctx, make([]byte, 512), 0, false); !errors.Is(err, errBroken) {
		t.Fatalf("a failing write through the wrapper: %v, want errBroken", err)
	}

	total := family(t, reg, "keel_nbd_requests_total")
	for _, c := range []struct {
		kind, result string
		want         float64
	}{{"write", "ok", 3}, {"write", "error", 1}, {"read", "ok", 1}, {"trim", "ok", 1}, {"zero", "ok", 1}, {"flush", "ok", 1}, {"extents", "ok", 0}} {
		if got := series(t, total, map[string]string{"kind": c.kind, "result": c.result}).GetCounter().GetValue(); got != c.want {
			t.Errorf("requests{kind=%s,result=%s} = %v, want %v", c.kind, c.result, got, c.want)
		}
	}
	bytes := family(t, reg, "keel_nbd_request_bytes_total")
	for kind, want := range map[string]float64{"write": 3 * 4096, "read": 8192, "trim": 65536, "zero": 1 << 20, "flush": 0} {
		if got := series(t, bytes, map[string]string{"kind": kind}).GetCounter().GetValue(); got != want {
			t.Errorf("bytes{kind=%s} = %v, want %v (a failed write moves nothing)", kind, got, want)
		}
	}
	h := series(t, family(t, reg, "keel_nbd_request_duration_seconds"), map[string]string{"kind": "write"}).GetHistogram()
	if h.GetSampleCount() != 4 || h.GetSampleSum() < 4*0.003-1e-9 || h.GetSampleSum() > 4*0.003+1e-9 {
		t.Errorf("write latency: %d samples summing %vs, want 4 of 3ms", h.GetSampleCount(), h.GetSampleSum())
	}
}
