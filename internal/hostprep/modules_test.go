package hostprep

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestLoadModules(t *testing.T) {
	sys := t.TempDir()
	for _, m := range []string{"overlay", "br_netfilter"} {
		if err := os.Mkdir(filepath.Join(sys, m), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name      string
		modules   []string
		failing   map[string]string // module -> modprobe stderr
		wantCalls []string
		wantErr   []string
	}{
		{
			name:    "already loaded, dash or underscore",
			modules: []string{"overlay", "br-netfilter"},
		},
		{
			name:      "loads missing",
			modules:   []string{"overlay", "nf_conntrack", "vxlan"},
			wantCalls: []string{"modprobe -- nf_conntrack", "modprobe -- vxlan"},
		},
		{
			name:    "every failure listed",
			modules: []string{"nope1", "vxlan", "nope2"},
			failing: map[string]string{
				"nope1": "modprobe: FATAL: Module nope1 not found in directory /lib/modules/6.1.0",
				"nope2": "modprobe: FATAL: Module nope2 not found in directory /lib/modules/6.1.0",
			},
			wantCalls: []string{"modprobe -- nope1", "modprobe -- vxlan", "modprobe -- nope2"},
			wantErr:   []string{"module nope1", "Module nope1 not found", "module nope2", "Module nope2 not found"},
		},
		{
			name:    "not a module name",
			modules: []string{"../evil"},
			wantErr: []string{`module "../evil": not a module name`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeRunner{respond: func(line string, _ int) ([]byte, error) {
				m := line[strings.LastIndex(line, " ")+1:]
				if stderr, ok := tt.failing[m]; ok {
					return nil, failure(line, 1, stderr)
				}
				return nil, nil
			}}
			err := loadModules(context.Background(), f, sys, tt.modules)
			if !slices.Equal(f.calls, tt.wantCalls) {
				t.Errorf("calls = %q, want %q", f.calls, tt.wantCalls)
			}
			if (err != nil) != (len(tt.wantErr) > 0) {
				t.Fatalf("err = %v, want error containing %q", err, tt.wantErr)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
			if err != nil && strings.Contains(err.Error(), "vxlan") {
				t.Errorf("error %q names vxlan, which loaded", err)
			}
		})
	}
}

// TestLoadModulesRealModprobe checks the stderr of the real modprobe reaches
// the error. It loads nothing: the module does not exist.
func TestLoadModulesRealModprobe(t *testing.T) {
	if _, err := exec.LookPath("modprobe"); err != nil {
		t.Skip("modprobe not found: install the kmod package")
	}
	err := (Host{}).LoadModules(context.Background(), []string{"nodespawn_no_such_module"})
	if err == nil {
		t.Fatal("LoadModules of a missing module succeeded")
	}
	if !strings.Contains(err.Error(), "nodespawn_no_such_module") || !strings.Contains(err.Error(), "modprobe: ") {
		t.Errorf("error %q lacks the module name or modprobe's stderr", err)
	}
	if errors.Unwrap(err) == nil {
		t.Errorf("error %q does not wrap the command error", err)
	}
}
