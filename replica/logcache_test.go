package replica_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
)

var errInjected = errors.New("injected store failure")

// flakyStore is raft's InmemStore, the reference for a log store's
// semantics, that can be told to fail its next StoreLogs after storing
// only the first part of the batch, or its next DeleteRange after deleting
// only the first part of the range.
type flakyStore struct {
	*raft.InmemStore
	failStore  int // >0: the next StoreLogs stores this many entries less one, then fails
	failDelete int // >0: the next DeleteRange deletes this many entries less one, then fails
}

func (s *flakyStore) StoreLogs(logs []*raft.Log) error {
	if s.failStore > 0 {
		n := min(s.failStore-1, len(logs))
		s.failStore = 0
		if err := s.InmemStore.StoreLogs(logs[:n]); err != nil {
			return err
		}
		return errInjected
	}
	return s.InmemStore.StoreLogs(logs)
}

func (s *flakyStore) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }

func (s *flakyStore) DeleteRange(lo, hi uint64) error {
	if s.failDelete > 0 {
		n := uint64(s.failDelete - 1)
		s.failDelete = 0
		if n > 0 && lo+n-1 <= hi {
			if err := s.InmemStore.DeleteRange(lo, lo+n-1); err != nil {
				return err
			}
		}
		return errInjected
	}
	return s.InmemStore.DeleteRange(lo, hi)
}

func entry(index, term uint64, size int) *raft.Log {
	data := bytes.Repeat([]byte{byte(index), byte(term)}, size/2+1)[:size]
	return &raft.Log{Index: index, Term: term, Type: raft.LogCommand, Data: data}
}

// sameAsStore fails unless the cache answers every index around the
// store's range exactly as the store beneath it does.
func sameAsStore(t testing.TB, c *replica.LogCache, s raft.LogStore, step string) {
	t.Helper()
	cf, _ := c.FirstIndex()
	sf, _ := s.FirstIndex()
	cl, _ := c.LastIndex()
	sl, _ := s.LastIndex()
	if cf != sf || cl != sl {
		t.Fatalf("%s: cache says [%d, %d], store [%d, %d]", step, cf, cl, sf, sl)
	}
	lo := uint64(0)
	if sf > 3 {
		lo = sf - 3
	}
	for i := lo; i <= sl+3; i++ {
		var got, want raft.Log
		gerr, werr := c.GetLog(i, &got), s.GetLog(i, &want)
		if (gerr == nil) != (werr == nil) || !errors.Is(gerr, werr) {
			t.Fatalf("%s: GetLog(%d): cache %v, store %v", step, i, gerr, werr)
		}
		if gerr == nil && (got.Index != want.Index || got.Term != want.Term || !bytes.Equal(got.Data, want.Data)) {
			t.Fatalf("%s: GetLog(%d): cache has index %d term %d (%d bytes), store index %d term %d (%d bytes)",
				step, i, got.Index, got.Term, len(got.Data), want.Index, want.Term, len(want.Data))
		}
	}
}

// runOps drives a cache of budget bytes over a flaky InmemStore with the
// operations ops encodes, three bytes each, and checks after every one that
// the cache agrees with the store. It returns the cache's stats.
func runOps(t testing.TB, ops []byte, budget int64) replica.LogCacheStats {
	store := &flakyStore{InmemStore: raft.NewInmemStore()}
	c := replica.NewLogCache(store, budget)
	term := uint64(1)
	for len(ops) >= 3 {
		op, a, b := ops[0]%6, int(ops[1]), int(ops[2])
		ops = ops[3:]
		first, _ := store.FirstIndex()
		last, _ := store.LastIndex()
		size := b * 64 // up to 16 KiB against budgets of a few entries
		var step string
		switch op {
		case 0, 1: // append 1..8 entries after the last (the leader, a follower in step)
			n := a%8 + 1
			batch := make([]*raft.Log, n)
			for i := range batch {
				batch[i] = entry(last+1+uint64(i), term, size)
			}
			step = fmt.Sprintf("append %d at %d", n, last+1)
			if err := c.StoreLogs(batch); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
		case 2: // a follower's conflicting suffix: delete from k, store a new term from k
			if last == 0 {
				continue
			}
			k := first + uint64(a)%(last-first+1)
			term++
			step = fmt.Sprintf("truncate from %d, term %d", k, term)
			if err := c.DeleteRange(k, last); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			sameAsStore(t, c, store, step+" (deleted)")
			if err := c.StoreLogs([]*raft.Log{entry(k, term, size), entry(k+1, term, size)}); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
		case 3: // compaction: delete a prefix
			if last == 0 {
				continue
			}
			k := first + uint64(a)%(last-first+1)
			step = fmt.Sprintf("compact [%d, %d]", first, k)
			if err := c.DeleteRange(first, k); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
		case 4: // a StoreLogs that fails after storing part of its batch, maybe over existing entries
			at := last + 1
			if last > 0 && a%2 == 1 {
				at = first + uint64(a)%(last-first+1)
				term++
			}
			store.failStore = b%4 + 1
			batch := []*raft.Log{entry(at, term, size), entry(at+1, term, size), entry(at+2, term, size)}
			step = fmt.Sprintf("failing store of 3 at %d (stores %d)", at, store.failStore-1)
			if err := c.StoreLogs(batch); !errors.Is(err, errInjected) {
				t.Fatalf("%s: %v, want the store's error", step, err)
			}
		case 5: // a DeleteRange that fails part way
			if last == 0 {
				continue
			}
			k := first + uint64(a)%(last-first+1)
			store.failDelete = b%3 + 1
			step = fmt.Sprintf("failing delete [%d, %d]", k, last)
			if err := c.DeleteRange(k, last); !errors.Is(err, errInjected) {
				t.Fatalf("%s: %v, want the store's error", step, err)
			}
		}
		sameAsStore(t, c, store, step)
		if st := c.Stats(); st.Bytes > budget || st.Bytes < 0 {
			t.Fatalf("%s: cache holds %d bytes, budget %d", step, st.Bytes, budget)
		}
	}
	return c.Stats()
}

func TestLogCacheMatchesStore(t *testing.T) {
	// Hand-written sequences first: append, follower truncation, compaction.
	cases := map[string][]byte{
		"append":             {0, 7, 10, 0, 3, 10},
		"truncate and store": {0, 7, 10, 2, 3, 10, 0, 1, 10},
		"compact":            {0, 7, 10, 3, 4, 10, 0, 2, 10},
		"failing store":      {0, 7, 10, 4, 1, 2, 4, 0, 3, 0, 1, 10},
		"failing delete":     {0, 7, 10, 5, 2, 1, 5, 2, 2, 0, 1, 10},
		"over budget":        {0, 7, 255, 0, 7, 255, 0, 7, 0, 3, 1, 0},
	}
	for name, ops := range cases {
		t.Run(name, func(t *testing.T) { runOps(t, ops, 4*(16<<10)) })
	}
}

func TestLogCacheRandom(t *testing.T) {
	var hits uint64
	for seed := int64(1); seed <= 200; seed++ {
		r := rand.New(rand.NewSource(seed))
		ops := make([]byte, 3*(20+r.Intn(60)))
		r.Read(ops)
		st := runOps(t, ops, int64(1+r.Intn(8))*(8<<10))
		hits += st.Hits
	}
	if hits == 0 {
		t.Fatal("200 random runs and the cache answered no read")
	}
}

func FuzzLogCache(f *testing.F) {
	f.Add([]byte{0, 7, 10, 2, 3, 10, 0, 1, 10, 3, 4, 10, 4, 1, 2, 5, 2, 1})
	f.Add([]byte{0, 7, 255, 0, 7, 255, 4, 0, 3, 3, 1, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 3*200 {
			ops = ops[:3*200]
		}
		runOps(t, ops, 4*(16<<10))
	})
}

// The budget is in bytes: 1 MiB entries under a 4 MiB budget keep the
// newest three (each costs a little more than its data), and the older ones
// are read from the store.
func TestLogCacheBudgetBytes(t *testing.T) {
	store := raft.NewInmemStore()
	c := replica.NewLogCache(store, 4<<20)
	for i := uint64(1); i <= 10; i++ {
		if err := c.StoreLogs([]*raft.Log{entry(i, 1, 1<<20)}); err != nil {
			t.Fatal(err)
		}
	}
	st := c.Stats()
	if st.Entries != 3 || st.Bytes > 4<<20 || st.Evicted != 7 {
		t.Fatalf("stats %+v, want 3 entries, at most 4 MiB, 7 evicted", st)
	}
	var l raft.Log
	for i := uint64(1); i <= 10; i++ {
		if err := c.GetLog(i, &l); err != nil || l.Index != i {
			t.Fatalf("GetLog(%d): %v index %d", i, err, l.Index)
		}
	}
	if st := c.Stats(); st.Hits != 3 || st.Misses != 7 {
		t.Fatalf("stats %+v, want 3 hits (8..10) and 7 misses", st)
	}
	// A caller scribbling on the struct it got does not reach the cache.
	_ = c.GetLog(10, &l)
	l.Term = 99
	if _ = c.GetLog(10, &l); l.Term != 1 {
		t.Fatalf("term %d after a caller changed its copy, want 1", l.Term)
	}
	// An entry larger than the whole budget is stored and not kept.
	if err := c.StoreLogs([]*raft.Log{entry(11, 1, 5<<20)}); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Entries != 0 || st.Bytes != 0 {
		t.Fatalf("after a 5 MiB entry: %+v, want an empty cache", st)
	}
	sameAsStore(t, c, store, "after a 5 MiB entry")
}

// Reads run concurrently with appends and compaction: each answer is the
// entry of that index, or ErrLogNotFound once it is compacted away.
func TestLogCacheConcurrentGetLog(t *testing.T) {
	store := raft.NewInmemStore()
	c := replica.NewLogCache(store, 64<<10)
	const n = 2000
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 4)
	var reads atomic.Int64
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(r)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				last, _ := c.LastIndex()
				if last == 0 {
					continue
				}
				i := last - uint64(rng.Intn(int(min(last, 64))))
				var l raft.Log
				err := c.GetLog(i, &l)
				reads.Add(1)
				if errors.Is(err, raft.ErrLogNotFound) {
					continue
				}
				if err != nil || l.Index != i || !bytes.Equal(l.Data, entry(i, 1, 1000).Data) {
					errs <- fmt.Errorf("GetLog(%d): %v, index %d", i, err, l.Index)
					return
				}
			}
		}(r)
	}
	for i := uint64(1); i <= n; i++ {
		if err := c.StoreLogs([]*raft.Log{entry(i, 1, 1000)}); err != nil {
			t.Fatal(err)
		}
		if i%100 == 0 {
			if err := c.DeleteRange(1, i-50); err != nil {
				t.Fatal(err)
			}
		}
	}
	// On a loaded machine the readers may not have run yet: let them read
	// the last window too before stopping them.
	for deadline := time.Now().Add(10 * time.Second); reads.Load() < 2000 && time.Now().Before(deadline); {
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := c.Stats(); st.Hits == 0 {
		t.Errorf("stats %+v: no read was answered from the cache", st)
	}
}

// raft-wal is monotonic and raft must still see it through the cache.
func TestLogCacheForwardsMonotonic(t *testing.T) {
	if replica.NewLogCache(raft.NewInmemStore(), 1<<20).IsMonotonic() {
		t.Error("InmemStore is not monotonic, the cache says it is")
	}
	if !replica.NewLogCache(&raft.MockMonotonicLogStore{}, 1<<20).IsMonotonic() {
		t.Error("a monotonic store lost its IsMonotonic behind the cache")
	}
}

func TestLogCacheBytesValidate(t *testing.T) {
	for _, tc := range []struct {
		bytes int64
		ok    bool
	}{{0, true}, {-1, true}, {1 << 20, true}, {4 << 30, true}, {-2, false}, {1<<20 - 1, false}, {4<<30 + 1, false}} {
		cfg := replica.NodeConfig{ID: "n1", Dir: t.TempDir(), RaftAddr: "127.0.0.1:1", LogCacheBytes: tc.bytes}
		err := cfg.Validate()
		if (err == nil) != tc.ok || err != nil && !strings.Contains(err.Error(), "LogCacheBytes") {
			t.Errorf("LogCacheBytes %d: %v, want ok=%v and an error that names the field", tc.bytes, err, tc.ok)
		}
	}
}
