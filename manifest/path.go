package manifest

import (
	"fmt"
	"strconv"
	"strings"

	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// A value in a manifest is named, as Ignition names one in its config, by a
// vcontext path.ContextPath: member names (string) and array indexes (int)
// from the root down. Paths are built with Append, walked up with Pop and
// compared element by element; FormatPath is the one place one becomes
// text. (ContextPath's own String method writes another form, $.a.0; do not
// print a path with it or with %v.)
//
// Append may reuse the array under the path it extends, so a path kept
// beyond the call that built it (in a problem, an error, a map) is a Copy.

// identRE matches the member names FormatPath writes after a dot.
var identRE = lazyre.New(`^[A-Za-z_][A-Za-z0-9_]*$`)

// FormatPath writes p the way users see it: $.kubernetes.kubeletArgs[0],
// with member names that are not identifiers quoted in brackets, as in
// $.kubernetes.labels["example.com/x"]. A manifest path has no Tag and
// starts at $; a path with a Tag names something other than the manifest
// and starts at the Tag instead: render reports the host's facts at
// path.New("facts", "arch"), written facts.arch.
func FormatPath(p jsonpath.ContextPath) string {
	var b strings.Builder
	if p.Tag == "" {
		b.WriteByte('$')
	} else {
		b.WriteString(p.Tag)
	}
	for _, e := range p.Path {
		if i, ok := e.(int); ok {
			b.WriteByte('[')
			b.WriteString(strconv.Itoa(i))
			b.WriteByte(']')
			continue
		}
		key := fmt.Sprint(e)
		if identRE().MatchString(key) {
			b.WriteByte('.')
			b.WriteString(key)
			continue
		}
		b.WriteByte('[')
		b.WriteString(strconv.Quote(key))
		b.WriteByte(']')
	}
	return b.String()
}

// within reports whether p is outer or a value inside it.
func within(p, outer jsonpath.ContextPath) bool {
	return p.Tag == outer.Tag && p.Len() >= outer.Len() && matches(p.Path[:outer.Len()], outer.Path...)
}

// anyIndex stands for every array index in a pattern given to matches.
type anyIndex struct{}

// matches reports whether the path elements elems are pattern, element by
// element.
func matches(elems []any, pattern ...any) bool {
	if len(elems) != len(pattern) {
		return false
	}
	for i, want := range pattern {
		if _, ok := want.(anyIndex); ok {
			if _, ok := elems[i].(int); !ok {
				return false
			}
		} else if elems[i] != want {
			return false
		}
	}
	return true
}

// isSecretPath reports whether the value at p is a secret, never to be
// shown: the bootstrap token, the value of an exec credential plugin's
// environment variable, the value of an extra file's HTTP header.
func isSecretPath(p jsonpath.ContextPath) bool {
	n := p.Len()
	return matches(p.Path, "kubernetes", "auth", "bootstrapToken") ||
		matches(p.Path, "kubernetes", "auth", "exec", "env", anyIndex{}, "value") ||
		n >= 3 && matches(p.Path[n-3:], "httpHeaders", anyIndex{}, "value")
}
