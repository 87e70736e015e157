// Package lazyre holds regular expressions that are compiled when first
// used rather than at package init: a package-level regexp.MustCompile
// runs in every command, `nodespawn version` included, whether or not the
// command ever matches against it.
package lazyre

import (
	"regexp"
	"sync"
)

// New returns a function that compiles expr on its first call and returns
// the same *regexp.Regexp on every call. Like regexp.MustCompile it panics
// when expr does not compile, but then, not at package init; tests that
// reach each expression catch that.
func New(expr string) func() *regexp.Regexp {
	return sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(expr) })
}
