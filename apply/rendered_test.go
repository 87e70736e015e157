package apply_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
)

// TestApplyRenderedExamples applies what render makes of the shipped
// examples (real plans, every kind render emits) into a temp root, with
// fakes only at the Deps seams, and checks every file, directory and link
// against its step; then a forced rerun must find nothing to do.
func TestApplyRenderedExamples(t *testing.T) {
	for _, tt := range []struct{ example, facts string }{
		{"full", "cpu"},
		{"gpu", "gpu8"},
	} {
		t.Run(tt.example+"-"+tt.facts, func(t *testing.T) {
			p := renderExample(t, tt.example, tt.facts)
			root := t.TempDir()
			deps, _, _, _ := applytest.Deps()
			opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
			opts.Root = root
			if _, err := applytest.Run(context.Background(), p, opts); err != nil {
				t.Fatal(err)
			}
			for _, s := range p.Steps {
				checkStep(t, root, s)
			}
			deps, _, _, _ = applytest.Deps()
			opts.Deps, opts.Force = deps, true
			res, err := applytest.Run(context.Background(), p, opts)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range res.Record.Steps {
				if (s.Kind == plan.KindFile || s.Kind == plan.KindDirectory || s.Kind == plan.KindLink) && s.Outcome != state.OutcomeUnchanged {
					t.Errorf("rerun: step %s %s %s", s.ID, s.Outcome, s.Error)
				}
			}
		})
	}
}

func renderExample(t *testing.T, example, facts string) *plan.Plan {
	t.Helper()
	path := filepath.Join("..", "examples", example+".yaml")
	data, err := os.ReadFile(path)
	applytest.Must(t, err)
	m, err := manifest.Load(path, data)
	if err != nil {
		t.Fatalf("load %s: %v", path, err)
	}
	var f plan.Facts
	b, err := os.ReadFile(filepath.Join("..", "render", "testdata", "facts", facts+".json"))
	applytest.Must(t, err)
	applytest.Must(t, json.Unmarshal(b, &f))
	p, err := render.Plan(m, f)
	if err != nil {
		t.Fatalf("render %s on %s: %v", example, facts, err)
	}
	return p
}

// checkStep compares what a file, directory or link step asked for with
// what is on disk (owners by name are left to TestApplyTree).
func checkStep(t *testing.T, root string, s plan.Step) {
	t.Helper()
	switch {
	case s.File != nil:
		f := s.File
		fi, err := os.Lstat(filepath.Join(root, f.Path))
		if err != nil {
			t.Errorf("step %s: %v", s.ID, err)
			return
		}
		want := confine.FileMode(f.Mode)
		if f.Secret {
			want &= 0o600
		}
		if got := statOf(fi); got.mode != uint32(want.Perm()) && !f.Secret || f.Secret && got.mode&0o077 != 0 {
			t.Errorf("step %s: %s mode %04o, want %v", s.ID, f.Path, got.mode, want)
		}
		if f.Source != nil || !f.Overwrite {
			return
		}
		wantData := []byte(f.Contents)
		if f.Encoding == "base64" {
			wantData, _ = base64.StdEncoding.DecodeString(f.Contents)
		}
		if got, _ := os.ReadFile(filepath.Join(root, f.Path)); string(got) != string(wantData) {
			t.Errorf("step %s: %s contents differ", s.ID, f.Path)
		}
	case s.Directory != nil:
		fi, err := os.Lstat(filepath.Join(root, s.Directory.Path))
		if err != nil || !fi.IsDir() || statOf(fi).mode != uint32(confine.FileMode(s.Directory.Mode).Perm()) {
			t.Errorf("step %s: %s: %v %v", s.ID, s.Directory.Path, fi, err)
		}
	case s.Link != nil && !s.Link.Hard:
		if target, err := os.Readlink(filepath.Join(root, s.Link.Path)); err != nil || target != s.Link.Target {
			t.Errorf("step %s: %s -> %q, %v; want %s", s.ID, s.Link.Path, target, err, s.Link.Target)
		}
	}
}
