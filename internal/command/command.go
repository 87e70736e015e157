// Package command runs external programs for nodespawn. It is the one place
// that does: every failure it returns names the command line, the exit status
// and the tail of what the program wrote to stderr, so no caller ever reports
// a bare "exit status 1".
package command

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// tailLines is how many trailing stderr lines an Error keeps; the end of a
// program's output is where it says why it failed.
const tailLines = 20

// tailBytes bounds the stderr kept in memory for a chatty program (apt-get).
const tailBytes = 64 << 10

// waitDelay is how long Run waits for output pipes after the process exited
// or was killed, so a grandchild that inherited them cannot hang the caller.
const waitDelay = 5 * time.Second

// Options are the optional parts of a command invocation.
type Options struct {
	// Env entries ("KEY=value") are added to the current environment; an
	// entry replaces an inherited variable of the same name.
	Env []string
	// Stdin, when set, is the program's standard input; otherwise it reads
	// from the null device.
	Stdin io.Reader
	// Dir is the working directory; empty means the current one.
	Dir string
	// Redact lists secret values (tokens, passwords) replaced by <redacted>
	// wherever the command line or its output appears in errors and logs.
	Redact []string
}

// Runner runs a program and returns its standard output. Exec is the real
// one; tests at a caller's seam pass a RunnerFunc.
type Runner interface {
	Run(ctx context.Context, opts Options, name string, args ...string) (stdout []byte, err error)
}

// RunnerFunc adapts a function to a Runner (fakes in tests).
type RunnerFunc func(ctx context.Context, opts Options, name string, args ...string) ([]byte, error)

// Run calls f.
func (f RunnerFunc) Run(ctx context.Context, opts Options, name string, args ...string) ([]byte, error) {
	return f(ctx, opts, name, args...)
}

// Exec is the Runner that starts real processes.
type Exec struct{}

// Run starts name with args, waits for it and returns its standard output.
// A failure is an *Error.
func (Exec) Run(ctx context.Context, opts Options, name string, args ...string) ([]byte, error) {
	return RunWith(ctx, opts, name, args...)
}

// Run runs name with args and no options; see RunWith.
func Run(ctx context.Context, name string, args ...string) (stdout []byte, err error) {
	return RunWith(ctx, Options{}, name, args...)
}

// RunWith runs name with args and opts, waits for it and returns its
// standard output. When the program cannot start, exits non-zero, or ctx
// ends first, the error is an *Error carrying the (redacted) command line,
// the exit status and the last lines of stderr.
func RunWith(ctx context.Context, opts Options, name string, args ...string) (stdout []byte, err error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = opts.Dir
	cmd.Stdin = opts.Stdin
	if len(opts.Env) > 0 {
		// exec.Cmd keeps the last of duplicate keys, so these override.
		cmd.Env = append(os.Environ(), opts.Env...)
	}
	var out bytes.Buffer
	stderr := &tailBuffer{max: tailBytes}
	cmd.Stdout = &out
	cmd.Stderr = stderr
	cmd.WaitDelay = waitDelay

	line := redact(commandLine(name, args), opts.Redact)
	slog.DebugContext(ctx, "running command", "command", line)
	runErr := cmd.Run()
	if runErr == nil {
		return out.Bytes(), nil
	}
	e := &Error{Command: line, ExitCode: -1, Err: runErr}
	var exitErr *exec.ExitError
	if errors.As(runErr, &exitErr) {
		e.ExitCode = exitErr.ExitCode()
	}
	if ctx.Err() != nil {
		e.Err = fmt.Errorf("%w (%v)", ctx.Err(), runErr)
	}
	tail := stderr.String()
	if strings.TrimSpace(tail) == "" {
		// Some programs (apt-get, dpkg-query) explain failures on stdout.
		tail = out.String()
	}
	e.Stderr = redact(lastLines(tail, tailLines), opts.Redact)
	return out.Bytes(), e
}

// Error is a command that failed to start, exited non-zero or was cancelled.
type Error struct {
	// Command is the command line, shell-quoted, secrets redacted.
	Command string
	// ExitCode is the exit status, or -1 when the program did not exit by
	// itself (not found, killed, cancelled).
	ExitCode int
	// Stderr is the trimmed tail of standard error (or of standard output
	// when stderr was empty), secrets redacted.
	Stderr string
	// Err is the underlying error from os/exec or the context.
	Err error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "command %q failed: %v", e.Command, e.Err)
	if e.Stderr != "" {
		b.WriteString(": ")
		b.WriteString(e.Stderr)
	}
	return b.String()
}

// Unwrap returns the underlying error (an *exec.ExitError, exec.ErrNotFound,
// context.Canceled, ...).
func (e *Error) Unwrap() error { return e.Err }

// commandLine renders name and args as a shell would need them typed.
func commandLine(name string, args []string) string {
	parts := make([]string, 0, 1+len(args))
	for _, a := range append([]string{name}, args...) {
		parts = append(parts, quote(a))
	}
	return strings.Join(parts, " ")
}

func quote(s string) string {
	if s == "" {
		return "''"
	}
	if strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./:=,+@%^", r))
	}) < 0 {
		return s
	}
	if !strings.ContainsRune(s, '\'') {
		return "'" + s + "'"
	}
	return strconv.Quote(s)
}

func redact(s string, secrets []string) string {
	for _, v := range secrets {
		if v != "" {
			s = strings.ReplaceAll(s, v, "<redacted>")
		}
	}
	return s
}

// lastLines returns the last n non-empty-trailing lines of s, trimmed.
func lastLines(s string, n int) string {
	s = strings.TrimSpace(s)
	if s == "" {
		return ""
	}
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[%d earlier lines omitted]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max       int
	buf       []byte
	truncated bool
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.truncated = true
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	if !t.truncated {
		return string(t.buf)
	}
	// Drop the partial first line left by truncation.
	if i := bytes.IndexByte(t.buf, '\n'); i >= 0 {
		return string(t.buf[i+1:])
	}
	return string(t.buf)
}
