package main

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/nodespawn/nodespawn/internal/vtscreen"
)

// barRE matches a progress bar as internal/progress draws it, cut to any
// width: "name [====>   ]  45% ...".
var barRE = regexp.MustCompile(`\[[= >]{8,}`)

// TestApplyOnATerminal runs a real apply on a pseudo-terminal (80x24)
// while the mirror trickles every download, so progress bars are redrawn
// many times between step lines, then reads the terminal's screen as a
// person would see it at the end, scrollback included: every step line
// apply wrote is there and no bar is left.
func TestApplyOnATerminal(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	mir, _ := newMirror(t)
	// The same files, each sent in 20 pieces over ~0.6 s.
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := mir.files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		piece := max(1, len(b)/20)
		for len(b) > 0 {
			n := min(piece, len(b))
			if _, err := w.Write(b[:n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			b = b[n:]
			select {
			case <-r.Context().Done():
				return
			case <-time.After(30 * time.Millisecond):
			}
		}
	}))
	t.Cleanup(slow.Close)
	mf := filepath.Join(work, "node.yaml")
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, slow.URL, "")), 0o600); err != nil {
		t.Fatal(err)
	}

	cmd := cliCommand("apply", "-f", mf, "--root", filepath.Join(work, "root"))
	cmd.Env = append(cmd.Env, "TERM=xterm")
	tty, err := pty.StartWithSize(cmd, &pty.Winsize{Cols: 80, Rows: 24})
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	var raw bytes.Buffer
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(&raw, tty)
		copied <- err
	}()
	werr := cmd.Wait()
	// The pty reads EIO once the child and its descendants closed it.
	if err := <-copied; err != nil && !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading the terminal: %v", err)
	}
	if werr != nil {
		t.Fatalf("apply: %v\n%s", werr, raw.String())
	}

	screen := vtscreen.New(80, 24)
	screen.Write(raw.Bytes())
	lines := screen.Lines()
	shown := strings.Join(lines, "\n")

	// Every step line apply wrote to the terminal (erased or not).
	steps := regexp.MustCompile(`msg=step step=(\S+)`).FindAllStringSubmatch(raw.String(), -1)
	if len(steps) < 20 {
		t.Fatalf("only %d step lines written; want the whole plan's:\n%s", len(steps), raw.String())
	}
	if n := len(barRE.FindAllIndex(raw.Bytes(), -1)); n < 10 {
		t.Fatalf("only %d bars drawn: the downloads did not overlap the steps", n)
	}
	for _, m := range steps {
		if !strings.Contains(shown, "msg=step step="+m[1]+" ") {
			t.Errorf("step line %s is not on the terminal", m[1])
		}
	}
	for _, l := range lines {
		if barRE.MatchString(l) {
			t.Errorf("a progress bar stayed on the terminal: %q", l)
		}
	}
	if !strings.Contains(shown, "msg=\"apply finished\"") {
		t.Errorf("no closing line on the terminal")
	}
	if t.Failed() {
		t.Logf("the terminal shows:\n%s", shown)
	}
}
