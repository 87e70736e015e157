package hostprep

import (
	"context"
	"log/slog"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/retry"
)

const (
	qSC      = "dpkg-query -W -f=${Status} -- systemd-container"
	qBash    = "dpkg-query -W -f=${Status} -- bash"
	aptEnvs  = "DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l "
	install  = aptEnvs + "apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends -- systemd-container"
	update   = aptEnvs + "apt-get -o DPkg::Lock::Timeout=300 update"
	notFound = "dpkg-query: no packages found matching systemd-container"
)

func TestEnsurePackages(t *testing.T) {
	tests := []struct {
		name    string
		names   []string
		install bool
		// respond scripts the fake host: line and how many times it was seen.
		respond   func(line string, n int) ([]byte, error)
		wantCalls []string
		wantErr   []string
	}{
		{
			name:  "all installed",
			names: []string{"bash", "systemd-container"},
			respond: func(string, int) ([]byte, error) {
				return []byte("install ok installed"), nil
			},
			wantCalls: []string{qBash, qSC},
		},
		{
			name:  "missing, install not allowed",
			names: []string{"bash", "systemd-container"},
			respond: func(line string, _ int) ([]byte, error) {
				if line == qSC {
					return []byte("deinstall ok config-files"), nil
				}
				return []byte("install ok installed"), nil
			},
			wantCalls: []string{qBash, qSC},
			wantErr:   []string{"systemd-container", "host.installPackages: true", "apt-get install systemd-container"},
		},
		{
			name:    "installed at first try",
			names:   []string{"systemd-container"},
			install: true,
			respond: func(line string, n int) ([]byte, error) {
				if line == qSC && n == 1 {
					return nil, failure(line, 1, notFound)
				}
				return []byte("install ok installed"), nil
			},
			wantCalls: []string{qSC, install, qSC},
		},
		{
			name:    "transient failures, then update and install succeed",
			names:   []string{"systemd-container"},
			install: true,
			respond: func(line string, n int) ([]byte, error) {
				switch {
				case line == qSC && n == 1:
					return nil, failure(line, 1, notFound)
				case line == install && n == 1:
					return nil, failure(line, 100, "E: Unable to locate package systemd-container")
				case line == update && n == 1:
					return nil, failure(line, 100, "E: Failed to fetch http://deb.example/dists/bookworm/InRelease  Temporary failure resolving")
				case line == install && n == 2:
					return nil, failure(line, 100, "E: Could not get lock /var/lib/dpkg/lock-frontend")
				}
				return []byte("install ok installed"), nil
			},
			wantCalls: []string{qSC, install, update, update, install, update, install, qSC},
		},
		{
			name:    "gives up after the last attempt with the last stderr",
			names:   []string{"systemd-container"},
			install: true,
			respond: func(line string, n int) ([]byte, error) {
				switch line {
				case qSC:
					return nil, failure(line, 1, notFound)
				case install:
					return nil, failure(line, 100, "E: Could not get lock /var/lib/dpkg/lock-frontend")
				}
				return nil, nil
			},
			wantCalls: []string{qSC, install, update, install, update, install, update, install},
			wantErr:   []string{"install host packages systemd-container", "Could not get lock"},
		},
		{
			name:    "unknown package after update is permanent",
			names:   []string{"systemd-container"},
			install: true,
			respond: func(line string, n int) ([]byte, error) {
				switch line {
				case qSC:
					return nil, failure(line, 1, notFound)
				case install:
					return nil, failure(line, 100, "E: Unable to locate package systemd-container")
				}
				return nil, nil
			},
			wantCalls: []string{qSC, install, update, install},
			wantErr:   []string{"Unable to locate package systemd-container"},
		},
		{
			name:    "apt says yes but dpkg disagrees",
			names:   []string{"systemd-container"},
			install: true,
			respond: func(line string, n int) ([]byte, error) {
				if line == qSC {
					return []byte("install ok half-configured"), nil
				}
				return nil, nil
			},
			wantCalls: []string{qSC, install, qSC},
			wantErr:   []string{"dpkg still lists systemd-container as not installed"},
		},
		{
			name:  "dpkg-query itself broken",
			names: []string{"systemd-container"},
			respond: func(line string, n int) ([]byte, error) {
				return nil, failure(line, 2, "dpkg-query: error: parsing file '/var/lib/dpkg/status'")
			},
			wantCalls: []string{qSC},
			wantErr:   []string{"check host package systemd-container", "parsing file"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeRunner{respond: tt.respond}
			// aptRetry's attempts, without its pauses.
			noWait := retry.Policy{Attempts: aptRetry.Attempts}
			err := ensurePackages(context.Background(), slog.Default(), f, noWait, tt.names, tt.install)
			if !slices.Equal(f.calls, tt.wantCalls) {
				t.Errorf("calls:\n  %s\nwant:\n  %s", strings.Join(f.calls, "\n  "), strings.Join(tt.wantCalls, "\n  "))
			}
			if (err != nil) != (len(tt.wantErr) > 0) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
		})
	}
}

func TestEnsurePackagesCancelledWhileWaiting(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeRunner{respond: func(line string, n int) ([]byte, error) {
		if line == install {
			cancel()
			return nil, failure(line, 100, "E: Could not get lock /var/lib/dpkg/lock-frontend")
		}
		return nil, failure(line, 1, notFound)
	}}
	err := ensurePackages(ctx, slog.Default(), f, aptRetry, []string{"systemd-container"}, true)
	if err == nil || !strings.Contains(err.Error(), "context canceled") || !strings.Contains(err.Error(), "Could not get lock") {
		t.Fatalf("err = %v, want cancellation with the last apt failure", err)
	}
}

// TestEnsurePackagesRealDpkg asks the real dpkg database; it installs nothing.
func TestEnsurePackagesRealDpkg(t *testing.T) {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		t.Skip("dpkg-query not found: not a Debian-family host")
	}
	if err := (Host{}).EnsurePackages(context.Background(), []string{"bash", "dpkg"}, false); err != nil {
		t.Errorf("bash and dpkg reported missing: %v", err)
	}
	err := (Host{}).EnsurePackages(context.Background(), []string{"bash", "nodespawn-no-such-package"}, false)
	if err == nil || !strings.Contains(err.Error(), "nodespawn-no-such-package") || strings.Contains(err.Error(), "bash") {
		t.Errorf("err = %v, want only nodespawn-no-such-package missing", err)
	}
}
