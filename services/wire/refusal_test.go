package wire

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/keelstore/keel/replica"
)

// Every refusal crosses as its number and comes back as replica's
// sentinel, the new levels' ones included.
func TestRefusalRoundTrip(t *testing.T) {
	for r, base := range refusalErrs {
		remote := fmt.Errorf("leader says: %w", base)
		if got := RefusalOf(remote); got != r {
			t.Errorf("RefusalOf(%v) = %v, want %v", remote, got, r)
		}
		if back := r.Err(remote.Error()); !errors.Is(back, base) {
			t.Errorf("%v.Err does not unwrap to %v", r, base)
		}
	}
	for _, want := range []error{replica.ErrFeatureLevel, replica.ErrUnknownCommand} {
		if RefusalOf(want) == RefusedOther {
			t.Errorf("%v has no refusal code of its own", want)
		}
	}
}

// Every request says the sender's level.
func TestClientSendsLevel(t *testing.T) {
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get(LevelHeader)
		WriteJSON(w, http.StatusOK, NodeStatus{Level: Level})
	}))
	defer srv.Close()
	st, err := NewClient(5*time.Second, nil).Status(t.Context(), srv.URL)
	if err != nil || st.Level != Level {
		t.Fatalf("status %+v, %v", st, err)
	}
	if h := <-got; h != strconv.Itoa(int(Level)) {
		t.Errorf("%s: %q, want %d", LevelHeader, h, Level)
	}
}
