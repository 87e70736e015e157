package manifest

import (
	"fmt"
	"math"
	"strconv"

	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// sizeRE is a byte size as the manifest writes one: a whole number with an
// optional binary (Ki, Mi, Gi, Ti) or decimal (K, M, G, T) suffix, as in
// Kubernetes quantities ("20Gi", "500M", "1073741824").
var sizeRE = lazyre.New(`^([0-9]+)(Ki|Mi|Gi|Ti|K|M|G|T)?$`)

var sizeUnits = map[string]int64{
	"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
	"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
}

// parseSize is v in bytes.
func parseSize(v string) (int64, error) {
	m := sizeRE().FindStringSubmatch(v)
	if m == nil {
		return 0, fmt.Errorf("%q is not a size like 20Gi, 500Mi or 1073741824", v)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	unit := sizeUnits[m[2]]
	if err != nil || n > math.MaxInt64/unit {
		return 0, fmt.Errorf("%q is too large", v)
	}
	return n * unit, nil
}

// Size is v, a size Load checked (machine.rootfs.maxUnpackedSize,
// minFreeSpace), in bytes; 0 when v is empty.
func Size(v string) int64 {
	if v == "" {
		return 0
	}
	n, err := parseSize(v)
	if err != nil {
		panic(fmt.Sprintf("manifest: size %q was not checked by Load: %v", v, err))
	}
	return n
}

// size checks a byte size of at least min bytes.
func (c *checker) size(p jsonpath.ContextPath, v string, min int64) {
	if v == "" {
		return
	}
	n, err := parseSize(v)
	switch {
	case err != nil:
		c.add(p, "%v", err)
	case n < min:
		c.add(p, "must be at least %d bytes", min)
	}
}
