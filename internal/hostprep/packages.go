package hostprep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/retry"
)

// aptRetry is how often EnsurePackages tries apt-get and how long it
// pauses between tries. First boot often races cloud-init's or
// unattended-upgrades' own apt runs and a mirror that is still warming up.
var aptRetry = retry.Policy{Attempts: 4, Base: 15 * time.Second, Max: time.Minute}

// aptEnv keeps apt and dpkg from asking questions on a console no one reads.
var aptEnv = []string{"DEBIAN_FRONTEND=noninteractive", "NEEDRESTART_MODE=l"}

// aptLockWait makes apt wait for the dpkg lock (held by cloud-init or
// unattended-upgrades at first boot) instead of failing at once.
const aptLockWait = "DPkg::Lock::Timeout=300"

// ensurePackages is EnsurePackages with its commands run by run, tried
// and paced by policy.
func ensurePackages(ctx context.Context, log *slog.Logger, run command.Runner, policy retry.Policy, names []string, install bool) error {
	missing, err := missingPackages(ctx, run, names)
	if err != nil || len(missing) == 0 {
		return err
	}
	if !install {
		return fmt.Errorf("host packages not installed: %s; install them (apt-get install %s) or set host.installPackages: true in the manifest",
			strings.Join(missing, ", "), strings.Join(missing, " "))
	}
	log.InfoContext(ctx, "installing host packages", "packages", missing)
	install1 := append([]string{"-o", aptLockWait, "install", "-y", "--no-install-recommends", "--"}, missing...)
	update := []string{"-o", aptLockWait, "update"}
	opts := command.Options{Env: aptEnv}

	// failed is the apt-get command (update or install) that failed last.
	var failed string
	err = policy.Do(ctx, func(attempt int) error {
		if attempt > 1 {
			// The package lists may be missing (fresh cloud images ship
			// none) or stale (their files gone from the mirror).
			failed = "update"
			if _, err := run.Run(ctx, opts, "apt-get", update...); err != nil {
				return err
			}
		}
		failed = "install"
		_, err := run.Run(ctx, opts, "apt-get", install1...)
		return err
	}, func(attempt int, err error) bool {
		if failed == "install" && attempt > 1 && permanentAptFailure(err) {
			return false
		}
		log.WarnContext(ctx, "apt-get "+failed+" failed, will retry", "attempt", attempt, "err", err)
		return true
	})
	if err != nil {
		return fmt.Errorf("install host packages %s: %w", strings.Join(missing, ", "), err)
	}
	still, err := missingPackages(ctx, run, missing)
	if err != nil {
		return err
	}
	if len(still) > 0 {
		return fmt.Errorf("install host packages: apt-get succeeded but dpkg still lists %s as not installed", strings.Join(still, ", "))
	}
	return nil
}

// missingPackages returns the names dpkg does not list as installed.
func missingPackages(ctx context.Context, run command.Runner, names []string) ([]string, error) {
	var missing []string
	for _, name := range names {
		out, err := run.Run(ctx, command.Options{}, "dpkg-query", "-W", "-f=${Status}", "--", name)
		var ce *command.Error
		switch {
		case errors.As(err, &ce) && ce.ExitCode == 1:
			// dpkg-query exits 1 for a package it has never heard of.
			missing = append(missing, name)
		case err != nil:
			return nil, fmt.Errorf("check host package %s: %w", name, err)
		case !installed(string(out)):
			missing = append(missing, name)
		}
	}
	return missing, nil
}

// installed reads a dpkg status ("install ok installed"): only the last
// word, the package's current state, matters; "deinstall ok config-files"
// or "install ok half-configured" are not installed.
func installed(status string) bool {
	f := strings.Fields(status)
	return len(f) == 3 && f[2] == "installed"
}

// permanentAptFailure tells failures that a retry cannot fix, once the
// package lists are fresh.
func permanentAptFailure(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "Unable to locate package") || strings.Contains(msg, "has no installation candidate")
}
