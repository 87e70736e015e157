package redact

import (
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"https://mirror.example/k8s/kubelet", "https://mirror.example/k8s/kubelet"},
		{"http://user:PASSWORD@host/file", "http://user:<redacted>@host/file"},
		{"http://user:PASSWORD@host", "http://user:<redacted>@host"},
		{"http://TOKEN@host/file", "http://<redacted>@host/file"},
		{"http://user:@host/file", "http://user:@host/file"},
		{"http://user:p@ss@host:8080/file", "http://user:<redacted>@host:8080/file"},
		{"https://host/file?X-Amz-Signature=abc&b=c#frag", "https://host/file?<redacted>#frag"},
		{"https://u:p@host/f?sig=1", "https://u:<redacted>@host/f?<redacted>"},
		{"https://host/f?", "https://host/f?"},
		{"http://host/a@b/c", "http://host/a@b/c"},
		{"http://u:pw@host/%zz", "<unparsable URL>"},
		{"data:,http://u:pw@x", "data:,http://u:<redacted>@x"},
	} {
		if got := URL(tc.in); got != tc.want {
			t.Errorf("URL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestReplaceInSource: URLs in YAML and JSON source lines and in prose
// lose their secrets and nothing around them changes.
func TestReplaceInSource(t *testing.T) {
	mask := func(s string) string { return strings.Repeat("*", len(s)) }
	for _, tc := range []struct{ in, want string }{
		{"  url: http://user:PASSWORD@host/x", "  url: http://user:********@host/x"},
		{`{"source":"https://u:PASSWORD@h/x","hash":"sha256-1"}`, `{"source":"https://u:********@h/x","hash":"sha256-1"}`},
		// A closing bracket may belong to the query, so it is hidden too.
		{"- {source: 'http://u:pw@h/a', b: http://t0k3n@h2/b?q=1}", "- {source: 'http://u:**@h/a', b: http://*****@h2/b?****"},
		{"download from http://u:PASSWORD@h/x, then http://h/y", "download from http://u:********@h/x, then http://h/y"},
		{"no url here: user:pw@host", "no url here: user:pw@host"},
	} {
		if got := Replace(tc.in, mask); got != tc.want {
			t.Errorf("Replace(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
