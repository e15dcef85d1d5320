package main

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"regexp"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// How keel reports a failed command: one line on stderr, "keel: " and one
// sentence that names the flag and what to do, and exit status 1.

// checkDir makes sure dir (the value of flag) exists, creating it if
// needed, and that files can be created in it. Its error is one sentence
// naming the flag, the directory and the cause.
func checkDir(flag, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("%s %s: cannot create the directory: %s", flag, dir, cause(err))
	}
	f, err := os.CreateTemp(dir, ".keel-write-check-*")
	if err != nil {
		return fmt.Errorf("%s %s: cannot write in the directory: %s", flag, dir, cause(err))
	}
	name := f.Name()
	f.Close()
	if err := os.Remove(name); err != nil {
		return fmt.Errorf("%s %s: cannot remove a file from the directory: %s", flag, dir, cause(err))
	}
	return nil
}

// cause is the innermost reason of a file system error ("permission
// denied", "not a directory"), without the operation and path the caller
// names itself.
func cause(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// flagError makes cobra's flag errors ("unknown flag: --bogus") say where
// to look.
func flagError(c *cobra.Command, err error) error {
	return fmt.Errorf("%w (see '%s --help')", err, c.CommandPath())
}

// listenAddr finds the address a failed listen was for in an error's text
// (the upgrade package's listeners keep only the text of the cause).
var listenAddr = regexp.MustCompile(`listen (?:tcp|tcp4|tcp6|unix) (\S+): bind`)

// leadingFlag is the flag and value an error starts with ("--http
// 127.0.0.1:7002", "--nbd"), if it starts with one.
var leadingFlag = regexp.MustCompile(`^(--[a-z-]+(?: [^:\s]+(?::\d+)?)?):`)

// explain is err as keel prints it: errors with a known cause get one
// plain sentence; any other is its own text, which the commands already
// word as one.
func explain(err error) string {
	msg := err.Error()
	if errors.Is(err, syscall.EADDRINUSE) || strings.Contains(msg, "address already in use") {
		where := ""
		if m := leadingFlag.FindStringSubmatch(msg); m != nil {
			where = m[1]
		}
		addr := ""
		if m := listenAddr.FindStringSubmatch(msg); m != nil {
			addr = m[1]
		}
		switch {
		case where != "" && addr != "" && !strings.Contains(where, addr):
			where += " " + addr
		case where == "":
			where = addr
		}
		return fmt.Sprintf("%s: the address is already in use by another process; stop it or choose another port", where)
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		where := "the server"
		if m := leadingFlag.FindStringSubmatch(msg); m != nil {
			where = m[1]
		}
		return fmt.Sprintf("%s: nothing answers there (connection refused); is keel running, and is that its --http address?", where)
	}
	return msg
}

// httpErr names the member's --http address in the error of a call to
// it, when the call could not reach it (an answer from it says enough).
func httpErr(addr string, err error) error {
	var ne net.Error
	if errors.Is(err, syscall.ECONNREFUSED) || errors.As(err, &ne) {
		return fmt.Errorf("--http %s: %w", addr, err)
	}
	return err
}
