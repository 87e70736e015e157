package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/upgrade"
)

// The fleet's entry points (nodespawn agent): a fleet config (a manifest
// without secrets, manifest.LoadConfig) prepared beside the running
// machine and switched to, identified by its config digest
// (manifest.ConfigDigest), through Prepare and SwitchPrepared.

// PrepareConfig prepares fleet config cfg on the node under root: the
// running machine's credentials are put in the config (the node keeps its
// identity; manifest.WithAuthOf), and the result goes through what
// `nodespawn apply` does with a manifest (facts, render, the same-node
// check, the decision) up to the switch (Prepare).
func PrepareConfig(ctx context.Context, root, toolVersion string, cfg *manifest.Manifest) error {
	st, err := state.ReadMachines(root)
	if err != nil {
		return err
	}
	if st.Active == "" {
		return errors.New("prepare: no machine runs a node here: a fleet config upgrades a node (nodespawn apply makes one)")
	}
	data, err := state.ManifestOf(root, st.Active)
	if err != nil {
		return err
	}
	if data == nil {
		return fmt.Errorf("prepare: the manifest of running machine %s is missing (%s)", st.Active, state.ManifestFile(st.Active))
	}
	running, err := manifest.Load(state.ManifestFile(st.Active), data)
	if err != nil {
		return fmt.Errorf("prepare: the running machine's manifest no longer loads: %w", err)
	}
	m := cfg.WithAuthOf(running)
	// The manifest the machine is made from, stored with it: the
	// config, with the node's credentials, in its canonical form.
	b, err := m.Canonical()
	if err != nil {
		return err
	}
	if m, err = manifest.Load("the fleet config with the node's credentials", b); err != nil {
		return fmt.Errorf("prepare: the config with the node's credentials does not load: %w", err)
	}
	facts, err := Facts(ctx, "", root)
	if err != nil {
		return err
	}
	p, err := render.Plan(m, facts)
	if err != nil {
		return err
	}
	if err := checkSameNode(root, m, p, true); err != nil {
		return err
	}
	md, err := m.Digest()
	if err != nil {
		return err
	}
	deps, err := apply.DefaultDeps(root, slog.Default())
	if err != nil {
		return err
	}
	opts := apply.Options{
		Root: root, ManifestDigest: md.String(), SourceDigest: digest.FromBytes(b).String(), Source: "nodespawn agent",
		Manifest: b, ToolVersion: toolVersion, Deps: deps,
		Upgrade: upgradeOptions(m, facts, root, render.PlanFor),
	}
	_, _, err = Prepare(ctx, p, opts)
	return err
}

// SwitchConfig switches the node under root to the machine prepared
// from the fleet config whose digest is configDigest (SwitchPrepared).
func SwitchConfig(ctx context.Context, root, toolVersion, configDigest string) (*apply.Result, error) {
	st, err := state.ReadMachines(root)
	if err != nil {
		return nil, err
	}
	u := st.Upgrade
	if u == nil || u.Phase != state.UpgradePreparing {
		return nil, &upgrade.NotPreparedError{Manifest: configDigest, Why: "no upgrade is prepared"}
	}
	if d, err := ConfigDigestOf(root, u.To); err != nil || d != configDigest {
		return nil, &upgrade.NotPreparedError{Manifest: configDigest, Why: fmt.Sprintf("machine %s is prepared from config %s", u.To, d)}
	}
	opts, err := StoredOptions(root, toolVersion, u.To, u.From)
	if err != nil {
		return nil, err
	}
	return SwitchPrepared(ctx, opts, u.ManifestDigest)
}

// RollbackNode switches the node under root back to its kept previous
// machine (upgrade.Rollback), as `nodespawn rollback` does.
func RollbackNode(ctx context.Context, root, toolVersion string) (*apply.Result, error) {
	st, err := state.ReadMachines(root)
	if err != nil {
		return nil, err
	}
	if err := st.RollbackProblem(); err != nil {
		return nil, err
	}
	opts, err := StoredOptions(root, toolVersion, st.Previous, st.Active)
	if err != nil {
		return nil, err
	}
	return upgrade.Rollback(ctx, opts)
}

// Resume finishes a switch a killed run left half-done on the node under
// root (what the first-boot unit does at boot, and apply first); nothing
// when there is none.
func Resume(ctx context.Context, root, toolVersion string) (*state.UpgradeOutcome, error) {
	st, err := state.ReadMachines(root)
	if err != nil || st.Upgrade == nil || st.Upgrade.Phase == state.UpgradePreparing {
		return nil, err
	}
	opts, err := StoredOptions(root, toolVersion, st.Upgrade.To, st.Upgrade.From)
	if err != nil {
		return nil, fmt.Errorf("finish the interrupted upgrade from %s to %s: %w", st.Upgrade.From, st.Upgrade.To, err)
	}
	return upgrade.Resume(ctx, opts)
}

// ConfigDigestOf is the config digest (manifest.ConfigDigest) of the
// manifest machine was made from under root; "" when none is stored.
func ConfigDigestOf(root, machine string) (string, error) {
	if machine == "" {
		return "", nil
	}
	data, err := state.ManifestOf(root, machine)
	if err != nil || data == nil {
		return "", err
	}
	m, err := manifest.Load(state.ManifestFile(machine), data)
	if err != nil {
		return "", fmt.Errorf("the manifest of machine %s no longer loads: %w", machine, err)
	}
	d, err := m.ConfigDigest()
	return d.String(), err
}
