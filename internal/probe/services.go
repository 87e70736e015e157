package probe

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/plan"
)

// Units is the seam to the host's service manager. SystemUnits is the real
// one (systemd over D-Bus); tests pass a fake.
type Units interface {
	// UnitState returns unit's ActiveState ("active", "inactive",
	// "failed", ...), or "not-found" when the host has no such unit.
	UnitState(ctx context.Context, unit string) (string, error)
}

// SystemUnits returns the host's systemd.
func SystemUnits() Units { return systemdUnits{systemd.New(nil)} }

type systemdUnits struct{ bus *systemd.Bus }

func (u systemdUnits) UnitState(ctx context.Context, unit string) (string, error) {
	return u.bus.HostUnitState(ctx, unit)
}

// noUnits is used for a fake Root: the running systemd describes this
// host, not the tree under Root.
type noUnits struct{}

func (noUnits) UnitState(context.Context, string) (string, error) {
	return "", errNoUnits
}

var errNoUnits = errors.New("the service manager is not consulted for a Root other than /")

// nvswitchNodeNames matches the NVSwitch and NVLink device nodes directly
// under /dev: the switches' control node and one per switch
// (nvidia-nvswitchctl, nvidia-nvswitch0, ...), and the NVLink core's.
var nvswitchNodeNames = lazyre.New(`^(nvidia-nvswitch[0-9]+|nvidia-nvswitchctl|nvidia-nvlink)$`)

// dpkgStatus is Debian's and Ubuntu's package database.
const dpkgStatus = "/var/lib/dpkg/status"

// nvidiaServices adds to n what the host's service manager says about
// nvidia-persistenced and, on an NVSwitch host, nvidia-fabricmanager (with
// the installed Fabric Manager's version). A service manager that cannot
// be asked leaves them unknown, with a warning on an NVSwitch host.
func (p *prober) nvidiaServices(ctx context.Context, units Units, n *plan.NVIDIA) error {
	state := func(unit string) string {
		s, err := units.UnitState(ctx, unit)
		if err != nil {
			if !errors.Is(err, errNoUnits) {
				p.log.Warn("cannot ask systemd for a unit's state", "unit", unit, "error", err.Error())
			}
			return ""
		}
		return s
	}
	n.Persistenced = state(plan.PersistencedUnit)
	if !n.HasNVSwitch() {
		return nil
	}
	s := state(plan.FabricManagerUnit)
	if s == "" {
		return nil
	}
	version, err := p.fabricManagerVersion()
	if err != nil {
		return err
	}
	n.FabricManager = &plan.FabricManager{State: s, Version: version}
	if s != "active" {
		p.log.Warn("the GPUs are joined by NVSwitches but Fabric Manager does not run: CUDA fails with error 802 until it does", "unit", plan.FabricManagerUnit, "state", s)
	}
	return nil
}

// fabricManagerVersion is the version of the installed Fabric Manager
// package (nvidia-fabricmanager, or nvidia-fabricmanager-<branch> before
// driver 575) from dpkg's database, Debian revision and epoch left out:
// "570.124.06". "" when dpkg has none (an RPM host, say).
func (p *prober) fabricManagerVersion() (string, error) {
	b, err := readOptional(p.at(dpkgStatus))
	if err != nil || b == nil {
		return "", err
	}
	for _, stanza := range bytes.Split(b, []byte("\n\n")) {
		fields := map[string]string{}
		sc := bufio.NewScanner(bytes.NewReader(stanza))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && !strings.HasPrefix(k, " ") {
				fields[k] = strings.TrimSpace(v)
			}
		}
		name := fields["Package"]
		fm := name == "nvidia-fabricmanager" || strings.HasPrefix(name, "nvidia-fabricmanager-") && !strings.HasPrefix(name, "nvidia-fabricmanager-dev")
		if !fm || fields["Status"] != "install ok installed" {
			continue
		}
		v := fields["Version"]
		if _, after, ok := strings.Cut(v, ":"); ok {
			v = after
		}
		v, _, _ = strings.Cut(v, "-")
		return v, nil
	}
	return "", nil
}
