package manifest

import "strings"

// AlternateMachine is the machine that takes turns with name in upgrades:
// an upgrade prepares it beside the running one and switches to it. A name
// ending in "1" pairs with the same name ending in "2" and back (kube1 <->
// kube2); any other name pairs with itself plus "-b" (node <-> node-b).
// Only machine.name as the manifest gives it is ever passed here, so the
// pair of a manifest never changes.
func AlternateMachine(name string) string {
	switch {
	case strings.HasSuffix(name, "1"):
		return name[:len(name)-1] + "2"
	case strings.HasSuffix(name, "2"):
		return name[:len(name)-1] + "1"
	}
	return name + "-b"
}

// MachinePair is the two machines of the manifest's machine.name: the name
// itself first, then its alternate.
func MachinePair(name string) [2]string { return [2]string{name, AlternateMachine(name)} }
