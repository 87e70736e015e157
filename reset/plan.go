package reset

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/state"
)

// Preview is what Run would do, for reset --dry-run and the question
// reset asks on a terminal.
type Preview struct {
	// Machine is the machine reset was asked to remove.
	Machine string `json:"machine"`
	// Stop are the machines it would stop (on a live host only).
	Stop []string `json:"stop,omitempty"`
	// Remove are the paths it would remove, as on the host, in the order
	// it removes them; a machine's rootfs is unmounted first.
	Remove []string `json:"remove"`
	// Leave is what it leaves in place, each with why.
	Leave []string `json:"leave,omitempty"`
}

// Plan says what Run(ctx, opts) would do, changing nothing: the machines
// it stops, the paths it removes and what it leaves, from the same lists
// Run works through. It takes no lock: an apply running meanwhile may
// change the answer.
func Plan(ctx context.Context, opts Options) (*Preview, error) {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	m, err := resetMachine(opts)
	if err != nil {
		return nil, err
	}
	s, err := state.Open(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("reset: %w", err)
	}
	defer s.Close()
	host := s.Root()
	rp := &Preview{Machine: m, Remove: []string{}}
	live := opts.Systemd != nil
	for _, t := range resetTargets(s, opts, m, opts.Log) {
		if t.leave != "" {
			rp.Leave = append(rp.Leave, "machine "+t.name+" ("+t.leave+")")
			continue
		}
		if live {
			rp.Stop = append(rp.Stop, t.name)
		}
		rootfs, err := machine.Rootfs(t.name, t.plan)
		if err != nil {
			return nil, err
		}
		if _, err := host.Lstat(rootfs); err == nil {
			rp.Remove = append(rp.Remove, host.Show(rootfs))
		}
		for _, q := range machine.Files(host, rootfs, t.name, t.plan, nil) {
			rp.Remove = append(rp.Remove, host.Show(q))
		}
		if dir := layout.BPFFSDir(t.name); present(host, dir) {
			rp.Remove = append(rp.Remove, host.Show(dir))
		}
	}
	for _, p := range resetState {
		if present(host, p) {
			rp.Remove = append(rp.Remove, host.Show(p))
		}
	}
	if !live {
		rp.Leave = append(rp.Leave, fmt.Sprintf("running machines: not stopped, and systemd not reloaded (the root is %s, not /)", opts.Root))
	}
	rp.Leave = append(rp.Leave, leftInPlace(host, opts.Plan)...)
	if live {
		for _, s := range cniInterfaces() {
			rp.Leave = append(rp.Leave, "interface "+s+" (made by the machine's CNI, not by nodespawn)")
		}
	}
	return rp, nil
}

func present(host *confine.Root, p string) bool {
	_, err := host.Lstat(path.Clean(p))
	return !errors.Is(err, fs.ErrNotExist)
}
