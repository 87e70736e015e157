package manifest

import (
	"strconv"
	"strings"

	"golang.org/x/mod/semver"
)

// strictSemver returns v ("1.2.3" or "v1.2.3") as golang.org/x/mod/semver
// spells it ("v1.2.3") when it is a full semantic version:
// major.minor.patch, each without leading zeros and within 64 bits, with
// optional pre-release and build parts, at most 256 characters after the
// "v". The semver package alone also takes the short forms v1 and v1.2.
func strictSemver(v string) (string, bool) {
	v = strings.TrimPrefix(v, "v")
	if v == "" || len(v) > 256 {
		return "", false
	}
	w := "v" + v
	if !semver.IsValid(w) {
		return "", false
	}
	core := v
	if i := strings.IndexAny(v, "-+"); i >= 0 {
		core = v[:i]
	}
	nums := strings.Split(core, ".")
	if len(nums) != 3 {
		return "", false
	}
	for _, n := range nums {
		if _, err := strconv.ParseUint(n, 10, 64); err != nil {
			return "", false
		}
	}
	return w, true
}

// versionAtLeast reports whether v, a full semantic version, is min or
// later (pre-releases of min are earlier; build metadata is ignored).
func versionAtLeast(v, min string) bool {
	w, ok := strictSemver(v)
	return ok && semver.Compare(w, "v"+strings.TrimPrefix(min, "v")) >= 0
}
