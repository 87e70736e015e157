package provision_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/state"
)

// startFails is an applytest.DiskSystemd on which the machine's service fails to
// start (after systemd tried: the machine may have run).
type startFails struct{ *applytest.DiskSystemd }

func (s startFails) Start(ctx context.Context, unit string) (bool, error) {
	if strings.HasPrefix(unit, "systemd-nspawn@") {
		return false, errors.New("job for " + unit + " failed")
	}
	return s.DiskSystemd.Start(ctx, unit)
}

// TestDecideIsWhatRunDoes: over the states a host can be in (fresh,
// applied, a --root tree applied, a failed first run that never started
// the machine, one that did, upgraded) and the manifests that can be
// given (the same, another), what Decide says before the run is what Run
// then does: the same action, and for a refusal the same error and exit
// code. A failed first run whose machine never started is replaced by
// another manifest without Force.
func TestDecideIsWhatRunDoes(t *testing.T) {
	broken := errors.New("kubelet: 404 Not Found (the test's bad pin)")
	type rootState struct {
		name string
		// make brings a fresh root to the state; it returns the deps
		// later runs use.
		make func(t *testing.T, root string) Deps
	}
	diskDeps := func(root string) Deps {
		deps, _, _, _ := applytest.Deps()
		deps.Systemd = applytest.NewDiskSystemd(root)
		return deps
	}
	run := func(t *testing.T, root, machine, version string, deps Deps, force bool) error {
		t.Helper()
		opts := applytest.VersionOptions(root, version, deps)
		opts.Force = force
		_, err := applytest.Run(context.Background(), applytest.UpgradePlan(machine, version), opts)
		return err
	}
	states := []rootState{
		{"fresh", func(t *testing.T, root string) Deps { return diskDeps(root) }},
		{"applied", func(t *testing.T, root string) Deps {
			deps := diskDeps(root)
			applytest.Must(t, run(t, root, "kube1", "A", deps, false))
			return deps
		}},
		{"root tree applied", func(t *testing.T, root string) Deps {
			// --root: no systemd, so no upgrade can switch machines.
			deps, _, _, _ := applytest.Deps()
			deps.Systemd, deps.Host = nil, nil
			applytest.Must(t, run(t, root, "kube1", "A", deps, false))
			return deps
		}},
		{"failed, never started", func(t *testing.T, root string) Deps {
			deps, _, _, dl := applytest.Deps()
			deps.Systemd = applytest.NewDiskSystemd(root)
			dl.Fail = map[string]error{"kubelet": broken}
			if err := run(t, root, "kube1", "A", deps, false); !errors.Is(err, broken) {
				t.Fatalf("the first run: %v, want the bad pin", err)
			}
			dl.Fail = nil
			return deps
		}},
		{"failed after the machine started", func(t *testing.T, root string) Deps {
			deps := diskDeps(root)
			failing := deps
			failing.Systemd = startFails{deps.Systemd.(*applytest.DiskSystemd)}
			if err := run(t, root, "kube1", "A", failing, false); err == nil {
				t.Fatal("the first run did not fail")
			}
			return deps
		}},
		{"upgraded", func(t *testing.T, root string) Deps {
			deps := diskDeps(root)
			applytest.Must(t, run(t, root, "kube1", "A", deps, false))
			applytest.Must(t, run(t, root, "kube1", "B", deps, false))
			return deps
		}},
	}
	type given struct {
		version string
		force   bool
	}
	want := map[string]map[given]provision.Action{
		"fresh":                            {{"A", false}: provision.ActionApply, {"B", false}: provision.ActionApply, {"A", true}: provision.ActionApply},
		"applied":                          {{"A", false}: provision.ActionAlreadyApplied, {"B", false}: provision.ActionUpgrade, {"A", true}: provision.ActionForce},
		"root tree applied":                {{"A", false}: provision.ActionAlreadyApplied, {"B", false}: provision.ActionRefuse, {"B", true}: provision.ActionForce},
		"failed, never started":            {{"A", false}: provision.ActionResume, {"B", false}: provision.ActionReplace},
		"failed after the machine started": {{"A", false}: provision.ActionResume, {"B", false}: provision.ActionRefuse, {"B", true}: provision.ActionForce},
		"upgraded":                         {{"B", false}: provision.ActionAlreadyApplied, {"A", false}: provision.ActionUpgrade, {"C", false}: provision.ActionUpgrade},
	}
	for _, st := range states {
		for g, wantAction := range want[st.name] {
			t.Run(st.name+"/"+g.version+map[bool]string{true: "/force"}[g.force], func(t *testing.T) {
				root := t.TempDir()
				applytest.PrepareRoot(t, root)
				deps := st.make(t, root)
				opts := applytest.VersionOptions(root, g.version, deps)
				opts.Force = g.force
				p := applytest.UpgradePlan("kube1", g.version)
				d, err := provision.Decide(p, opts)
				if err != nil {
					t.Fatal(err)
				}
				if d.Action != wantAction {
					t.Errorf("Decide: %s (%s), want %s", d.Action, d, wantAction)
				}
				res, did, err := provision.Apply(context.Background(), p, opts)
				if d.Action == provision.ActionRefuse {
					if err == nil || err.Error() != d.Err.Error() || ExitCode(err) != d.Exit || d.Exit != ExitInput {
						t.Errorf("Decide refused (exit %d: %v); Run: exit %d: %v", d.Exit, d.Err, ExitCode(err), err)
					}
					return
				}
				if err != nil {
					t.Fatalf("Decide: %s; Run failed: %v", d, err)
				}
				if did == nil || did.Action != d.Action || res.Machine == "" {
					t.Fatalf("Decide: %s; Run did %+v", d, did)
				}
				switch d.Action {
				case provision.ActionAlreadyApplied:
					if !res.AlreadyApplied {
						t.Errorf("Decide said already applied; Run applied")
					}
				case provision.ActionUpgrade:
					if res.Upgrade == nil || res.Upgrade.Outcome != state.OutcomeSwitched || res.Machine != d.Machine || res.Upgrade.From != d.From {
						t.Errorf("Decide: %s; Run: machine %s, upgrade %+v", d, res.Machine, res.Upgrade)
					}
				default:
					if res.AlreadyApplied || res.Upgrade != nil || res.Machine != d.Machine {
						t.Errorf("Decide: %s; Run: %+v", d, res)
					}
				}
				// Once done, the same manifest is applied: both say so.
				again, err := provision.Decide(p, opts)
				if err != nil || (again.Action != provision.ActionAlreadyApplied && !g.force) {
					t.Errorf("after the run, Decide says %v %v; want already applied", again, err)
				}
			})
		}
	}
}
