package command

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

func TestRunSuccess(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		args []string
		want string
	}{
		{"stdout", Options{}, []string{"-c", "echo hello; echo noise >&2"}, "hello\n"},
		{"stdin", Options{Stdin: strings.NewReader("from stdin")}, []string{"-c", "cat"}, "from stdin"},
		{"env overrides", Options{Env: []string{"HOME=/nowhere", "NS_X=1"}}, []string{"-c", `printf %s "$HOME $NS_X"`}, "/nowhere 1"},
		{"dir", Options{Dir: "/"}, []string{"-c", "pwd"}, "/\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := Exec{}.Run(context.Background(), tt.opts, "sh", tt.args...)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if string(out) != tt.want {
				t.Errorf("stdout = %q, want %q", out, tt.want)
			}
		})
	}
}

func TestRunFailure(t *testing.T) {
	var many strings.Builder
	for i := 1; i <= 30; i++ {
		fmt.Fprintf(&many, "echo line%d >&2; ", i)
	}
	tests := []struct {
		name         string
		opts         Options
		cmd          string
		args         []string
		wantCode     int
		wantIn       []string
		wantNotIn    []string
		wantNotFound bool
	}{
		{
			name:     "exit status and stderr",
			cmd:      "sh",
			args:     []string{"-c", "echo 'modprobe: FATAL: Module nope not found' >&2; exit 3"},
			wantCode: 3,
			wantIn:   []string{`sh -c`, "exit status 3", "modprobe: FATAL: Module nope not found"},
		},
		{
			name:      "stderr tail only",
			cmd:       "sh",
			args:      []string{"-c", many.String() + "exit 1"},
			wantCode:  1,
			wantIn:    []string{"line11", "line30", "[10 earlier lines omitted]"},
			wantNotIn: []string{"line10\n", "line1\n"},
		},
		{
			name:     "stdout when stderr empty",
			cmd:      "sh",
			args:     []string{"-c", "echo 'E: Unable to locate package nope'; exit 100"},
			wantCode: 100,
			wantIn:   []string{"E: Unable to locate package nope", "exit status 100"},
		},
		{
			name:      "secrets redacted",
			opts:      Options{Redact: []string{"abcdef.0123456789abcdef"}},
			cmd:       "sh",
			args:      []string{"-c", "echo token abcdef.0123456789abcdef rejected >&2; exit 1", "abcdef.0123456789abcdef"},
			wantCode:  1,
			wantIn:    []string{"<redacted>", "rejected"},
			wantNotIn: []string{"abcdef.0123456789abcdef"},
		},
		{
			name:         "not found",
			cmd:          "nodespawn-no-such-program",
			wantCode:     -1,
			wantIn:       []string{"nodespawn-no-such-program"},
			wantNotFound: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := RunWith(context.Background(), tt.opts, tt.cmd, tt.args...)
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v (%T), want *Error", err, err)
			}
			if ce.ExitCode != tt.wantCode {
				t.Errorf("ExitCode = %d, want %d", ce.ExitCode, tt.wantCode)
			}
			msg := err.Error()
			for _, s := range tt.wantIn {
				if !strings.Contains(msg, s) {
					t.Errorf("error %q does not contain %q", msg, s)
				}
			}
			for _, s := range tt.wantNotIn {
				if strings.Contains(msg, s) {
					t.Errorf("error %q contains %q", msg, s)
				}
			}
			if got := errors.Is(err, exec.ErrNotFound); got != tt.wantNotFound {
				t.Errorf("errors.Is(err, exec.ErrNotFound) = %v, want %v", got, tt.wantNotFound)
			}
		})
	}
}

func TestRunCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Run(ctx, "sleep", "60")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if !strings.Contains(err.Error(), "sleep 60") {
		t.Errorf("error %q does not name the command", err)
	}
}

func TestTailBufferKeepsEnd(t *testing.T) {
	tb := &tailBuffer{max: 16}
	for i := 0; i < 10; i++ {
		fmt.Fprintf(tb, "line %d\n", i)
	}
	if got, want := tb.String(), "line 8\nline 9\n"; got != want {
		t.Errorf("tail = %q, want %q", got, want)
	}
}

func TestQuote(t *testing.T) {
	tests := map[string]string{
		"plain":      "plain",
		"":           "''",
		"a b":        "'a b'",
		"it's":       `"it's"`,
		"--x=y/z:1,": "--x=y/z:1,",
	}
	for in, want := range tests {
		if got := quote(in); got != want {
			t.Errorf("quote(%q) = %q, want %q", in, got, want)
		}
	}
}
