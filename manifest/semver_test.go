package manifest

import (
	"strings"
	"testing"
)

// The cases where a strict semantic version differs from what
// golang.org/x/mod/semver takes alone, and the limits the earlier parser
// (Masterminds/semver's StrictNewVersion) had; a differential run over
// 300,000 generated strings found no other difference.
func TestStrictSemver(t *testing.T) {
	for v, want := range map[string]bool{
		"1.2.3":                             true,
		"v1.2.3":                            true,
		"vv1.2.3":                           false,
		"1.2.3-rc.1+build.5":                true,
		"1.2.3+build":                       true,
		"1.2":                               false, // semver.IsValid takes v1.2
		"v1":                                false, // and v1
		"1.2-rc.1":                          false,
		"01.2.3":                            false,
		"1.2.3-01":                          false,
		"1.2.3-0":                           true,
		"1.2.3+01":                          true, // build identifiers may have leading zeros
		"1.2.3-a..b":                        false,
		"1.2.3+":                            false,
		"1.2.3.4":                           false,
		"":                                  false,
		"v":                                 false,
		"18446744073709551615.0.0":          true,
		"18446744073709551616.0.0":          false, // over 64 bits
		"1.1.1-" + strings.Repeat("a", 250): true,  // 256 characters
		"1.1.1-" + strings.Repeat("a", 251): false,
	} {
		if _, got := strictSemver(v); got != want {
			t.Errorf("strictSemver(%q) = %v, want %v", v, got, want)
		}
	}
}

func TestVersionAtLeast(t *testing.T) {
	for _, c := range []struct {
		v, min string
		want   bool
	}{
		{"2.4.0", "2.4.0", true},
		{"v2.4.0", "2.4.0", true},
		{"2.4.0-rc.1", "2.4.0", false},
		{"2.4.0+meta", "2.4.0", true},
		{"2.3.99", "2.4.0", false},
		{"10.0.0", "2.4.0", true},
		{"1.7.20", MinContainerdVersion, false},
		{"2.4", "2.0.0", false}, // not a full version
	} {
		if got := versionAtLeast(c.v, c.min); got != c.want {
			t.Errorf("versionAtLeast(%q, %q) = %v, want %v", c.v, c.min, got, c.want)
		}
	}
}
