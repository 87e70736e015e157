package confine

import (
	"os"
	"testing"
)

func TestP(t *testing.T) {
	d := t.TempDir()
	os.WriteFile(d+"/f", []byte("x"), 0o644)
	r, err := Open(d)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		t.Log(r.Link("f", "g"))
	}
	es, _ := os.ReadDir(d)
	for _, e := range es {
		t.Log(e.Name())
	}
}
