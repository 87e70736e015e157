// Package hostprep prepares the host for an nspawn machine: kernel modules,
// sysctls, the nftables ruleset, swap and host packages. Each function does
// one idempotent thing that the apply engine calls from a plan step; a second
// call with the same input changes nothing.
//
// Order matters and is the caller's: LoadModules (overlay, br_netfilter) must
// run before ApplySysctls, because the net.bridge.* keys exist only once
// br_netfilter is loaded.
package hostprep
