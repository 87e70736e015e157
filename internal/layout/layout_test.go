package layout

import "testing"

func TestPair(t *testing.T) {
	for _, tt := range []struct {
		name string
		want Pair
	}{
		{"kube1", Pair{"kube1", "kube2"}},
		{"kube2", Pair{"kube2", "kube1"}},
		{"node", Pair{"node", "node-b"}},
		// A name already ending in -b is a manifest's own name: its pair
		// never changes, so it is not node's.
		{"node-b", Pair{"node-b", "node-b-b"}},
		{"a12", Pair{"a12", "a11"}},
	} {
		p := PairOf(tt.name)
		if p != tt.want {
			t.Errorf("PairOf(%q) = %q, want %q", tt.name, p, tt.want)
		}
		for i, m := range p {
			other, ok := p.Other(m)
			if !ok || other != p[1-i] || !p.Has(m) {
				t.Errorf("%q.Other(%q) = %q, %v; want %q", p, m, other, ok, p[1-i])
			}
		}
		if other, ok := p.Other("elsewhere"); ok || p.Has("elsewhere") {
			t.Errorf("%q.Other of a machine not in it = %q, true", p, other)
		}
	}
	// A pair read from a record that has no alternate has no other.
	for _, m := range []string{"kube1", ""} {
		if other, ok := (Pair{"kube1", ""}).Other(m); ok {
			t.Errorf("Pair{kube1, \"\"}.Other(%q) = %q, true", m, other)
		}
	}
}

func TestMachinePaths(t *testing.T) {
	for got, want := range map[string]string{
		NspawnUnit("kube1"):      "systemd-nspawn@kube1.service",
		NspawnDropInDir("kube1"): "/etc/systemd/system/systemd-nspawn@kube1.service.d",
		NspawnFile("kube1"):      "/etc/systemd/nspawn/kube1.nspawn",
		EnableLink("kube1"):      "/etc/systemd/system/machines.target.wants/systemd-nspawn@kube1.service",
		NspawnTemplate:           "/usr/lib/systemd/system/systemd-nspawn@.service",
		MachineRoot("kube1"):     "/var/lib/machines/kube1",
		MachineStateDir("kube1"): "/var/lib/nodespawn/machines/kube1",
		OverlayDir("kube1"):      "/var/lib/nodespawn/machines/kube1/overlay",
		BPFFSDir("kube1"):        "/run/bpffs/kube1",
		FirstbootUnitPath:        "/etc/systemd/system/nodespawn-firstboot.service",
		FirstbootWantsLink:       "/etc/systemd/system/multi-user.target.wants/nodespawn-firstboot.service",
	} {
		if got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
	u := NodeUnits()
	u[0] = "changed"
	if NodeUnits()[0] != ContainerdUnit {
		t.Error("NodeUnits hands out a shared slice")
	}
}
