package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

func TestLayoutTag(t *testing.T) {
	tests := []struct{ ref, want string }{
		{"bookworm", "bookworm"},
		{"127.0.0.1:5000/nodespawn/base:bookworm", "bookworm"},
		{"ghcr.io/nodespawn/base", "latest"},
		{"localhost:5000/base", "latest"},
	}
	for _, tt := range tests {
		if got := layoutTag(tt.ref); got != tt.want {
			t.Errorf("layoutTag(%q) = %q, want %q", tt.ref, got, tt.want)
		}
	}
}

func TestImageBuildLayoutTwice(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "hello"), []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	var digests []string
	for i := 0; i < 2; i++ {
		cmd := newImageCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&bytes.Buffer{})
		cmd.SetArgs([]string{"build", "--rootfs", root, "--ref", "base:v1", "--layout", t.TempDir()})
		if err := cmd.Execute(); err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(`^base:v1@(sha256:[0-9a-f]{64})\n$`).FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("output %q, want base:v1@sha256:...", out.String())
		}
		digests = append(digests, m[1])
	}
	if digests[0] != digests[1] {
		t.Errorf("two builds of one tree: %s and %s", digests[0], digests[1])
	}
}

// TestImageBuildBadFlags: a mistake in the flags is bad input, exit 2, and
// nothing is built.
func TestImageBuildBadFlags(t *testing.T) {
	root := t.TempDir()
	tests := []struct {
		name string
		args []string
		env  string
	}{
		{"no rootfs", []string{"image", "build", "--ref", "base:v1", "--layout", t.TempDir()}, ""},
		{"no ref", []string{"image", "build", "--rootfs", root}, ""},
		{"layout and plain http", []string{"image", "build", "--rootfs", root, "--ref", "base:v1", "--layout", t.TempDir(), "--plain-http"}, ""},
		{"bad platform", []string{"image", "build", "--rootfs", root, "--ref", "base:v1", "--layout", t.TempDir(), "--platform", "amd64"}, ""},
		{"bad SOURCE_DATE_EPOCH", []string{"image", "build", "--rootfs", root, "--ref", "base:v1", "--layout", t.TempDir()}, "yesterday"},
		{"unknown flag", []string{"image", "build", "--rootfs", root, "--ref", "base:v1", "--colour"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SOURCE_DATE_EPOCH", tt.env)
			if code, out, errOut := cli(t, "", tt.args...); code != exitBadInput || out != "" {
				t.Errorf("exit %d, stdout %q, want exit %d and nothing built; stderr:\n%s", code, out, exitBadInput, errOut)
			}
		})
	}
}
