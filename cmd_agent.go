package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/agent"
	"github.com/nodespawn/nodespawn/agent/host"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/provision"
)

// newAgentCmd is `nodespawn agent`: the node's side of a fleet rollout, a
// long-running service on the host (nodespawn install --agent).
func newAgentCmd() *cobra.Command {
	var (
		root, kubeconfig, nodeName string
		heartbeat                  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node's agent for fleet rollouts: act on this node's NodeSpawnNode (prepare, switch, roll back) and report",
		Long: `agent runs until stopped, as the systemd service ` + layout.AgentUnit + ` on the
host (nodespawn install --agent), outside the machines it switches. It
watches this node's NodeSpawnNode (named after the node), which the rollout
controller writes, and does what its spec allows through the same code as
nodespawn apply: it fetches the NodeSpawnConfig, refuses one whose manifest
does not hash to its digest, prepares the new machine beside the running
one, switches to it once per grant (spec.switchID), verifies the Node and
rolls back when it does not come back, or switches back to the kept
previous machine when that is the desired config. It reports every phase
in the status and labels the Node with its active config's digest.

It authenticates as the node: the kubelet's client certificate from the
node's state and the API server and CA of the running machine's manifest
(or, with an exec credential plugin, what the plugin prints in the
machine). --kubeconfig uses another identity instead.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			if filepath.Clean(root) != "/" {
				return usageError{errors.New("agent switches running machines: it works on / only")}
			}
			access, err := waitForNode(ctx, root)
			if err != nil {
				return err
			}
			name := nodeName
			if name == "" {
				name = access.NodeName
			}
			connect := func(ctx context.Context) (agent.API, error) {
				e, err := endpoint(ctx, access, kubeconfig)
				if err != nil {
					return nil, err
				}
				return agent.NewHTTPAPI(e)
			}
			a := &agent.Agent{
				API:       &agent.Refreshing{Connect: connect},
				Node:      &host.Host{Root: root, ToolVersion: version},
				Name:      name,
				Version:   version,
				Log:       slog.Default(),
				Heartbeat: heartbeat,
			}
			slog.Info("agent: running", "node", name, "apiServer", access.APIServer, "version", version)
			err = a.Run(ctx)
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "the host root (only / is supported)")
	cmd.Flags().StringVar(&kubeconfig, "kubeconfig", "", "a kubeconfig to use instead of the node's own credentials")
	cmd.Flags().StringVar(&nodeName, "node-name", "", "the node's name (default: the running machine's)")
	cmd.Flags().DurationVar(&heartbeat, "heartbeat", 30*time.Second, "how often the status is renewed")
	return cmd
}

// waitForNode waits until a machine runs the node (the first boot may
// still be making it).
func waitForNode(ctx context.Context, root string) (*provision.NodeAccess, error) {
	delay := time.Second
	for {
		access, err := provision.ActiveNodeAccess(root)
		if err == nil {
			return access, nil
		}
		slog.Warn("agent: no node to act for yet; waiting", "in", delay, "error", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Minute)
	}
}

// endpoint is the API server and identity: kubeconfig's, or the node's
// own credentials for its API server.
func endpoint(ctx context.Context, access *provision.NodeAccess, kubeconfig string) (agent.Endpoint, error) {
	if kubeconfig != "" {
		e, err := agent.KubeconfigEndpoint(kubeconfig)
		if err != nil {
			return e, fmt.Errorf("--kubeconfig: %w", err)
		}
		return e, nil
	}
	creds, err := access.Credentials(ctx)
	if err != nil {
		return agent.Endpoint{}, fmt.Errorf("the node's credentials: %w", err)
	}
	return agent.Endpoint{Server: access.APIServer, CAPEM: access.CAPEM, Credentials: creds}, nil
}
