// Package rootfstest has helpers for the tests of what builds a rootfs
// (the image pull, debootstrap).
package rootfstest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// MachinesDir is a fresh stand-in for /var/lib/machines.
func MachinesDir(t testing.TB) string {
	t.Helper()
	d := filepath.Join(t.TempDir(), "machines")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

// AssertOnly checks that parent holds exactly the names want: a failed
// build left no staging directory behind and did not touch its
// destination.
func AssertOnly(t testing.TB, parent string, want ...string) {
	t.Helper()
	ents, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("%s holds %q, want %q (staging not removed or dest touched)", parent, got, want)
	}
}
