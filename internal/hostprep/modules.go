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
