package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// ErrFioOutput is returned for fio output that holds no usable job.
var ErrFioOutput = errors.New("keelbench: unusable fio output")

// FioResult is what one fio job measured, from its --output-format=json.
type FioResult struct {
	// Dir is "read" or "write": the direction that moved bytes.
	Dir string `json:"dir"`
	// MBps is bandwidth in MB/s (10^6 bytes per second).
	MBps float64 `json:"mbps"`
	// IOPS is operations per second.
	IOPS float64 `json:"iops"`
	// ClatP50Ms and ClatP99Ms are completion latency percentiles in ms
	// (0 when fio reported none).
	ClatP50Ms float64 `json:"clat_p50_ms"`
	ClatP99Ms float64 `json:"clat_p99_ms"`
	// Error is fio's error number for the job (0: none).
	Error int `json:"error"`
}

// Value is the figure a job is reported in: MB/s or IOPS.
func (r FioResult) Value(u Unit) float64 {
	if u == UnitMBps {
		return r.MBps
	}
	return r.IOPS
}

// String is the one-line progress form.
func (r FioResult) String() string {
	return fmt.Sprintf("%.1f MB/s  %.0f IOPS  clat p50 %.2f ms p99 %.2f ms  error %d",
		r.MBps, r.IOPS, r.ClatP50Ms, r.ClatP99Ms, r.Error)
}

type fioDir struct {
	IOBytes int64   `json:"io_bytes"`
	BWBytes float64 `json:"bw_bytes"`
	IOPS    float64 `json:"iops"`
	ClatNs  fioLat  `json:"clat_ns"`
}

type fioLat struct {
	Percentile map[string]float64 `json:"percentile"`
}

type fioOutput struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  fioDir `json:"read"`
		Write fioDir `json:"write"`
	} `json:"jobs"`
}

// ParseFio reads the first job of fio's JSON output. fio may print
// diagnostics before the JSON document; they are skipped.
func ParseFio(out []byte) (FioResult, error) {
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		return FioResult{}, fmt.Errorf("%w: no JSON object", ErrFioOutput)
	}
	var o fioOutput
	if err := json.NewDecoder(bytes.NewReader(out[i:])).Decode(&o); err != nil {
		return FioResult{}, fmt.Errorf("%w: %w", ErrFioOutput, err)
	}
	if len(o.Jobs) == 0 {
		return FioResult{}, fmt.Errorf("%w: no jobs", ErrFioOutput)
	}
	j := o.Jobs[0]
	d, dir := j.Read, "read"
	if d.IOBytes == 0 {
		d, dir = j.Write, "write"
	}
	return FioResult{
		Dir: dir, MBps: d.BWBytes / 1e6, IOPS: d.IOPS,
		ClatP50Ms: percentile(d.ClatNs, 50) / 1e6, ClatP99Ms: percentile(d.ClatNs, 99) / 1e6,
		Error: j.Error,
	}, nil
}

// percentile finds fio's "50.000000"-style key for p.
func percentile(l fioLat, p float64) float64 {
	return l.Percentile[strconv.FormatFloat(p, 'f', 6, 64)]
}
