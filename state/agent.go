package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/nodespawn/nodespawn/internal/layout"
)

// AgentFile is what nodespawn agent keeps across its restarts.
const AgentFile = layout.AgentStateFile

// Agent is the content of AgentFile: what the agent did last, so that a
// restart (a crash, a reboot, the switch itself) neither repeats a switch
// nor forgets how one ended.
type Agent struct {
	// SwitchID is the last switch grant the agent acted on: it is written
	// before the switch starts, and a grant with this ID is never acted
	// on again.
	SwitchID string `json:"switchID,omitempty"`
	// SwitchDigest is the config digest that switch was to.
	SwitchDigest string `json:"switchDigest,omitempty"`
	// Phase is the phase the agent last reported (the nodespawn.dev
	// NodePhase).
	Phase string `json:"phase,omitempty"`
	// LastError is the last operation's error.
	LastError string `json:"lastError,omitempty"`
	// Timings of the last prepare and switch.
	PrepareStarted  *time.Time `json:"prepareStarted,omitempty"`
	PrepareFinished *time.Time `json:"prepareFinished,omitempty"`
	SwitchStarted   *time.Time `json:"switchStarted,omitempty"`
	SwitchFinished  *time.Time `json:"switchFinished,omitempty"`
}

// Agent returns the agent's state; an empty one when it has none.
func (s *Store) Agent() (*Agent, error) {
	b, err := s.host.ReadFile(AgentFile)
	if errors.Is(err, fs.ErrNotExist) {
		return &Agent{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", s.host.Show(AgentFile), err)
	}
	var a Agent
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("read %s: %w", s.host.Show(AgentFile), err)
	}
	return &a, nil
}

// WriteAgent saves the agent's state (atomically, durably).
func (s *Store) WriteAgent(a *Agent) error {
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return fmt.Errorf("encode agent state: %w", err)
	}
	if err := s.host.MkdirAll(Dir, 0o700, -1, -1); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if err := s.host.WriteFile(AgentFile, append(b, '\n'), 0o644, -1, -1); err != nil {
		return fmt.Errorf("save agent state: %w", err)
	}
	return nil
}
