package apply_test

import (
	"os"
	"path/filepath"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
)

func TestRegistryCredentialsOrder(t *testing.T) {
	root := t.TempDir()
	if got := RegistryCredentialsIn(root); got != "" {
		t.Fatalf("no credentials file: got %q, want anonymous", got)
	}
	put := func(p string) string {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(`{"auths":{}}`), 0o600); err != nil {
			t.Fatal(err)
		}
		return full
	}
	docker := put("/root/.docker/config.json")
	if got := RegistryCredentialsIn(root); got != docker {
		t.Errorf("got %q, want root's docker config %q", got, docker)
	}
	ours := put(RegistryCredentials)
	if got := RegistryCredentialsIn(root); got != ours {
		t.Errorf("got %q, want nodespawn's own %q first", got, ours)
	}
}
