// Package confinetest has the confinement layer's helpers for tests.
package confinetest

import (
	"testing"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// HostRoot is the whole host as a confined root, so that a test's host
// paths (its temporary directories) serve as paths in it. It is closed
// when the test ends.
func HostRoot(t testing.TB) *confine.Root {
	t.Helper()
	r, err := confine.Open("/")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}
