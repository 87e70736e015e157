package hostprep

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/internal/command"
)

// LoadModules loads the named kernel modules with modprobe. A module already
// present under /sys/module is not loaded again. When any module fails, the
// error lists every failing module with modprobe's stderr.
//
// Call it before ApplySysctls: the net.bridge.* sysctls appear only once
// br_netfilter is loaded.
func LoadModules(ctx context.Context, names []string) error {
	return loadModules(ctx, command.Exec{}, "/sys/module", names)
}

func loadModules(ctx context.Context, run command.Runner, sysModule string, names []string) error {
	var errs []error
	for _, name := range names {
		if name == "" || strings.ContainsAny(name, "/ \t\n") {
			errs = append(errs, fmt.Errorf("module %q: not a module name", name))
			continue
		}
		// /sys/module uses underscores whatever the name was spelled with.
		if _, err := os.Stat(filepath.Join(sysModule, strings.ReplaceAll(name, "-", "_"))); err == nil {
			continue
		}
		if _, err := run.Run(ctx, command.Options{}, "modprobe", "--", name); err != nil {
			errs = append(errs, fmt.Errorf("module %s: %w", name, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("load kernel modules (is the kernel's modules package installed?): %w", errors.Join(errs...))
	}
	return nil
}
