package layout

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// layoutLiterals are what only this package spells: a Go string literal
// anywhere else that contains one builds or names a host path or unit
// name this package owns, and must use the constant or function here.
var layoutLiterals = []string{
	"/var/lib/nodespawn",
	"/run/nodespawn.lock",
	"/usr/local/bin/nodespawn",
	"/var/lib/machines",
	"/etc/systemd/nspawn",
	"/etc/systemd/system",
	"/usr/lib/systemd/system",
	"/run/bpffs",
	"systemd-nspawn@",
	"nodespawn-firstboot.service",
	"nodespawn-agent.service",
	".target.wants",
}

// layoutNames are names only this package gives as a whole literal: the
// node's units (a template's file name, "kubelet.service.tmpl", is not
// one).
var layoutNames = []string{ContainerdUnit, KubeletUnit}

// toConvert are the files that still spell host layout themselves, each a
// TODO of issue 20's re-layout: convert the file to this package and
// delete its line. The test fails for a line whose file no longer needs
// it, so the list only shrinks.
var toConvert = []string{}

// testHelpers are packages only tests import (internal/applytest checks
// that of itself): the fixture they share speaks as tests do.
var testHelpers = []string{"internal/applytest"}

// TestNoLayoutLiterals parses every Go file of the module but tests and
// this package's, and fails on each string literal that contains one of
// layoutLiterals or is one of layoutNames, as FILE:LINE. What counts:
//
//   - String literals in Go code, help and error text included: a path
//     a message names is the path the code uses, so it is built from
//     here too.
//   - Not comments: documentation may name the paths it explains.
//   - Not tests: they state what the product must do, in its own words
//     (and check it against these constants where it matters). Test
//     helper packages (testHelpers) count as tests.
//   - Not templates (render/templates/*.tmpl) and other embedded unit
//     text: a unit file names units and paths as systemd reads them
//     (After=containerd.service). The paths and names the Go code builds,
//     compares or hands to a template come from here.
//   - Not testdata, nor files listed in toConvert.
func TestNoLayoutLiterals(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("the module root is not at %s: %v", root, err)
	}
	self, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	found := map[string][]string{} // file -> "FILE:LINE: literal has NEEDLE"
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			rel, _ := filepath.Rel(root, p)
			if p != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor" || p == self || slices.Contains(testHelpers, filepath.ToSlash(rel))) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		hits, err := literalsIn(p, rel)
		if err != nil {
			return err
		}
		if len(hits) > 0 {
			found[rel] = hits
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range toConvert {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("toConvert lists %s, which is gone: delete its line", f)
		} else if len(found[f]) == 0 {
			t.Errorf("%s spells no host layout any more: delete its line in toConvert", f)
		}
	}
	var bad []string
	for f, hits := range found {
		if !slices.Contains(toConvert, f) {
			bad = append(bad, hits...)
		}
	}
	slices.Sort(bad)
	if len(bad) > 0 {
		t.Errorf("host layout spelt outside package internal/layout; use its constants and functions:\n%s", strings.Join(bad, "\n"))
	}
}

// literalsIn returns, as "REL:LINE: ...", each string literal of the Go
// file at p that contains one of layoutLiterals or is one of layoutNames.
func literalsIn(p, rel string) ([]string, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	var hits []string
	ast.Inspect(f, func(n ast.Node) bool {
		lit, ok := n.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return true
		}
		s, err := strconv.Unquote(lit.Value)
		if err != nil {
			s = lit.Value
		}
		line := rel + ":" + strconv.Itoa(fset.Position(lit.Pos()).Line) + ": "
		for _, needle := range layoutLiterals {
			if strings.Contains(s, needle) {
				hits = append(hits, line+strconv.Quote(needle))
			}
		}
		if slices.Contains(layoutNames, s) {
			hits = append(hits, line+strconv.Quote(s))
		}
		return true
	})
	return hits, nil
}
