package manifest

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoad: whatever the bytes, Load returns a manifest or an error, never
// panics, and bad input is always reported as Errors with a message.
func FuzzLoad(f *testing.F) {
	examples, _ := filepath.Glob("../examples/*.yaml")
	for _, e := range examples {
		if data, err := os.ReadFile(e); err == nil {
			f.Add("m.yaml", data)
		}
	}
	f.Add("m.yaml", []byte(with("  labels: &l {a: b}", "host: {sysctls: {<<: *l}}")))
	f.Add("m.json", []byte(`{"apiVersion":"nodespawn.dev\/v1alpha1","kubernetes":{"labels":{"a":1,"a":2}}}`))
	f.Add("m.yaml", []byte("a: &a [*a]\n"))
	f.Add("m.yaml", []byte("? [a]\n: b\n"))
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		m, err := Load(name, data)
		if err == nil {
			if m == nil {
				t.Fatal("nil manifest without an error")
			}
			return
		}
		var es Errors
		if !errors.As(err, &es) {
			t.Fatalf("error is %T, not Errors: %v", err, err)
		}
		if len(es) == 0 {
			t.Fatal("empty Errors")
		}
		for _, e := range es {
			if e.Message == "" {
				t.Fatalf("error without a message: %+v", e)
			}
		}
		_ = err.Error()
	})
}
