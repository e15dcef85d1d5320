package main

import (
	"fmt"
	"image/color"
	"io"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// The chart colours.
var (
	keelColors = []color.Color{
		color.RGBA{R: 0x1f, G: 0x6f, B: 0xd0, A: 0xff},
		color.RGBA{R: 0x5b, G: 0x9b, B: 0xe8, A: 0xff},
		color.RGBA{R: 0x0b, G: 0x3d, B: 0x91, A: 0xff},
		color.RGBA{R: 0x9c, G: 0xc3, B: 0xf0, A: 0xff},
	}
	peerColors = []color.Color{
		color.RGBA{R: 0xe0, G: 0x8a, B: 0x2c, A: 0xff},
		color.RGBA{R: 0x8c, G: 0x8c, B: 0x8c, A: 0xff},
		color.RGBA{R: 0x4c, G: 0xa0, B: 0x6a, A: 0xff},
		color.RGBA{R: 0xb0, G: 0x5a, B: 0x8c, A: 0xff},
	}
)

// WriteChart draws t's medians as an SVG bar chart to w: one panel per
// job (each with the scale of its own unit), one bar per target that ran
// it, the figure written above each bar.
func WriteChart(w io.Writer, t *Table) error {
	if len(t.Rows) == 0 {
		return fmt.Errorf("keelbench: chart %s: no rows", t.Name)
	}
	colors := t.colors()
	row := make([]*plot.Plot, len(t.Rows))
	for i, r := range t.Rows {
		p, err := panel(t, r, colors)
		if err != nil {
			return fmt.Errorf("keelbench: chart %s, job %s: %w", t.Name, r.Job, err)
		}
		row[i] = p
	}
	const panelW, height = 2.6 * vg.Inch, 3.6 * vg.Inch
	c := vgsvg.New(panelW*vg.Length(len(row)), height)
	drawPanels(draw.New(c), row)
	if _, err := c.WriteTo(w); err != nil {
		return fmt.Errorf("keelbench: chart %s: %w", t.Name, err)
	}
	return nil
}

// drawPanels lays the panels out in one row on dc.
func drawPanels(dc draw.Canvas, row []*plot.Plot) {
	tiles := draw.Tiles{Rows: 1, Cols: len(row), PadX: 4 * vg.Millimeter, PadTop: 2 * vg.Millimeter,
		PadBottom: 2 * vg.Millimeter, PadLeft: 2 * vg.Millimeter, PadRight: 2 * vg.Millimeter}
	cs := plot.Align([][]*plot.Plot{row}, tiles, dc)
	for i, p := range row {
		p.Draw(cs[0][i])
	}
}

// Peers are the targets that are not Keel; every other target is one of
// Keel's (keel serve, a cluster's leader or follower, the proxy).
var Peers = map[string]bool{"nbdkit": true, "qemu-nbd": true}

// colors gives each target its bar colour: Keel's in blues, each peer its
// own muted colour.
func (t *Table) colors() map[string]color.Color {
	m := map[string]color.Color{}
	k, p := 0, 0
	for _, tg := range t.Targets {
		if Peers[tg] {
			m[tg] = peerColors[p%len(peerColors)]
			p++
		} else {
			m[tg] = keelColors[k%len(keelColors)]
			k++
		}
	}
	return m
}

func panel(t *Table, r Row, colors map[string]color.Color) (*plot.Plot, error) {
	p := plot.New()
	// The title carries the ratios, so that the panel reads alone.
	p.Title.Text = r.Job
	for _, ra := range t.Ratios {
		if v, ok := RatioOf(ra, r.Median); ok {
			p.Title.Text += "\n" + ra.Head() + " " + FormatRatio(v, true)
		}
	}
	p.Title.TextStyle.Font.Size = 10
	p.Y.Label.Text = string(r.Unit) + " (median)"
	p.Y.Min = 0
	var runs []string
	for _, tg := range t.Targets {
		if _, ok := r.Rounds[tg]; ok {
			runs = append(runs, tg)
		}
	}
	// The bars share about 1.3 inches of the panel, gaps between them.
	width := min(0.6*vg.Inch, 1.3*vg.Inch/vg.Length(max(1, len(runs))))
	var names []string
	var pts plotter.XYs
	var labels []string
	top := 0.0
	for _, tg := range t.Targets {
		if _, ok := r.Rounds[tg]; !ok {
			continue
		}
		x := float64(len(names))
		names = append(names, tg)
		v, ok := r.Median(tg)
		if !ok {
			continue
		}
		b, err := plotter.NewBarChart(plotter.Values{v}, width)
		if err != nil {
			return nil, err
		}
		b.XMin = x
		b.Color = colors[tg]
		b.LineStyle.Width = 0
		p.Add(b)
		pts = append(pts, plotter.XY{X: x, Y: v})
		labels = append(labels, FormatValue(v, true, r.Unit))
		top = max(top, v)
	}
	if len(names) == 0 { // nothing ran (an interrupted run): empty slots
		names = t.Targets
	}
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.5
	p.X.Tick.Label.XAlign = draw.XRight
	if len(pts) > 0 {
		l, err := plotter.NewLabels(plotter.XYLabels{XYs: pts, Labels: labels})
		if err != nil {
			return nil, err
		}
		for i := range l.TextStyle {
			l.TextStyle[i].XAlign = draw.XCenter
			l.TextStyle[i].YAlign = draw.YBottom
		}
		p.Add(l)
	}
	p.Y.Max = top * 1.15
	if p.Y.Max == 0 {
		p.Y.Max = 1
	}
	return p, nil
}
