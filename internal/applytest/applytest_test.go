package applytest

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestOnlyTestsImportIt: the fixture and its fakes never reach the
// binary; a file that is not a _test.go file importing this package is
// an error.
func TestOnlyTestsImportIt(t *testing.T) {
	const self = "github.com/nodespawn/nodespawn/internal/applytest"
	here, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	top := filepath.Dir(filepath.Dir(here))
	fset := token.NewFileSet()
	checked := 0
	err = filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); p != top && (strings.HasPrefix(name, ".") || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") || filepath.Dir(p) == here {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		checked++
		for _, im := range f.Imports {
			if path, _ := strconv.Unquote(im.Path.Value); path == self {
				t.Errorf("%s imports %s, a test helper; only _test.go files may", p, self)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 100 {
		t.Fatalf("looked at %d Go files under %s; the walk missed the tree", checked, top)
	}
}
