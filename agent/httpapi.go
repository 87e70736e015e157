package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/kubecheck"
)

// Endpoint is an API server and who the agent is to it.
type Endpoint struct {
	// Server is the API server's URL (https://host:port).
	Server string
	// CAPEM is the cluster CA the server's certificate is verified
	// against (never the system roots).
	CAPEM       []byte
	Credentials kubecheck.Credentials
}

// HTTPAPI is API over the project's HTTP transport (httpx) with the
// nodespawn.dev types as JSON: a handful of requests (get, merge patch,
// watch) that client-go would add several MiB to the binary for.
type HTTPAPI struct {
	base   *url.URL
	client *http.Client
	creds  kubecheck.Credentials
}

// NewHTTPAPI is the API at e.
func NewHTTPAPI(e Endpoint) (*HTTPAPI, error) {
	u, err := url.Parse(e.Server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("API server URL %s: want https://host[:port]", httpx.Redact(e.Server))
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(e.CAPEM) {
		return nil, errors.New("the cluster CA holds no PEM certificate")
	}
	opts := []httpx.Option{httpx.WithRoots(pool)}
	c := e.Credentials
	switch {
	case len(c.CertPEM) > 0:
		cert, err := tls.X509KeyPair(c.CertPEM, c.KeyPEM)
		if err != nil {
			return nil, fmt.Errorf("client certificate %s: %w", c, err)
		}
		opts = append(opts, httpx.WithClientCert(cert))
	case c.Token == "":
		return nil, errors.New("no credentials: want a client certificate or a bearer token")
	}
	u.RawQuery, u.Fragment = "", ""
	return &HTTPAPI{base: u, creds: c, client: &http.Client{
		Transport: httpx.NewTransport(opts...),
		// The API server does not redirect these requests; a redirect
		// would take the credentials elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}, nil
}

var nodesGR = schema.GroupResource{Group: v1alpha1.GroupVersion.Group, Resource: v1alpha1.ResourceNodes}

// nsPath is the path of a nodespawn.dev resource (and name, subresource).
func nsPath(resource string, rest ...string) []string {
	return append([]string{"apis", v1alpha1.GroupVersion.Group, v1alpha1.GroupVersion.Version, resource}, rest...)
}

// do sends one request; an answer other than 2xx is an apierrors
// StatusError (apierrors.IsNotFound and the like work on it).
func (a *HTTPAPI) do(ctx context.Context, method string, path []string, q url.Values, body []byte, gr schema.GroupResource, name string) (*http.Response, error) {
	u := a.base.JoinPath(path...)
	u.RawQuery = q.Encode()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "nodespawn-agent")
	if body != nil {
		ct := "application/merge-patch+json"
		if method == http.MethodPost {
			ct = "application/json"
		}
		req.Header.Set("Content-Type", ct)
	}
	if a.creds.Token != "" {
		req.Header.Set("Authorization", "Bearer "+a.creds.Token)
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, "/"+strings.Join(path, "/"), kubecheck.TransportError(httpx.WithoutURL(err), a.creds))
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var st metav1.Status
	if json.Unmarshal(b, &st) == nil && st.Kind == "Status" {
		return nil, &apierrors.StatusError{ErrStatus: st}
	}
	return nil, apierrors.NewGenericServerResponse(resp.StatusCode, method, gr, name, strings.TrimSpace(string(b)), 0, false)
}

// get reads the object at path into out.
func (a *HTTPAPI) get(ctx context.Context, path []string, gr schema.GroupResource, name string, out any) error {
	resp, err := a.do(ctx, http.MethodGet, path, nil, nil, gr, name)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(out); err != nil {
		return fmt.Errorf("decode %s %s: %w", gr, name, err)
	}
	return nil
}

func (a *HTTPAPI) patch(ctx context.Context, path []string, gr schema.GroupResource, name string, patch any) error {
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	resp, err := a.do(ctx, http.MethodPatch, path, nil, b, gr, name)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 8<<20))
	return resp.Body.Close()
}

func (a *HTTPAPI) GetNode(ctx context.Context, name string) (*v1alpha1.NodeSpawnNode, error) {
	var n v1alpha1.NodeSpawnNode
	return &n, a.get(ctx, nsPath(v1alpha1.ResourceNodes, name), nodesGR, name, &n)
}

func (a *HTTPAPI) GetConfig(ctx context.Context, name string) (*v1alpha1.NodeSpawnConfig, error) {
	var c v1alpha1.NodeSpawnConfig
	gr := schema.GroupResource{Group: v1alpha1.GroupVersion.Group, Resource: v1alpha1.ResourceConfigs}
	return &c, a.get(ctx, nsPath(v1alpha1.ResourceConfigs, name), gr, name, &c)
}

func (a *HTTPAPI) PatchStatus(ctx context.Context, name string, st *v1alpha1.NodeSpawnNodeStatus) error {
	// The agent owns the status: every field it reports, null for the
	// ones it no longer has (a merge patch leaves out what is absent).
	return a.patch(ctx, nsPath(v1alpha1.ResourceNodes, name, "status"), nodesGR, name, map[string]any{"status": statusPatch(st)})
}

func (a *HTTPAPI) LabelNode(ctx context.Context, name, key, value string) error {
	var v any = value
	if value == "" {
		v = nil
	}
	return a.patch(ctx, []string{"api", "v1", "nodes", name}, schema.GroupResource{Resource: "nodes"}, name,
		map[string]any{"metadata": map[string]any{"labels": map[string]any{key: v}}})
}

// eventMessageMax bounds an Event's message (the API server refuses
// long ones; the whole error is in the status).
const eventMessageMax = 1000

func (a *HTTPAPI) Event(ctx context.Context, name, eventType, reason, message string) error {
	if len(message) > eventMessageMax {
		message = message[:eventMessageMax-3] + "..."
	}
	now := time.Now().UTC()
	ts := now.Format(time.RFC3339)
	// A core/v1 Event as kubelet writes one about its Node (the Node's
	// UID is its name, which is what kubectl describe node looks for),
	// as JSON: k8s.io/api/core/v1 would add megabytes for one type.
	ev := map[string]any{
		"apiVersion": "v1",
		"kind":       "Event",
		"metadata": map[string]any{
			"name":      fmt.Sprintf("%s.%x", name, now.UnixNano()),
			"namespace": metav1.NamespaceDefault,
		},
		"involvedObject":     map[string]any{"apiVersion": "v1", "kind": "Node", "name": name, "uid": name},
		"reason":             reason,
		"message":            message,
		"type":               eventType,
		"source":             map[string]any{"component": "nodespawn-agent", "host": name},
		"reportingComponent": "nodespawn.dev/agent",
		"reportingInstance":  name,
		"firstTimestamp":     ts,
		"lastTimestamp":      ts,
		"count":              1,
	}
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	resp, err := a.do(ctx, http.MethodPost, []string{"api", "v1", "namespaces", metav1.NamespaceDefault, "events"}, nil, b, schema.GroupResource{Resource: "events"}, name)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.Body.Close()
}

// watchTimeout makes the API server end each watch after 5 minutes: the
// agent watches again (with fresh credentials, Refreshing).
const watchTimeout = "300"

func (a *HTTPAPI) WatchNode(ctx context.Context, name, resourceVersion string) (watch.Interface, error) {
	q := url.Values{
		"watch":          {"1"},
		"fieldSelector":  {"metadata.name=" + name},
		"timeoutSeconds": {watchTimeout},
	}
	if resourceVersion != "" {
		q.Set("resourceVersion", resourceVersion)
	}
	ctx, cancel := context.WithCancel(ctx)
	resp, err := a.do(ctx, http.MethodGet, nsPath(v1alpha1.ResourceNodes), q, nil, nodesGR, name)
	if err != nil {
		cancel()
		return nil, err
	}
	w := &streamWatch{ch: make(chan watch.Event), cancel: cancel}
	go w.read(ctx, resp.Body)
	return w, nil
}

// streamWatch is a watch response: one JSON event after another.
type streamWatch struct {
	ch     chan watch.Event
	cancel context.CancelFunc
	once   sync.Once
}

func (w *streamWatch) Stop()                          { w.once.Do(w.cancel) }
func (w *streamWatch) ResultChan() <-chan watch.Event { return w.ch }

func (w *streamWatch) read(ctx context.Context, body io.ReadCloser) {
	defer close(w.ch)
	defer body.Close()
	dec := json.NewDecoder(body)
	for {
		var ev struct {
			Type   watch.EventType `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := dec.Decode(&ev); err != nil {
			return
		}
		var obj runtime.Object
		if ev.Type == watch.Error {
			st := &metav1.Status{}
			_ = json.Unmarshal(ev.Object, st)
			obj = st
		} else {
			n := &v1alpha1.NodeSpawnNode{}
			if err := json.Unmarshal(ev.Object, n); err != nil {
				return
			}
			obj = n
		}
		select {
		case w.ch <- watch.Event{Type: ev.Type, Object: obj}:
		case <-ctx.Done():
			return
		}
	}
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
