package hostprep

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// applySysctls writes each value to <root>/proc/sys now, so the settings hold
// without a reboot (the sysctl.d file keeps them across boots). A value is
// written only when the current one differs; each change is logged as
// old -> new. Every key is checked before anything is written: keys that do
// not exist are all reported in one error, never skipped.
//
// Keys follow sysctl.d(5): when the first separator is a dot, dots and
// slashes swap roles (net.ipv4.conf.eth0/100.rp_filter is the file
// net/ipv4/conf/eth0.100/rp_filter); when it is a slash, the key is a path.
func applySysctls(log *slog.Logger, root string, values []plan.KeyValue) error {
	if root == "" {
		root = "/"
	}
	type target struct {
		kv   plan.KeyValue
		path string
	}
	var targets []target
	var bad, missing []string
	for _, kv := range values {
		rel, err := sysctlPath(kv.Key)
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		p := filepath.Join(root, "proc/sys", rel)
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, kv.Key)
			continue
		}
		targets = append(targets, target{kv, p})
	}
	if len(bad) > 0 {
		return fmt.Errorf("apply sysctls: %s", strings.Join(bad, "; "))
	}
	if len(missing) > 0 {
		hint := ""
		for _, k := range missing {
			if strings.HasPrefix(k, "net.bridge.") || strings.HasPrefix(k, "net/bridge/") {
				hint = " (net.bridge.* keys need the br_netfilter module loaded first)"
				break
			}
		}
		return fmt.Errorf("apply sysctls: keys not found under %s: %s%s", filepath.Join(root, "proc/sys"), strings.Join(missing, ", "), hint)
	}

	var errs []error
	for _, t := range targets {
		cur, err := os.ReadFile(t.path)
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", t.kv.Key, err))
			continue
		}
		old, want := normalizeSysctl(string(cur)), normalizeSysctl(t.kv.Value)
		if old == want {
			continue
		}
		// O_WRONLY without O_TRUNC or O_CREATE: a /proc/sys file takes the
		// whole value in one write, and a missing one must not be created.
		f, err := os.OpenFile(t.path, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteString(t.kv.Value + "\n")
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("set %s=%s (was %s): %w", t.kv.Key, t.kv.Value, old, err))
			continue
		}
		log.Info("sysctl changed", "key", t.kv.Key, "old", old, "new", want)
	}
	if len(errs) > 0 {
		return fmt.Errorf("apply sysctls: %w", errors.Join(errs...))
	}
	return nil
}

// sysctlPath turns a sysctl key into a path relative to /proc/sys.
func sysctlPath(key string) (string, error) {
	rel := key
	if i := strings.IndexAny(key, "./"); i >= 0 && key[i] == '.' {
		rel = strings.Map(func(r rune) rune {
			switch r {
			case '.':
				return '/'
			case '/':
				return '.'
			}
			return r
		}, key)
	}
	for _, seg := range strings.Split(rel, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.ContainsAny(seg, "*?[\x00") {
			return "", fmt.Errorf("sysctl key %q: not a plain key (empty, relative or glob segment)", key)
		}
	}
	return rel, nil
}

// normalizeSysctl compares values the way the kernel prints them: multi-value
// keys (net.ipv4.ip_local_port_range) read back tab-separated.
func normalizeSysctl(v string) string {
	return strings.Join(strings.Fields(v), " ")
}
