// Package host is the agent's Node on a real host: the node's state and
// its machines, through package provision (the code that nodespawn apply
// and nodespawn rollback run). It is apart from package agent so that
// linking the agent does not link provision and its cgo (go-nvml): the
// controller's tests run the real agent over scripted hosts.
package host

import (
	"context"
	"errors"

	"github.com/nodespawn/nodespawn/agent"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/upgrade"
)

// Host is the real agent.Node: the node under Root, through package provision
// (the code `nodespawn apply` and `nodespawn rollback` run).
type Host struct {
	Root        string
	ToolVersion string
}

func (h *Host) Status(ctx context.Context) (*agent.NodeStatus, error) {
	st, err := state.ReadMachines(h.Root)
	if err != nil {
		return nil, err
	}
	ns := &agent.NodeStatus{ActiveMachine: st.Active, Last: st.Last}
	if ns.ActiveDigest, err = provision.ConfigDigestOf(h.Root, st.Active); err != nil {
		return nil, err
	}
	if p, err := state.PlanOf(h.Root, st.Active); err != nil {
		return nil, err
	} else if p != nil {
		ns.NodeName = p.NodeName
	}
	if u := st.Upgrade; u != nil {
		ns.Switching = u.Phase != state.UpgradePreparing
		ns.Verifying = u.Phase == state.UpgradeVerifying
		if u.Phase == state.UpgradePreparing && u.Prepared != nil && u.From == st.Active {
			if ns.PreparedDigest, err = provision.ConfigDigestOf(h.Root, u.To); err != nil {
				return nil, err
			}
		}
	}
	if st.Previous != "" && st.Upgrade == nil {
		if ns.PreviousDigest, err = provision.ConfigDigestOf(h.Root, st.Previous); err != nil {
			return nil, err
		}
	}
	return ns, nil
}

func (h *Host) Resume(ctx context.Context) error {
	_, err := provision.Resume(ctx, h.Root, h.ToolVersion)
	return err
}

func (h *Host) Prepare(ctx context.Context, m *manifest.Manifest, digest string) error {
	return provision.PrepareConfig(ctx, h.Root, h.ToolVersion, m)
}

func (h *Host) Switch(ctx context.Context, digest string) error {
	_, err := provision.SwitchConfig(ctx, h.Root, h.ToolVersion, digest)
	return rolledBack(err)
}

func (h *Host) Rollback(ctx context.Context) error {
	_, err := provision.RollbackNode(ctx, h.Root, h.ToolVersion)
	return rolledBack(err)
}

func (h *Host) Agent() (*state.Agent, error) {
	s, err := state.Create(h.Root)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.Agent()
}

func (h *Host) WriteAgent(a *state.Agent) error {
	s, err := state.Create(h.Root)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.WriteAgent(a)
}

// rolledBackError is an upgrade error after which the node runs its old
// machine again.
type rolledBackError struct{ *upgrade.UpgradeError }

func (e rolledBackError) RolledBackTo() string { return e.From }
func (e rolledBackError) Unwrap() error        { return e.UpgradeError }

func rolledBack(err error) error {
	var ue *upgrade.UpgradeError
	if errors.As(err, &ue) && ue.RolledBack {
		return rolledBackError{ue}
	}
	return err
}
