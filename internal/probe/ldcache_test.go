package probe

import (
	"os"
	"os/exec"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestLdCacheHostCrossCheck parses this machine's own binary cache and the
// text `ldconfig -p` prints from it: both readers must see the same entries.
func TestLdCacheHostCrossCheck(t *testing.T) {
	bin, err := os.ReadFile("/etc/ld.so.cache")
	if err != nil {
		t.Skipf("this machine has no readable /etc/ld.so.cache: %v", err)
	}
	text, err := exec.Command("ldconfig", "-p").Output()
	if err != nil {
		t.Fatalf("ldconfig -p: %v", err)
	}
	fromBin, err := parseLdCache(bin)
	if err != nil {
		t.Fatalf("parse binary cache: %v", err)
	}
	fromText, err := parseLdCache(text)
	if err != nil {
		t.Fatalf("parse ldconfig -p: %v", err)
	}
	if len(fromBin) == 0 {
		t.Fatal("binary cache parsed to no entries")
	}
	if diff := cmp.Diff(fromText, fromBin); diff != "" {
		t.Errorf("binary cache vs ldconfig -p (-text +binary):\n%s", diff)
	}
}
