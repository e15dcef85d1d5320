// Command crashchild is a broken keel for the upgrade tests: started by an
// upgrade (installed in place of the keel binary), it says READY like a
// good child and dies as soon as the parent starts handing over, so the
// parent must take back every connection it had quiesced.
package main

import (
	"fmt"
	"os"

	"github.com/keelstore/keel/upgrade"
)

func main() {
	u, err := upgrade.New(upgrade.Config{Version: "crashchild"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "crashchild:", err)
		os.Exit(2)
	}
	err = u.TakeOver(func([]byte) error {
		fmt.Fprintln(os.Stderr, "crashchild: crashing right after ready")
		os.Exit(3)
		return nil
	}, func(_ []byte, f *os.File) error { return f.Close() })
	fmt.Fprintln(os.Stderr, "crashchild: no handover:", err)
	os.Exit(4)
}
