package faultpoint

import "testing"

func TestArm(t *testing.T) {
	tab := NewTable()
	tab.Hit("a") // not armed: nothing
	if err := tab.Arm("a", 2); err != nil {
		t.Fatal(err)
	}
	panics := 0
	for i := 0; i < 5; i++ {
		func() {
			defer func() {
				if r := recover(); r != nil {
					if p, ok := r.(Panic); !ok || p.Point != "a" {
						t.Fatalf("panic value %v", r)
					}
					panics++
				}
			}()
			tab.Hit("a")
			tab.Hit("b")
		}()
	}
	if panics != 2 || tab.Hits("a") != 2 || tab.Hits("b") != 0 {
		t.Fatalf("panics %d, hits a=%d b=%d; want 2, 2, 0", panics, tab.Hits("a"), tab.Hits("b"))
	}
	if err := tab.Arm("a", -1); err == nil {
		t.Fatal("negative count accepted")
	}
}
