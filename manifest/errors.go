package manifest

import (
	"fmt"
	"strings"

	jsonpath "github.com/coreos/vcontext/path"
)

// Error is one problem in a manifest, with where it is.
type Error struct {
	// File is the name the manifest was loaded under.
	File string
	// Line and Col are 1-based; 0 when unknown.
	Line, Col int
	// Path is the JSON path of the offending value as FormatPath writes
	// it, like $.kubernetes.version; empty for syntax errors.
	Path string
	// Message says what is wrong, in a few words. It never holds a secret.
	Message string
	// In is where inside File the manifest is, when no line of File
	// holds it (an encoded write_files entry): Line and Col are 0.
	In string
	// Snippet is the offending source line with a caret under Col (two
	// lines, no trailing newline); empty when it would not help or would
	// show a secret.
	Snippet string
}

// Error formats the problem as FILE:LINE:COL: PATH: MESSAGE, without the
// snippet (PATH: MESSAGE when the manifest was not loaded from a source).
func (e *Error) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		if e.Line > 0 {
			fmt.Fprintf(&b, ":%d", e.Line)
			if e.Col > 0 {
				fmt.Fprintf(&b, ":%d", e.Col)
			}
		}
		b.WriteString(": ")
	}
	if e.In != "" {
		b.WriteString(e.In)
		b.WriteString(": ")
	}
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

// Errors is every problem found in a manifest, in source order. Load returns
// it for bad input (use errors.As to tell bad input from other failures).
type Errors []*Error

// Error formats every problem, one per line, each followed by its snippet.
func (es Errors) Error() string {
	var b strings.Builder
	for i, e := range es {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(e.Error())
		if e.Snippet != "" {
			b.WriteByte('\n')
			b.WriteString(e.Snippet)
		}
	}
	return b.String()
}

// ErrorAt places a problem found after Load (rendering the plan, say) in the
// source m was loaded from: msg about the value at p, with the line, column
// and snippet of that value. A field the source does not spell out (a
// defaulted one, one a host needs) has no line of its own: the error names
// the file and the path, with no line and no caret, rather than point at
// a line that is about something else. For a manifest not made by Load the
// error has the path and message only.
//
// It exists because the checks that need the whole plan live in package
// render, which imports this package: render names the path, and only this
// package knows where that path is written.
func (m *Manifest) ErrorAt(p jsonpath.ContextPath, msg string) *Error {
	if m.src == nil {
		return &Error{Path: FormatPath(p), Message: msg}
	}
	return m.src.place(problem{path: p, msg: msg, exact: true})
}
