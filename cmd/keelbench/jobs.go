package main

import (
	"strconv"
	"time"
)

// Unit is what a job is reported in.
type Unit string

const (
	UnitMBps Unit = "MB/s"
	UnitIOPS Unit = "IOPS"
)

// Job is one fio job shape (ioengine=nbd, one connection).
type Job struct {
	Name  string // seq-write, ...
	RW    string // fio --rw
	BS    string // fio --bs
	Depth int    // fio --iodepth
	Unit  Unit
}

// The four jobs every suite runs (those of the old scripts/bench-nbd).
var (
	SeqWrite  = Job{"seq-write", "write", "1M", 8, UnitMBps}
	SeqRead   = Job{"seq-read", "read", "1M", 8, UnitMBps}
	RandRead  = Job{"rand-read", "randread", "4k", 32, UnitIOPS}
	RandWrite = Job{"rand-write", "randwrite", "4k", 32, UnitIOPS}

	// RandWrite1 is rand-write at queue depth 1: one write's whole latency
	// (goals suite).
	RandWrite1 = Job{"rand-write-qd1", "randwrite", "4k", 1, UnitIOPS}

	// Fill writes a whole volume once (not time based).
	Fill = Job{"fill", "write", "1M", 8, UnitMBps}
	// Warm reads a working set once, to warm caches (not time based).
	Warm = Job{"warm", "read", "1M", 8, UnitMBps}

	// RandReadCold and SeqReadCold read the whole volume, larger than the
	// proxy's cache, through a proxy started afresh (its cache empty) and
	// straight from the leader (proxy suite).
	RandReadCold = Job{"rand-read-cold", "randread", "4k", 32, UnitIOPS}
	SeqReadCold  = Job{"seq-read-cold", "read", "1M", 8, UnitMBps}
)

// StdJobs are the jobs of the nbd suite, in order.
var StdJobs = []Job{SeqWrite, SeqRead, RandRead, RandWrite}

// FioRun is one fio invocation.
type FioRun struct {
	Job     Job
	URI     string        // nbd+unix:///?socket=...
	Size    int64         // --size in bytes
	Runtime time.Duration // 0: not time based, one pass over Size
	Ramp    time.Duration // --ramp_time when time based
	Output  string        // --output file for the JSON
}

// Args are fio's arguments for r.
func (r FioRun) Args() []string {
	a := []string{
		"--name=" + r.Job.Name, "--ioengine=nbd", "--uri=" + r.URI,
		"--rw=" + r.Job.RW, "--bs=" + r.Job.BS, "--iodepth=" + strconv.Itoa(r.Job.Depth),
		"--size=" + strconv.FormatInt(r.Size, 10),
	}
	if r.Runtime > 0 {
		a = append(a, "--time_based", "--runtime="+secs(r.Runtime), "--ramp_time="+secs(r.Ramp))
	}
	return append(a, "--output-format=json", "--output="+r.Output)
}

// DiskRun is fio on a plain file with fdatasync every Sync writes: what the
// disk gives one writer that syncs like a log would (no NBD, no server).
type DiskRun struct {
	Job     Job
	File    string
	Size    int64
	Sync    int
	Runtime time.Duration
	Ramp    time.Duration
	Output  string
}

// Args are fio's arguments for r.
func (r DiskRun) Args() []string {
	return []string{
		"--name=disk-" + r.Job.Name, "--ioengine=psync", "--filename=" + r.File,
		"--rw=" + r.Job.RW, "--bs=" + r.Job.BS, "--fdatasync=" + strconv.Itoa(r.Sync),
		"--size=" + strconv.FormatInt(r.Size, 10),
		"--time_based", "--runtime=" + secs(r.Runtime), "--ramp_time=" + secs(r.Ramp),
		"--output-format=json", "--output=" + r.Output,
	}
}

// secs is d in whole seconds for fio (at least 1 when d > 0 would round to 0).
func secs(d time.Duration) string {
	s := int64(d / time.Second)
	if s == 0 && d > 0 {
		s = 1
	}
	return strconv.FormatInt(s, 10)
}

// NBDURI is the NBD URI of a unix socket.
func NBDURI(sock string) string { return "nbd+unix:///?socket=" + sock }
