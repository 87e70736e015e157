package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLogTimestamps: log lines into a regular file carry their time (no
// one else records it); into a pipe, as to the journal or a CI log, they
// do not (the reader stamps them).
func TestLogTimestamps(t *testing.T) {
	defer slog.SetDefault(slog.Default())
	f, err := os.Create(filepath.Join(t.TempDir(), "run.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := setupLogging(f, "info"); err != nil {
		t.Fatal(err)
	}
	slog.Info("into a file")
	b, err := os.ReadFile(f.Name())
	if err != nil || !strings.HasPrefix(string(b), "time=") || !strings.Contains(string(b), `msg="into a file"`) {
		t.Errorf("a log line into a file: %q (%v), want it to start with time=", b, err)
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := setupLogging(w, "info"); err != nil {
		t.Fatal(err)
	}
	slog.Info("into a pipe")
	w.Close()
	b, err = io.ReadAll(r)
	if err != nil || string(b) != "level=INFO msg=\"into a pipe\"\n" {
		t.Errorf("a log line into a pipe: %q (%v), want no time", b, err)
	}
}
