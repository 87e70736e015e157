package v1alpha1

import "strings"

// DigestLabelValue is the value of LabelConfigDigest for a config digest
// ("sha256:<hex>"): the first 63 hex digits, since a label value holds
// neither a colon nor more than 63 characters. The controller and the
// agent both take it from here.
func DigestLabelValue(digest string) string {
	_, hex, ok := strings.Cut(digest, ":")
	if !ok {
		hex = digest
	}
	if len(hex) > 63 {
		hex = hex[:63]
	}
	return hex
}
