// Package redact is nodespawn's one definition of the secret parts of a
// URL: the password in its user info (the user name when there is no
// password: a token given as the user), and its query, which may carry
// signed tokens. Every place that shows a URL (plans, logs, errors,
// manifest snippets) hides these parts through this package.
package redact

import (
	"net/url"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// Marker replaces a secret in everything nodespawn prints.
const Marker = "<redacted>"

// URL returns raw, a URL, with its secret parts replaced by Marker, like
// https://user:<redacted>@mirror.example/file?<redacted>.
func URL(raw string) string {
	if _, err := url.Parse(raw); err != nil {
		// The parser's error quotes the URL; so would a partial redaction
		// of what it cannot read.
		return "<unparsable URL>"
	}
	return Text(raw)
}

// Text returns s with the secret parts of every URL in it replaced by
// Marker: for text that holds URLs among other words (a step's summary, a
// warning).
func Text(s string) string {
	return Replace(s, func(string) string { return Marker })
}

// schemeRE finds where a URL with an authority starts.
var schemeRE = lazyre.New(`[A-Za-z][A-Za-z0-9+.-]*://`)

// Replace returns s with each secret part of every URL in it replaced by
// with(secret). A URL runs from its scheme to the first space, control
// character, quote, '<', '>' or backslash, none of which a URL holds
// unescaped; so it is found in YAML and JSON source lines as well as in
// plain text.
func Replace(s string, with func(secret string) string) string {
	locs := schemeRE().FindAllStringIndex(s, -1)
	if locs == nil {
		return s
	}
	var out []byte
	last := 0
	keep := func(to int) { out = append(out, s[last:to]...); last = to }
	hide := func(from, to int) {
		if from < to {
			keep(from)
			out = append(out, with(s[from:to])...)
			last = to
		}
	}
	for _, loc := range locs {
		start := loc[1]
		if start < last {
			continue // inside a URL already handled
		}
		end := start
		for end < len(s) && !stops(s[end]) {
			end++
		}
		// The authority ends at the first '/', '?' or '#'; its user info
		// at the last '@' in it (url.Parse reads "u:p@ss@host" so).
		auth := start
		for auth < end && s[auth] != '/' && s[auth] != '?' && s[auth] != '#' {
			auth++
		}
		if at := strings.LastIndexByte(s[start:auth], '@'); at >= 0 {
			info := s[start : start+at]
			if colon := strings.IndexByte(info, ':'); colon >= 0 {
				hide(start+colon+1, start+at)
			} else {
				hide(start, start+at)
			}
		}
		if q := strings.IndexByte(s[auth:end], '?'); q >= 0 {
			from := auth + q + 1
			to := end
			if f := strings.IndexByte(s[from:end], '#'); f >= 0 {
				to = from + f
			}
			hide(from, to)
		}
		keep(end)
	}
	keep(len(s))
	return string(out)
}

// stops reports whether c cannot be part of a URL as written.
func stops(c byte) bool {
	return c <= ' ' || c == 0x7f || c == '"' || c == '<' || c == '>' || c == '\\'
}
