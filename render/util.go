package render

import (
	"encoding/base64"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

func base64Std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

var dns1123Subdomain = lazyre.New(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

// validNodeName reports whether s is a DNS-1123 subdomain, as node names must be.
func validNodeName(s string) bool {
	return len(s) > 0 && len(s) <= 253 && dns1123Subdomain().MatchString(s)
}

// systemdEscape escapes % for systemd unit files, where it starts a specifier.
func systemdEscape(s string) string { return strings.ReplaceAll(s, "%", "%%") }
