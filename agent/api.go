package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
)

// API is what the agent asks of the API server: its own NodeSpawnNode
// (read, watched, its status patched), a NodeSpawnConfig by name, and a
// label on its own Node. Tests stand in for it; RestAPI is the real one.
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
}

// RestAPI is API over client-go's REST client: the nodespawn.dev types
// through their own scheme, the Node through a raw merge patch, so that
// neither the typed clientset nor controller-runtime is linked in.
type RestAPI struct {
	ns   rest.Interface
	core rest.Interface
}

var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
)

func init() {
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		panic(err)
	}
	// The core API's errors (metav1.Status) decode too.
	metav1.AddToGroupVersion(scheme, coreV1)
}

// coreV1 is the core API group's version, where Nodes are.
var coreV1 = schema.GroupVersion{Version: "v1"}

// NewRestAPI makes the clients for cfg (the node's credentials).
func NewRestAPI(cfg *rest.Config) (*RestAPI, error) {
	nc := rest.CopyConfig(cfg)
	nc.GroupVersion = &v1alpha1.GroupVersion
	nc.APIPath = "/apis"
	nc.NegotiatedSerializer = codecs.WithoutConversion()
	if nc.UserAgent == "" {
		nc.UserAgent = "nodespawn-agent"
	}
	ns, err := rest.RESTClientFor(nc)
	if err != nil {
		return nil, err
	}
	cc := rest.CopyConfig(nc)
	cc.GroupVersion = &coreV1
	cc.APIPath = "/api"
	core, err := rest.RESTClientFor(cc)
	if err != nil {
		return nil, err
	}
	return &RestAPI{ns: ns, core: core}, nil
}

func (a *RestAPI) GetNode(ctx context.Context, name string) (*v1alpha1.NodeSpawnNode, error) {
	var n v1alpha1.NodeSpawnNode
	err := a.ns.Get().Resource(v1alpha1.ResourceNodes).Name(name).Do(ctx).Into(&n)
	return &n, err
}

func (a *RestAPI) WatchNode(ctx context.Context, name, resourceVersion string) (watch.Interface, error) {
	opts := metav1.ListOptions{
		Watch:           true,
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", name).String(),
		ResourceVersion: resourceVersion,
	}
	return a.ns.Get().Resource(v1alpha1.ResourceNodes).VersionedParams(&opts, metav1.ParameterCodec).Watch(ctx)
}

func (a *RestAPI) GetConfig(ctx context.Context, name string) (*v1alpha1.NodeSpawnConfig, error) {
	var c v1alpha1.NodeSpawnConfig
	err := a.ns.Get().Resource(v1alpha1.ResourceConfigs).Name(name).Do(ctx).Into(&c)
	return &c, err
}

func (a *RestAPI) PatchStatus(ctx context.Context, name string, st *v1alpha1.NodeSpawnNodeStatus) error {
	// The agent owns the status: every field it reports, null for the
	// ones it no longer has (a merge patch leaves out what is absent).
	b, err := json.Marshal(map[string]any{"status": statusPatch(st)})
	if err != nil {
		return err
	}
	return a.ns.Patch(types.MergePatchType).Resource(v1alpha1.ResourceNodes).Name(name).SubResource("status").Body(b).Do(ctx).Error()
}

func (a *RestAPI) LabelNode(ctx context.Context, name, key, value string) error {
	var v any = value
	if value == "" {
		v = nil
	}
	b, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{key: v}}})
	if err != nil {
		return err
	}
	return a.core.Patch(types.MergePatchType).Resource("nodes").Name(name).Body(b).Do(ctx).Error()
}

// statusPatch is st as a JSON object in which every member the agent
// writes is present: the ones st leaves empty as null, so that the
// merge patch removes them.
func statusPatch(st *v1alpha1.NodeSpawnNodeStatus) map[string]any {
	b, err := json.Marshal(st)
	if err != nil {
		panic(fmt.Sprintf("agent: encode status: %v", err))
	}
	out := map[string]any{}
	_ = json.Unmarshal(b, &out)
	for _, k := range []string{"phase", "activeDigest", "activeMachine", "preparedDigest", "previousDigest", "switchID", "conditions",
		"lastError", "prepareStarted", "prepareFinished", "switchStarted", "switchFinished", "heartbeat", "agentVersion"} {
		if _, ok := out[k]; !ok {
			out[k] = nil
		}
	}
	return out
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
