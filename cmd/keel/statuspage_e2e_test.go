// The status page end-to-end test: a real headless chromium (Debian's
// package; scripts/test installs it when missing) driven through the
// DevTools protocol (chromedp) loads the pages that `keel server` and
// `keel proxy` serve on --http, waits until they show the cluster and the
// charts of what was written, saves screenshots, and, after the leader is
// killed with SIGKILL, waits until a surviving node's page names the new
// leader.

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/keelstore/keel/cmd/keel/keeltest"
)

const (
	browserStartTimeout = 30 * time.Second // exec to a tab that answers
	pageTimeout         = 30 * time.Second // for a page to show what it owes us
)

// startBrowser starts a headless chromium for the test, stopped (and
// waited for) by the test's cleanup; each page opened on the returned
// context is a tab of it. A missing chromium fails the test
// (scripts/test installs it).
func startBrowser(t *testing.T) context.Context {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium is not installed (Debian package chromium; scripts/test installs it): %v", err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.Flag("headless", "new"),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.WindowSize(1280, 1000),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() {
		if err := chromedp.Cancel(ctx); err != nil {
			t.Logf("stopping chromium: %v", err)
		}
		cancel()
		cancelAlloc()
	})
	// The first action starts the browser, which lives as long as ctx;
	// only this wait has a deadline.
	started := make(chan error, 1)
	go func() { started <- chromedp.Do(ctx) }()
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("starting chromium: %v", err)
		}
	case <-time.After(browserStartTimeout):
		t.Fatalf("chromium did not start within %v", browserStartTimeout)
	}
	return ctx
}

// statusPage is one page in a tab of the test's browser.
type statusPage struct {
	t    *testing.T
	name string
	url  string
	ctx  context.Context
}

// openPage opens url (an --http address's page) in a new tab.
func openPage(t *testing.T, browser context.Context, name, addr string) *statusPage {
	t.Helper()
	ctx, cancel := chromedp.NewContext(browser)
	t.Cleanup(cancel)
	// The tab's first action opens it, and the tab lives as long as the
	// context of that action: this one has no deadline of its own.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("%s: opening a tab: %v", name, err)
	}
	p := &statusPage{t: t, name: name, url: "http://" + addr + "/", ctx: ctx}
	if _, err := within(p, pageTimeout, chromedp.Navigate(p.url)); err != nil {
		t.Fatalf("%s: opening %s: %v", name, p.url, err)
	}
	return p
}

// within runs the action in the page's tab, giving up after d.
func within[T any](p *statusPage, d time.Duration, a chromedp.Action[T]) (T, error) {
	ctx, cancel := context.WithTimeout(p.ctx, d)
	defer cancel()
	return chromedp.Run(ctx, a)
}

// wait polls the JavaScript expression cond in the page until it is
// true, failing the test with the page's text after pageTimeout.
func (p *statusPage) wait(what, cond string) {
	p.t.Helper()
	start := time.Now()
	_, err := within(p, pageTimeout+5*time.Second, chromedp.Poll[bool](cond,
		chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(pageTimeout)))
	if err != nil {
		text, terr := within(p, 5*time.Second, chromedp.Evaluate[string](`document.body.innerText`))
		if terr != nil {
			text = "(unreadable: " + terr.Error() + ")"
		}
		p.t.Fatalf("%s (%s) did not show %s within %v: %v\npage text:\n%s", p.name, p.url, what, pageTimeout, err, text)
	}
	p.t.Logf("%s shows %s after %v", p.name, what, time.Since(start).Round(time.Millisecond))
}

// number is the value of a JavaScript expression in the page.
func (p *statusPage) number(expr string) float64 {
	p.t.Helper()
	v, err := within(p, 5*time.Second, chromedp.Evaluate[float64](expr))
	if err != nil {
		p.t.Fatalf("%s: %s: %v", p.name, expr, err)
	}
	return v
}

// text is the text of the element with the given id.
func (p *statusPage) text(id string) string {
	p.t.Helper()
	s, err := within(p, 5*time.Second, chromedp.Evaluate[string](fmt.Sprintf(`document.getElementById(%s).textContent`, jsString(id))))
	if err != nil {
		p.t.Fatalf("%s: reading #%s: %v", p.name, id, err)
	}
	return s
}

// screenshot saves the whole page as a PNG in the test's directory, and
// in KEEL_STATUS_SCREENSHOTS (a directory) when that is set, and returns
// its path.
func (p *statusPage) screenshot(file string) string {
	p.t.Helper()
	png, err := within(p, pageTimeout, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Fatalf("%s: screenshot: %v", p.name, err)
	}
	path := filepath.Join(p.t.TempDir(), file)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		p.t.Fatal(err)
	}
	if dir := os.Getenv("KEEL_STATUS_SCREENSHOTS"); dir != "" {
		if err := os.WriteFile(filepath.Join(dir, file), png, 0o644); err != nil {
			p.t.Fatal(err)
		}
	}
	p.t.Logf("%s: screenshot %s (%d bytes)", p.name, path, len(png))
	return path
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// charted is a JavaScript condition: the chart with the given id draws the
// series label with a value above zero somewhere in its window.
func charted(chart, label string) string {
	return fmt.Sprintf(`+(document.querySelector('#%s polyline[data-series=%s]')?.dataset.max ?? 0) > 0`, chart, jsString(label))
}

// pageView is what a page shows of the cluster's leadership.
type pageView struct {
	Leader      string   `json:"leader"`      // the text of #leader
	Links       []string `json:"links"`       // the links of the member table's caption (the leader's page)
	Unreachable []string `json:"unreachable"` // the member rows marked unreachable
}

func (p *statusPage) view() pageView {
	p.t.Helper()
	v, err := within(p, 5*time.Second, chromedp.Evaluate[pageView](`({
		leader: document.getElementById('leader').textContent,
		links: [...document.querySelectorAll('#view a')].map(a => a.href),
		unreachable: [...document.querySelectorAll('#members tr')].filter(r => r.textContent.includes('unreachable')).map(r => r.dataset.id),
	})`))
	if err != nil {
		p.t.Fatalf("%s: reading what it shows: %v", p.name, err)
	}
	return v
}

// clusterLeader is the running node that says it leads, at the highest
// term; nil while none does.
func clusterLeader(t *testing.T, c *keeltest.TCluster) *keeltest.Node {
	var lead *keeltest.Node
	var term uint64
	for id, st := range c.Statuses(t.Context()) {
		if st.State == "Leader" && st.Term >= term {
			lead, term = c.Node(id), st.Term
		}
	}
	return lead
}

// waitShowsLeader waits until the page names the node the cluster has as
// leader now (which a loaded machine may change at any moment, so the two
// are compared at each poll), and ok accepts the rest of what it shows;
// it returns that leader.
func waitShowsLeader(t *testing.T, c *keeltest.TCluster, p *statusPage, what string, ok func(lead *keeltest.Node, v pageView) bool) *keeltest.Node {
	t.Helper()
	var lead *keeltest.Node
	start := time.Now()
	keeltest.MustPoll(t, pageTimeout, p.name+" showing "+what, func() (bool, string) {
		lead = clusterLeader(t, c)
		v := p.view()
		state := fmt.Sprintf("the page shows %+v; the cluster's leader is %v", v, lead)
		return lead != nil && v.Leader == lead.ID && (ok == nil || ok(lead, v)), state
	})
	t.Logf("%s shows %s (%s) after %v", p.name, what, lead.ID, time.Since(start).Round(time.Millisecond))
	return lead
}

func TestStatusPageInBrowser(t *testing.T) {
	browser := startBrowser(t)
	c := newCluster(t, "64M", 3, fastFailover...)
	px := startProxy(t, c, "vm1", "--cache", "8M")
	lead := c.MustLeader()

	// Data through the proxy: writes (committed through the leader's
	// API) and reads, twice (the second read from the proxy's cache).
	mustQemuIO(t, px.URI(), "write -P 0xa5 0 4M", "read -P 0xa5 0 4M", "read -P 0xa5 0 4M")

	leaderPage := openPage(t, browser, "the leader's page", lead.HTTP)
	waitShowsLeader(t, c, leaderPage, "the leader", nil)
	leaderPage.wait("three members", `document.querySelectorAll('#members tr').length === 3`)
	leaderPage.wait("the proxy as writer", `document.getElementById('writer').textContent.startsWith('vm1')`)
	leaderPage.wait("the writes in its charts", charted("chart-ops", "writes/s")+" && "+charted("chart-bytes", "write MB/s")+" && "+charted("chart-latency", "write p99"))
	// The charts update live: more rounds of writes, each waited for
	// until the open page has drawn a newer sample.
	for round := range 4 {
		n := leaderPage.number(`+document.body.dataset.samples`)
		mustQemuIO(t, px.URI(), fmt.Sprintf("write -P 0x%02x %dM %dM", 0xb0+round, 8+4*round, 1+round), fmt.Sprintf("read 0 %dM", 2+round))
		leaderPage.wait(fmt.Sprintf("a sample after the %d. round", round+1), fmt.Sprintf(`+document.body.dataset.samples > %v`, n))
	}
	leaderPage.screenshot("status-page.png")

	proxyPage := openPage(t, browser, "the proxy's page", px.HTTP)
	waitShowsLeader(t, c, proxyPage, "the leader it follows", nil)
	proxyPage.wait("its epoch", `/^[0-9]/.test(document.getElementById('epoch').textContent)`)
	proxyPage.wait("its reads and writes in its charts", charted("chart-ops", "reads/s")+" && "+charted("chart-ops", "writes/s")+" && "+charted("chart-hits", "hits"))
	proxyPage.screenshot("status-page-proxy.png")

	survivor := c.Followers(c.MustLeader())[0]
	followerPage := openPage(t, browser, "a follower's page", survivor.HTTP)
	waitShowsLeader(t, c, followerPage, "the leader and a link to its page", func(lead *keeltest.Node, v pageView) bool {
		return lead == survivor || slices.Contains(v.Links, "http://"+lead.HTTP+"/")
	})

	old := c.MustLeader()
	if old == survivor { // leadership moved meanwhile: watch another survivor
		survivor = c.Followers(old)[0]
		followerPage = openPage(t, browser, "a follower's page", survivor.HTTP)
	}
	c.MustKill(old)
	// The page is not reloaded: it polls, and must follow by itself.
	next := waitShowsLeader(t, c, followerPage, "a new leader, and the old one unreachable", func(lead *keeltest.Node, v pageView) bool {
		return lead != old && slices.Contains(v.Unreachable, old.ID)
	})
	if next == old {
		t.Fatalf("the killed node %s is still the leader", old.ID)
	}
	followerPage.screenshot("status-page-after-failover.png")
	waitShowsLeader(t, c, proxyPage, "the new leader it follows", func(lead *keeltest.Node, v pageView) bool { return lead != old })
}
