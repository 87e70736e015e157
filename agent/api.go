package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
)

// API is what the agent asks of the API server: its own NodeSpawnNode
// (read, watched, its status patched), a NodeSpawnConfig by name, and a
// label on its own Node. Tests stand in for it; HTTPAPI is the real one.
type API interface {
	GetNode(ctx context.Context, name string) (*v1alpha1.NodeSpawnNode, error)
	// WatchNode watches the NodeSpawnNode name from resourceVersion.
	WatchNode(ctx context.Context, name, resourceVersion string) (watch.Interface, error)
	GetConfig(ctx context.Context, name string) (*v1alpha1.NodeSpawnConfig, error)
	// PatchStatus replaces the NodeSpawnNode's status (a merge patch of
	// the status subresource).
	PatchStatus(ctx context.Context, name string, st *v1alpha1.NodeSpawnNodeStatus) error
	// LabelNode sets (or with value "" removes) a label on the Node.
	LabelNode(ctx context.Context, name, key, value string) error
	// Event records an Event about the Node name (where kubectl describe
	// node and the controller's Events show it): eventType is Normal or
	// Warning, reason a CamelCase word.
	Event(ctx context.Context, name, eventType, reason, message string) error
}

// Refreshing is an API whose clients are made anew from Connect every
// Refresh (default 10m) and after the API server refused the
// credentials: kubelet rotates its client certificate, and the agent
// runs for months.
type Refreshing struct {
	Connect func(ctx context.Context) (API, error)
	Refresh time.Duration
	Now     func() time.Time

	mu    sync.Mutex
	api   API
	built time.Time
}

func (r *Refreshing) get(ctx context.Context) (API, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now
	if r.Now != nil {
		now = r.Now
	}
	every := r.Refresh
	if every <= 0 {
		every = 10 * time.Minute
	}
	if r.api == nil || now().Sub(r.built) > every {
		api, err := r.Connect(ctx)
		if err != nil {
			return nil, fmt.Errorf("connect to the API server: %w", err)
		}
		r.api, r.built = api, now()
	}
	return r.api, nil
}

// seen drops the clients after the API server refused the credentials.
func (r *Refreshing) seen(err error) error {
	if apierrors.IsUnauthorized(err) {
		r.mu.Lock()
		r.api = nil
		r.mu.Unlock()
	}
	return err
}

func (r *Refreshing) GetNode(ctx context.Context, name string) (*v1alpha1.NodeSpawnNode, error) {
	api, err := r.get(ctx)
	if err != nil {
		return nil, err
	}
	n, err := api.GetNode(ctx, name)
	return n, r.seen(err)
}

func (r *Refreshing) WatchNode(ctx context.Context, name, rv string) (watch.Interface, error) {
	api, err := r.get(ctx)
	if err != nil {
		return nil, err
	}
	w, err := api.WatchNode(ctx, name, rv)
	return w, r.seen(err)
}

func (r *Refreshing) GetConfig(ctx context.Context, name string) (*v1alpha1.NodeSpawnConfig, error) {
	api, err := r.get(ctx)
	if err != nil {
		return nil, err
	}
	c, err := api.GetConfig(ctx, name)
	return c, r.seen(err)
}

func (r *Refreshing) PatchStatus(ctx context.Context, name string, st *v1alpha1.NodeSpawnNodeStatus) error {
	api, err := r.get(ctx)
	if err != nil {
		return err
	}
	return r.seen(api.PatchStatus(ctx, name, st))
}

func (r *Refreshing) LabelNode(ctx context.Context, name, key, value string) error {
	api, err := r.get(ctx)
	if err != nil {
		return err
	}
	return r.seen(api.LabelNode(ctx, name, key, value))
}

func (r *Refreshing) Event(ctx context.Context, name, eventType, reason, message string) error {
	api, err := r.get(ctx)
	if err != nil {
		return err
	}
	return r.seen(api.Event(ctx, name, eventType, reason, message))
}
