package v1alpha1

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
)

func TestDigestLabelValueIsALabelValue(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	v := DigestLabelValue(d)
	if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
		t.Fatalf("%q: %v", v, errs)
	}
	if !strings.HasPrefix(strings.TrimPrefix(d, "sha256:"), v) || len(v) != 63 {
		t.Errorf("%q is not the digest's first 63 hex digits", v)
	}
}
