package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of /proc's CPU times (100 on Linux).
const clockTicks = 100

// CPUSnap is the machine's CPU time and some processes' at one moment.
type CPUSnap struct {
	Total, Idle uint64            // machine jiffies, all CPUs
	Procs       map[string]uint64 // name -> utime+stime jiffies
}

// ParseMachineStat reads the "cpu" line of /proc/stat: total and idle
// (idle+iowait) jiffies.
func ParseMachineStat(stat string) (total, idle uint64, err error) {
	line, _, _ := strings.Cut(stat, "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("keelbench: /proc/stat: unexpected first line %q", line)
	}
	var v [8]uint64
	for i := range v {
		if v[i], err = strconv.ParseUint(f[1+i], 10, 64); err != nil {
			return 0, 0, fmt.Errorf("keelbench: /proc/stat: %w", err)
		}
		total += v[i]
	}
	return total, v[3] + v[4], nil
}

// ParseProcStat reads utime+stime from a /proc/PID/stat line (the command
// name in parentheses may hold spaces).
func ParseProcStat(stat string) (uint64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("keelbench: /proc/PID/stat: no ')' in %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("keelbench: /proc/PID/stat: %d fields after the name", len(f))
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("keelbench: /proc/PID/stat: utime %q stime %q", f[11], f[12])
	}
	return u + s, nil
}

// Mem is a process's memory from /proc/PID/status, in bytes.
type Mem struct {
	VmRSS, VmHWM, RssAnon, RssFile int64
}

// ParseStatus reads the memory lines of /proc/PID/status.
func ParseStatus(status string) Mem {
	var m Mem
	for _, l := range strings.Split(status, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		n *= 1024 // kB
		switch k {
		case "VmRSS":
			m.VmRSS = n
		case "VmHWM":
			m.VmHWM = n
		case "RssAnon":
			m.RssAnon = n
		case "RssFile":
			m.RssFile = n
		}
	}
	return m
}

// CPUUse is what a span between two snapshots cost.
type CPUUse struct {
	// Procs is each process's CPU in % of one core.
	Procs map[string]float64
	// Machine is the whole machine's busy CPU in % of one core (of
	// 100 x CPUs), other people's work included.
	Machine float64
}

// CPUBetween is the CPU used from a to b on a machine of ncpu CPUs.
func CPUBetween(a, b CPUSnap, ncpu int) CPUUse {
	u := CPUUse{Procs: map[string]float64{}}
	total := float64(b.Total - a.Total)
	if total <= 0 {
		return u
	}
	u.Machine = 100 * float64(ncpu) * (total - float64(b.Idle-a.Idle)) / total
	wall := total / clockTicks / float64(ncpu) // seconds
	for n, v := range b.Procs {
		if before, ok := a.Procs[n]; ok {
			u.Procs[n] = 100 * float64(v-before) / clockTicks / wall
		}
	}
	return u
}

// ReadCPU snapshots the machine and procs (name -> pid); a process that
// is gone is left out.
func ReadCPU(procs map[string]int) (CPUSnap, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPUSnap{}, fmt.Errorf("keelbench: %w", err)
	}
	s := CPUSnap{Procs: map[string]uint64{}}
	if s.Total, s.Idle, err = ParseMachineStat(string(data)); err != nil {
		return CPUSnap{}, err
	}
	for name, pid := range procs {
		st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue
		}
		if v, err := ParseProcStat(string(st)); err == nil {
			s.Procs[name] = v
		}
	}
	return s, nil
}

// ReadMem reads pid's memory.
func ReadMem(pid int) (Mem, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return Mem{}, fmt.Errorf("keelbench: %w", err)
	}
	return ParseStatus(string(data)), nil
}

// CPUSecondsPerGiB is what a process at pct % of one core spends per GiB
// when the job moves mbps MB/s (10^6 bytes): pct/100 CPU-seconds each
// second over mbps*10^6/2^30 GiB each second. 0 when nothing moved.
func CPUSecondsPerGiB(pct, mbps float64) float64 {
	if mbps <= 0 {
		return 0
	}
	return (pct / 100) / (mbps * 1e6 / (1 << 30))
}
