// Package keel_test holds the test that enforces the dependency rules of
// DESIGN.md ("Dependencies point downwards"). The repository root has no
// code of its own; this file is only a test.
package keel_test

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/keelstore/keel"

// pkg is what `go list -json` says of one package: its production imports
// (direct and transitive; test files not included).
type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", "./...")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(out)
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("go list: %v", err)
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages; is the test running at the module root?", len(pkgs))
	}
	return pkgs
}

// rel is a package path relative to the module ("nbd", "services/proxy");
// "" for packages outside it.
func rel(path string) string {
	if path == module {
		return "."
	}
	if r, ok := strings.CutPrefix(path, module+"/"); ok {
		return r
	}
	return ""
}

func under(r, dir string) bool { return r == dir || strings.HasPrefix(r, dir+"/") }

// isTestHarness: packages that exist for tests and tools only (chaos, and
// the benchmark driver, which runs its children through keeltest).
func isTestHarness(r string) bool {
	last := r[strings.LastIndex(r, "/")+1:]
	return strings.HasSuffix(last, "test") || under(r, "chaos") || under(r, "cmd/keelbench")
}

// rule is one dependency rule: packages matched by from may not depend on
// packages matched by forbid (paths relative to the module).
type rule struct {
	name   string
	from   func(r string) bool
	forbid func(dep string) bool
}

var rules = []rule{
	{"nbd imports nothing of Keel's", func(r string) bool { return under(r, "nbd") && !isTestHarness(r) },
		func(d string) bool { return !under(d, "nbd") }},
	{"upgrade imports nothing of Keel's", func(r string) bool {
		return under(r, "upgrade") && !isTestHarness(r) && !under(r, "upgrade/upgradetest")
	},
		func(d string) bool { return !under(d, "upgrade") }},
	{"keeltls imports nothing of Keel's", func(r string) bool { return under(r, "services/keeltls") },
		func(d string) bool { return !under(d, "services/keeltls") }},
	{"statuspage imports nothing of Keel's but nbd", func(r string) bool { return under(r, "services/statuspage") },
		func(d string) bool { return !under(d, "services/statuspage") && !under(d, "nbd") }},
	{"nbdmetrics imports nothing of Keel's but nbd", func(r string) bool { return under(r, "services/nbdmetrics") },
		func(d string) bool { return !under(d, "services/nbdmetrics") && !under(d, "nbd") }},
	{"supervise imports nothing of Keel's", func(r string) bool { return under(r, "supervise") },
		func(d string) bool { return !under(d, "supervise") }},
	{"replica imports nothing of services, upgrade, cmd or chaos", func(r string) bool { return under(r, "replica") && !isTestHarness(r) },
		func(d string) bool {
			return under(d, "services") || under(d, "upgrade") || under(d, "cmd") || under(d, "chaos")
		}},
	{"services import nothing of cmd or chaos", func(r string) bool { return under(r, "services") && !isTestHarness(r) },
		func(d string) bool { return under(d, "cmd") || under(d, "chaos") }},
	{"the server does not import the proxy", func(r string) bool { return under(r, "services/server") },
		func(d string) bool { return under(d, "services/proxy") }},
	{"the proxy does not import the server", func(r string) bool { return under(r, "services/proxy") },
		func(d string) bool { return under(d, "services/server") }},
	{"wire (spoken by both) imports neither side", func(r string) bool { return under(r, "services/wire") },
		func(d string) bool { return under(d, "services") && !under(d, "services/wire") }},
	{"production code never imports chaos or a test harness", func(r string) bool { return !isTestHarness(r) },
		isTestHarness},
}

// violations returns one line per production dependency that breaks a rule.
func violations(pkgs []pkg) (out []string, edges int) {
	for _, p := range pkgs {
		from := rel(p.ImportPath)
		if from == "" {
			continue
		}
		for _, d := range p.Deps {
			dep := rel(d)
			if dep == "" || dep == from {
				continue
			}
			edges++
			for _, r := range rules {
				if r.from(from) && r.forbid(dep) {
					out = append(out, r.name+": "+from+" depends on "+dep)
				}
			}
		}
	}
	return out, edges
}

// TestDependencyRules checks every production dependency (direct and
// transitive) of every package of the module. Test files may import
// anything.
func TestDependencyRules(t *testing.T) {
	bad, edges := violations(listPackages(t))
	if edges == 0 {
		t.Fatal("no dependencies between Keel's packages were seen")
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// TestDependencyRulesCatch: each kind of forbidden dependency is reported.
func TestDependencyRulesCatch(t *testing.T) {
	for _, tc := range []struct{ from, dep string }{
		{"nbd", "replica/rawimage"},
		{"replica", "services/wire"},
		{"services/proxy", "services/server"},
		{"services/server", "chaos/stall"},
		{"cmd/keel", "cmd/keel/keeltest"},
		{"supervise", "nbd"},
		{"upgrade", "nbd"},
	} {
		bad, _ := violations([]pkg{{ImportPath: module + "/" + tc.from, Deps: []string{module + "/" + tc.dep, "fmt"}}})
		if len(bad) == 0 {
			t.Errorf("%s depending on %s was not reported", tc.from, tc.dep)
		}
	}
	if bad, _ := violations([]pkg{{ImportPath: module + "/services/proxy", Deps: []string{module + "/nbd", module + "/services/wire"}}}); len(bad) != 0 {
		t.Errorf("allowed dependencies reported: %v", bad)
	}
}
