#!/bin/bash
# run.sh [go test flags]: runs the prepared e2e test binary inside a private
# network namespace that has only lo. qemu, the registry and the HTTP mirror
# all live there, so nothing the guest or a component dials can leave this
# machine. Run prepare.sh first (make e2e does both).
set -euo pipefail
cd "$(dirname "$0")"
WORK=$(realpath -m "${E2E_WORK:-.work}")
set -a
. "$WORK/env"
set +a
NS=nodespawn-e2e-$$
ip netns add "$NS"
trap 'ip netns del "$NS"' EXIT
ip netns exec "$NS" ip link set lo up
# The API server dials the node's InternalIP (the guest's slirp address) for
# logs and exec; qemu's hostfwd listens there. A local route, not an address,
# with source 127.0.0.1: slirp then sends the guest a SYN from 10.0.2.2, not
# from the guest's own address, which the guest would drop.
ip netns exec "$NS" ip route add local 10.0.2.15/32 dev lo src 127.0.0.1 table local
ip netns exec "$NS" "$WORK/e2e.test" -test.v -test.timeout 60m "$@"
