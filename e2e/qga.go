//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"time"
)

// agent talks to qemu-guest-agent over the VM's virtio-serial socket: the
// harness runs commands in the guest with guest-exec, with no network path
// into the guest at all.
type agent struct {
	sock string
	conn net.Conn
	rd   *bufio.Reader
}

type qgaResponse struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// connect (re)connects and synchronises with the agent, retrying until the
// agent answers (it starts a few seconds into the boot) or ctx ends.
func (a *agent) connect(ctx context.Context) error {
	for {
		if err := a.trySync(); err == nil {
			return nil
		}
		a.close()
		select {
		case <-ctx.Done():
			return fmt.Errorf("guest agent on %s never answered: %w", a.sock, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

func (a *agent) trySync() error {
	if a.conn == nil {
		c, err := net.Dial("unix", a.sock)
		if err != nil {
			return err
		}
		a.conn, a.rd = c, bufio.NewReaderSize(c, 1<<20)
	}
	id := rand.Int64N(1 << 50)
	// 0xFF makes the agent drop any half-read command from an earlier
	// connection before it parses ours; the agent answers it with an
	// error, which the sync below skips like any other stale answer.
	if _, err := a.conn.Write([]byte{0xff}); err != nil {
		return err
	}
	var got int64
	if err := a.call(3*time.Second, "guest-sync", map[string]any{"id": id}, &got, func(r json.RawMessage) bool {
		var n int64
		return json.Unmarshal(r, &n) == nil && n == id
	}); err != nil {
		return err
	}
	return nil
}

func (a *agent) close() {
	if a.conn != nil {
		a.conn.Close()
		a.conn, a.rd = nil, nil
	}
}

// call sends one command and reads responses until accept says it is the
// answer. With accept, errors and stale answers (from a dropped connection
// or a parser reset) are skipped; without, the first answer counts.
func (a *agent) call(timeout time.Duration, cmd string, args any, out any, accept func(json.RawMessage) bool) error {
	if a.conn == nil {
		return errors.New("guest agent not connected")
	}
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	a.conn.SetDeadline(time.Now().Add(timeout))
	defer a.conn.SetDeadline(time.Time{})
	if _, err := a.conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("guest agent %s: %w", cmd, err)
	}
	for {
		line, err := a.rd.ReadBytes('\n')
		if err != nil {
			return fmt.Errorf("guest agent %s: %w", cmd, err)
		}
		var r qgaResponse
		if json.Unmarshal(line, &r) != nil {
			continue
		}
		if accept != nil {
			if r.Return == nil || !accept(r.Return) {
				continue
			}
		} else if r.Error != nil {
			return fmt.Errorf("guest agent %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		}
		if out != nil {
			return json.Unmarshal(r.Return, out)
		}
		return nil
	}
}

// execResult is a finished guest command.
type execResult struct {
	Code   int
	Stdout string
	Stderr string
}

// exec runs script with /bin/sh -c in the guest and waits for it.
func (a *agent) exec(ctx context.Context, script string) (execResult, error) {
	var started struct {
		PID int `json:"pid"`
	}
	args := map[string]any{"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}
	if err := a.call(30*time.Second, "guest-exec", args, &started, nil); err != nil {
		return execResult{}, err
	}
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			OutData  string `json:"out-data"`
			ErrData  string `json:"err-data"`
		}
		if err := a.call(30*time.Second, "guest-exec-status", map[string]any{"pid": started.PID}, &st, nil); err != nil {
			return execResult{}, err
		}
		if st.Exited {
			out, _ := base64.StdEncoding.DecodeString(st.OutData)
			errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
			code := st.ExitCode
			if st.Signal != 0 {
				code = 128 + st.Signal
			}
			return execResult{Code: code, Stdout: string(out), Stderr: string(errOut)}, nil
		}
		select {
		case <-ctx.Done():
			return execResult{}, fmt.Errorf("guest command %q: %w", script, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
