package manifest_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/manifest"
)

// BenchmarkLoadOneLineJSONManyProblems loads a one-line JSON manifest
// with n bad labels: each problem's snippet is a window of the same long
// line, which is redacted once, not once per problem.
func BenchmarkLoadOneLineJSONManyProblems(b *testing.B) {
	for _, n := range []int{100, 1000, 3000} {
		var labels []string
		for i := range n {
			labels = append(labels, fmt.Sprintf(`"bad label %d": "x"`, i))
		}
		doc := `{"apiVersion": "nodespawn.dev/v1alpha1", "kind": "Node", "kubernetes": {"apiServer": "https://10.0.0.1:6443", "caCert": ` +
			ca + `, "auth": {"bootstrapToken": "abcdef.0123456789abcdef"}, "labels": {` + strings.Join(labels, ", ") + `}}}`
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				if _, err := manifest.Load("one-line.json", []byte(doc)); err == nil {
					b.Fatal("bad labels accepted")
				}
			}
		})
	}
}
