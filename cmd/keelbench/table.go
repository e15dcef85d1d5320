package main

import (
	"fmt"
	"math"
	"sort"
	"strings"
)

// Table is one benchmark table: jobs (rows) by targets (columns), each cell
// measured once per round, the targets taking turns within a round.
type Table struct {
	// Name is the file stem of the table's chart ("nbd", "cluster", ...).
	Name string `json:"name"`
	// Title is the line above the table.
	Title string `json:"title"`
	// Targets are the columns, in order.
	Targets []string `json:"targets"`
	// Ratios are the ratio columns after the targets.
	Ratios []Ratio `json:"ratios"`
	// Rows are the jobs, in order.
	Rows []Row `json:"rows"`
	// Notes are lines printed under the table (extra figures, goals).
	Notes []string `json:"notes,omitempty"`
}

// Ratio is a ratio column: Num's figure over Den's (over the best of Den
// when it names several targets). Above 1, Num is faster.
type Ratio struct {
	Num string   `json:"num"`
	Den []string `json:"den"`
	// Label is the column head; default Num/Den.
	Label string `json:"label,omitempty"`
}

// Head is the column head of r.
func (r Ratio) Head() string {
	if r.Label != "" {
		return r.Label
	}
	return r.Num + "/" + strings.Join(r.Den, "|")
}

// Row is one job: its unit and each target's figure in each round.
type Row struct {
	Job  string `json:"job"`
	Unit Unit   `json:"unit"`
	// Rounds maps a target to its figure in round 1, 2, ...; nil where the
	// run failed. A target absent from the map does not run this job.
	Rounds map[string][]*float64 `json:"rounds"`
}

// Row returns the row of job, adding it if new.
func (t *Table) Row(job string, unit Unit) *Row {
	for i := range t.Rows {
		if t.Rows[i].Job == job {
			return &t.Rows[i]
		}
	}
	t.Rows = append(t.Rows, Row{Job: job, Unit: unit, Rounds: map[string][]*float64{}})
	return &t.Rows[len(t.Rows)-1]
}

// Set records target's figure in round r (0-based); ok false records a
// failed run.
func (r *Row) Set(target string, round int, v float64, ok bool) {
	vs := r.Rounds[target]
	for len(vs) <= round {
		vs = append(vs, nil)
	}
	if ok {
		vs[round] = &v
	} else {
		vs[round] = nil
	}
	r.Rounds[target] = vs
}

// NRounds is the largest number of rounds any target of the table has.
func (t *Table) NRounds() int {
	n := 0
	for _, r := range t.Rows {
		for _, vs := range r.Rounds {
			n = max(n, len(vs))
		}
	}
	return n
}

// Median is the median of the figures that exist (the mean of the middle
// two for an even count); false when there are none.
func Median(vs []*float64) (float64, bool) {
	var xs []float64
	for _, v := range vs {
		if v != nil {
			xs = append(xs, *v)
		}
	}
	if len(xs) == 0 {
		return 0, false
	}
	sort.Float64s(xs)
	m := len(xs) / 2
	if len(xs)%2 == 1 {
		return xs[m], true
	}
	return (xs[m-1] + xs[m]) / 2, true
}

// Median is target's median figure for the row.
func (r Row) Median(target string) (float64, bool) { return Median(r.Rounds[target]) }

// At is target's figure in round i.
func (r Row) At(target string, i int) (float64, bool) {
	vs := r.Rounds[target]
	if i >= len(vs) || vs[i] == nil {
		return 0, false
	}
	return *vs[i], true
}

// RatioOf computes ra from the figures get returns; false when a figure
// is missing or the denominator is zero.
func RatioOf(ra Ratio, get func(target string) (float64, bool)) (float64, bool) {
	num, ok := get(ra.Num)
	if !ok {
		return 0, false
	}
	den, found := math.Inf(-1), false
	for _, d := range ra.Den {
		if v, ok := get(d); ok {
			den, found = max(den, v), true
		}
	}
	if !found || den == 0 {
		return 0, false
	}
	return num / den, true
}

// Grid is a table as text cells: a head row and body rows.
type Grid struct {
	Head []string
	Body [][]string
}

// MedianGrid is the table of medians with the ratios between them.
func (t *Table) MedianGrid() Grid {
	g := Grid{Head: t.head()}
	for _, r := range t.Rows {
		g.Body = append(g.Body, t.line(r.Job, r, r.Median))
	}
	return g
}

// RoundsGrid is each round's figures with the ratios within that round.
func (t *Table) RoundsGrid() Grid {
	g := Grid{Head: t.head()}
	n := t.NRounds()
	for _, r := range t.Rows {
		for i := 0; i < n; i++ {
			g.Body = append(g.Body, t.line(fmt.Sprintf("%s r%d", r.Job, i+1), r,
				func(target string) (float64, bool) { return r.At(target, i) }))
		}
	}
	return g
}

func (t *Table) head() []string {
	h := append([]string{"job", "unit"}, t.Targets...)
	for _, ra := range t.Ratios {
		h = append(h, ra.Head())
	}
	return h
}

func (t *Table) line(label string, r Row, get func(string) (float64, bool)) []string {
	l := []string{label, string(r.Unit)}
	for _, tg := range t.Targets {
		v, ok := get(tg)
		l = append(l, FormatValue(v, ok, r.Unit))
	}
	for _, ra := range t.Ratios {
		v, ok := RatioOf(ra, get)
		l = append(l, FormatRatio(v, ok))
	}
	return l
}

// FormatValue prints a figure: MB/s with one decimal, IOPS whole, "-"
// when missing.
func FormatValue(v float64, ok bool, u Unit) string {
	switch {
	case !ok:
		return "-"
	case u == UnitMBps:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

// FormatRatio prints a ratio with two decimals, "-" when missing.
func FormatRatio(v float64, ok bool) string {
	if !ok {
		return "-"
	}
	return fmt.Sprintf("%.2f", v)
}

// Text renders g aligned for a terminal: the first two columns left, the
// others right, two spaces apart, each line indented by indent.
func (g Grid) Text(indent string) string {
	rows := append([][]string{g.Head}, g.Body...)
	w := make([]int, len(g.Head))
	for _, r := range rows {
		for i, c := range r {
			w[i] = max(w[i], len(c))
		}
	}
	var b strings.Builder
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			if i < 2 {
				cells[i] = c + strings.Repeat(" ", w[i]-len(c))
			} else {
				cells[i] = strings.Repeat(" ", w[i]-len(c)) + c
			}
		}
		b.WriteString(strings.TrimRight(indent+strings.Join(cells, "  "), " ") + "\n")
	}
	return b.String()
}

// Markdown renders g as a GitHub table, figures right-aligned.
func (g Grid) Markdown() string {
	var b strings.Builder
	b.WriteString("| " + strings.Join(g.Head, " | ") + " |\n|")
	for i := range g.Head {
		if i < 2 {
			b.WriteString(" --- |")
		} else {
			b.WriteString(" ---: |")
		}
	}
	b.WriteString("\n")
	for _, r := range g.Body {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	return b.String()
}
