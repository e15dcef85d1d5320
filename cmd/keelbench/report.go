package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Report is what one suite found: the machine, its settings, its tables
// and what looked odd. It is written as results.json and results.md, each
// table's chart beside them as NAME.svg.
type Report struct {
	Suite string `json:"suite"`
	// Header describes the machine, the tools and the settings, one line each.
	Header []string `json:"header"`
	Tables []*Table `json:"tables"`
	// Sections are further figures (CPU, memory, profile), after the tables.
	Sections []Section `json:"sections,omitempty"`
	// Odd lists what went wrong or looked wrong while running.
	Odd []string `json:"odd"`
}

// Section is a titled grid or text block of further figures.
type Section struct {
	Title string   `json:"title"`
	Grid  *Grid    `json:"grid,omitempty"`
	Lines []string `json:"lines,omitempty"`
	// Pre marks Lines as preformatted (a profile listing).
	Pre bool `json:"pre,omitempty"`
}

// MarshalJSON adds the medians and ratios to a table's JSON, so that a
// reader of results.json need not recompute them.
func (t *Table) MarshalJSON() ([]byte, error) {
	type plain Table
	type median struct {
		Job     string              `json:"job"`
		Unit    Unit                `json:"unit"`
		Targets map[string]*float64 `json:"targets"`
		Ratios  map[string]*float64 `json:"ratios"`
	}
	var ms []median
	for _, r := range t.Rows {
		m := median{Job: r.Job, Unit: r.Unit, Targets: map[string]*float64{}, Ratios: map[string]*float64{}}
		for tg := range r.Rounds {
			if v, ok := r.Median(tg); ok {
				m.Targets[tg] = &v
			} else {
				m.Targets[tg] = nil
			}
		}
		for _, ra := range t.Ratios {
			if v, ok := RatioOf(ra, r.Median); ok {
				m.Ratios[ra.Head()] = &v
			} else {
				m.Ratios[ra.Head()] = nil
			}
		}
		ms = append(ms, m)
	}
	return json.Marshal(struct {
		*plain
		Medians []median `json:"medians"`
	}{(*plain)(t), ms})
}

// MarshalJSON writes a grid as {"head": [...], "body": [[...]]}.
func (g Grid) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Head []string   `json:"head"`
		Body [][]string `json:"body"`
	}{g.Head, g.Body})
}

// Text is the report for a terminal.
func (r *Report) Text() string {
	var b strings.Builder
	for _, t := range r.Tables {
		fmt.Fprintf(&b, "%s\n", t.Title)
		b.WriteString(t.MedianGrid().Text("  "))
		if t.NRounds() > 1 {
			b.WriteString("  (median of the rounds; each round, and the ratios within it:)\n")
			b.WriteString(t.RoundsGrid().Text("  "))
		}
		for _, n := range t.Notes {
			fmt.Fprintf(&b, "  %s\n", n)
		}
		b.WriteString("\n")
	}
	for _, s := range r.Sections {
		fmt.Fprintf(&b, "%s\n", s.Title)
		if s.Grid != nil {
			b.WriteString(s.Grid.Text("  "))
		}
		for _, l := range s.Lines {
			fmt.Fprintf(&b, "  %s\n", l)
		}
		b.WriteString("\n")
	}
	b.WriteString(oddText(r.Odd))
	return b.String()
}

func oddText(odd []string) string {
	if len(odd) == 0 {
		return "odd: nothing noticed\n"
	}
	return "odd:\n  - " + strings.Join(odd, "\n  - ") + "\n"
}

// Markdown is the report as a markdown page; each table's chart is the
// image NAME.svg beside it.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# keelbench %s\n\n", r.Suite)
	for _, h := range r.Header {
		fmt.Fprintf(&b, "* %s\n", h)
	}
	for _, t := range r.Tables {
		fmt.Fprintf(&b, "\n## %s\n\n", t.Title)
		if len(t.Rows) > 0 {
			fmt.Fprintf(&b, "![%s](%s.svg)\n\n", t.Name, t.Name)
		}
		b.WriteString("Medians of the rounds:\n\n")
		b.WriteString(t.MedianGrid().Markdown())
		if t.NRounds() > 1 {
			b.WriteString("\nEach round, and the ratios within it:\n\n")
			b.WriteString(t.RoundsGrid().Markdown())
		}
		if len(t.Notes) > 0 {
			b.WriteString("\n")
			for _, n := range t.Notes {
				fmt.Fprintf(&b, "* %s\n", n)
			}
		}
	}
	for _, s := range r.Sections {
		fmt.Fprintf(&b, "\n## %s\n\n", s.Title)
		if s.Grid != nil {
			b.WriteString(s.Grid.Markdown())
		}
		switch {
		case s.Pre && len(s.Lines) > 0:
			b.WriteString("```\n" + strings.Join(s.Lines, "\n") + "\n```\n")
		default:
			for _, l := range s.Lines {
				fmt.Fprintf(&b, "* %s\n", l)
			}
		}
	}
	b.WriteString("\n## Odd\n\n")
	if len(r.Odd) == 0 {
		b.WriteString("Nothing noticed.\n")
	}
	for _, o := range r.Odd {
		fmt.Fprintf(&b, "* %s\n", o)
	}
	return b.String()
}

// WriteDir writes results.json, results.md and one NAME.svg per table
// into dir (which must exist).
func (r *Report) WriteDir(dir string) error {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("keelbench: results.json: %w", err)
	}
	files := map[string][]byte{
		"results.json": append(js, '\n'),
		"results.md":   []byte(r.Markdown()),
	}
	for _, t := range r.Tables {
		if len(t.Rows) == 0 {
			continue
		}
		var buf bytes.Buffer
		if err := WriteChart(&buf, t); err != nil {
			return err
		}
		files[t.Name+".svg"] = buf.Bytes()
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return fmt.Errorf("keelbench: %w", err)
		}
	}
	return nil
}
