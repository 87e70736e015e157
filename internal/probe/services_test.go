package probe

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

// TestFabricManagerVersion reads the Fabric Manager package's version
// from dpkg's database: the branch package or the unversioned one, epoch
// and Debian revision dropped, -dev packages and removed ones skipped.
func TestFabricManagerVersion(t *testing.T) {
	tests := []struct{ name, status, want string }{
		{"branch package", "Package: nvidia-fabricmanager-550\nStatus: install ok installed\nVersion: 550.54.15-1\n", "550.54.15"},
		{"unversioned package with epoch", "Package: nvidia-fabricmanager\nStatus: install ok installed\nVersion: 1:580.95.05-0ubuntu1\n", "580.95.05"},
		{"removed, config left", "Package: nvidia-fabricmanager-550\nStatus: deinstall ok config-files\nVersion: 550.54.15-1\n", ""},
		{"only the headers", "Package: nvidia-fabricmanager-dev-570\nStatus: install ok installed\nVersion: 570.86.15-1\n", ""},
		{"another package first", "Package: nvidia-fabricmanagerx\nStatus: install ok installed\nVersion: 1.0\n\nPackage: nvidia-fabricmanager-570\nStatus: install ok installed\nVersion: 570.124.06-1\n", "570.124.06"},
		{"no dpkg", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if tt.status != "" {
				p := filepath.Join(root, dpkgStatus)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(tt.status), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			p := &prober{root: root, log: slog.New(slog.DiscardHandler)}
			got, err := p.fabricManagerVersion()
			if err != nil || got != tt.want {
				t.Errorf("fabricManagerVersion() = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
