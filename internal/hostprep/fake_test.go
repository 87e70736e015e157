package hostprep

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/nodespawn/nodespawn/internal/command"
)

// fakeRunner answers commands from a script keyed by the command line and
// records every call in order.
type fakeRunner struct {
	mu    sync.Mutex
	calls []string
	// respond returns stdout and an error for a command line; nil means
	// success with empty output.
	respond func(line string, n int) ([]byte, error)
	count   map[string]int
}

func (f *fakeRunner) Run(_ context.Context, opts command.Options, name string, args ...string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	line := strings.Join(append([]string{name}, args...), " ")
	if len(opts.Env) > 0 {
		line = strings.Join(opts.Env, " ") + " " + line
	}
	f.calls = append(f.calls, line)
	if f.count == nil {
		f.count = map[string]int{}
	}
	f.count[line]++
	if f.respond == nil {
		return nil, nil
	}
	return f.respond(line, f.count[line])
}

// failure builds the error the real runner returns for a non-zero exit.
func failure(line string, code int, stderr string) error {
	return &command.Error{Command: line, ExitCode: code, Stderr: stderr, Err: fmt.Errorf("exit status %d", code)}
}
