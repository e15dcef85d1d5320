package main

import (
	"bytes"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// With --syslog, each line at or above --log-level goes to syslog at its
// level's priority under the facility, and to stderr as before.
func TestSyslogLines(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var stderr bytes.Buffer
	g := &globalFlags{logLevel: "info", syslog: true, syslogFacility: "local3", syslogAddr: "udp:" + pc.LocalAddr().String()}
	l, err := g.loggerTo("keel", &stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer g.closeSyslog()
	l.Debug("below the level")
	l.Named("replica").With("node", "n1").Warn("a warning", "k", 7)
	l.Error("an error")

	// <PRI> is facility*8 + severity: local3 is 19, warning 4, error 3.
	for _, want := range []struct{ pri, text string }{{"<156>", "[WARN]  keel.replica: a warning: node=n1 k=7"}, {"<155>", "[ERROR] keel: an error"}} {
		_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("waiting for the syslog line %q: %v", want.text, err)
		}
		got := string(buf[:n])
		if !strings.HasPrefix(got, want.pri) || !strings.Contains(got, want.text) {
			t.Errorf("syslog got %q, want priority %s and %q", got, want.pri, want.text)
		}
	}
	if s := stderr.String(); strings.Contains(s, "below the level") || !strings.Contains(s, "a warning") || !strings.Contains(s, "an error") {
		t.Errorf("stderr:\n%s", s)
	}
}

func TestLogFlagsRefused(t *testing.T) {
	for _, g := range []*globalFlags{
		{logLevel: "loud"},
		{logLevel: "info", syslog: true, syslogFacility: "LOCAL9"},
		{logLevel: "info", syslog: true, syslogFacility: "LOCAL0", syslogAddr: "127.0.0.1:514"},
		{logLevel: "info", syslogAddr: "udp:127.0.0.1:514"},
	} {
		if _, err := g.loggerTo("keel", &bytes.Buffer{}); !errors.Is(err, errBadLogFlag) {
			t.Errorf("%+v: %v, want errBadLogFlag", g, err)
		}
	}
}
