package mounts

import (
	"slices"
	"testing"
)

func TestParse(t *testing.T) {
	ms, err := parse([]byte(`22 1 0:21 / /sys rw,nosuid shared:2 - sysfs sysfs rw
98 30 0:55 / /var/lib/machines/a\040b rw,relatime shared:50 - overlay overlay rw,lowerdir=/l/2:/l/1,upperdir=/u,workdir=/w
bad line
`))
	if err != nil {
		t.Fatal(err)
	}
	want := []Mount{{"/sys", "sysfs", "rw"}, {"/var/lib/machines/a b", "overlay", "rw,lowerdir=/l/2:/l/1,upperdir=/u,workdir=/w"}}
	if !slices.Equal(ms, want) {
		t.Fatalf("parse = %+v, want %+v", ms, want)
	}
}

func TestUnescape(t *testing.T) {
	if got := Unescape(`/a\040b\011c\134`); got != "/a b\tc\\" {
		t.Fatalf("Unescape = %q", got)
	}
	if got := Unescape(`/trailing\04`); got != `/trailing\04` {
		t.Fatalf("a short escape is kept: %q", got)
	}
}
