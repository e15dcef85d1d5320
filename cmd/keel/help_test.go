package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Every command has a short description and an example, and every flag
// (its own and inherited) a usage line; each example names its command.
func TestEveryCommandAndFlagHasHelp(t *testing.T) {
	var walk func(c *cobra.Command)
	seen := 0
	walk = func(c *cobra.Command) {
		seen++
		path := c.CommandPath()
		if c.Short == "" {
			t.Errorf("%s: no Short description", path)
		}
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("%s: no Example", path)
		} else if c.Runnable() && !strings.Contains(c.Example, path) {
			t.Errorf("%s: Example does not run %q:\n%s", path, path, c.Example)
		}
		c.LocalFlags().VisitAll(func(f *pflag.Flag) {
			if strings.TrimSpace(f.Usage) == "" {
				t.Errorf("%s --%s: no usage", path, f.Name)
			}
		})
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRoot())
	if seen < 12 {
		t.Errorf("walked %d commands; the tree lost some", seen)
	}
}

// `keel CMD --help` shows the example.
func TestHelpShowsExamples(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"server", "--help"}, {"cluster", "status", "--help"}, {"verify", "--help"}} {
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(args)
		if err := root.Execute(); err != nil {
			t.Fatalf("keel %v: %v", args, err)
		}
		if !strings.Contains(out.String(), "Examples:") {
			t.Errorf("keel %s shows no examples:\n%s", strings.Join(args, " "), out.String())
		}
	}
}
