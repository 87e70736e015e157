// Package controller is the nodespawn fleet controller: controller-runtime
// reconcilers that enrol Nodes (a NodeSpawnNode per Node labelled
// nodespawn.dev/managed=true, owned by the Node), validate NodeSpawnConfigs
// and drive NodeSpawnRollouts with the planner. All state lives in the
// objects; a reconcile rebuilds it, so a restarted or failed-over
// controller carries on where the last one stopped.
//
// Decisions (see also internal/fleet/planner):
//
//   - Enrolment is explicit: only Nodes labelled nodespawn.dev/managed=true
//     get a NodeSpawnNode and are ever selected by a rollout (a node
//     without the agent would only time out). The label can be set by the
//     kubelet (--node-labels) or by hand.
//   - A node selected by several rollouts belongs to the newest (creation
//     time, then the greater name): a rollout created to replace one that
//     is stuck or wrong takes its nodes over without deleting it. The
//     others list the node as blocked (SupersededByRollout). A rollout
//     lets go of a node it no longer owns (superseded, or no longer
//     selected) as a deleted rollout does: its switch grant, if the agent
//     has not taken it up, is revoked, its prepare request withdrawn and
//     its cordon undone; a node in the middle of a switch is let go once
//     the switch has ended, and no other rollout touches it until then.
//   - Cordons carry nodespawn.dev/cordoned-by (the rollout) and
//     nodespawn.dev/cordoned-at; the controller uncordons only a node
//     carrying its own rollout's mark, and a node cordoned by someone else
//     is left alone (not drained, switched or uncordoned). A mark naming a
//     rollout that no longer exists, or that no longer owns the node, is
//     undone (by that rollout's reconcile, or by the Node reconciler when
//     the rollout is gone or the node left the fleet) once no switch is in
//     flight.
//   - Drain evicts through the Eviction API (PodDisruptionBudgets
//     honoured) the pods kubectl drain would (k8s.io/kubectl/pkg/drain's
//     filters: DaemonSet and mirror pods stay, emptyDir data is lost, pods
//     with no controller block the drain and are named, like kubectl drain
//     without --force). A refused eviction names the pod in
//     status.blocked; evictions are retried every reconcile until the
//     disruption timeout.
package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/kubectl/pkg/drain"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/recorder"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/fleet/planner"
	"github.com/nodespawn/nodespawn/manifest"
)

// Name is the controller's name in Events and field managers.
const Name = "nodespawn-controller"

// maxListed caps status.blocked and status.failedNodes.
const maxListed = 50

// Options tune the controller (tests shorten the clock's reach).
type Options struct {
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Registry receives the metrics (default: none registered).
	Registry prometheus.Registerer
}

// Setup registers the reconcilers with mgr.
func Setup(mgr ctrl.Manager, opts Options) error {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	cs, err := kubernetes.NewForConfig(mgr.GetConfig())
	if err != nil {
		return err
	}
	m := newMetrics(mgr.GetClient())
	if opts.Registry != nil {
		if err := m.register(opts.Registry); err != nil {
			return err
		}
	}
	rec := mgr.GetEventRecorder(Name)
	r := &RolloutReconciler{Client: mgr.GetClient(), Clientset: cs, Events: rec, Now: opts.Now, metrics: m}
	allRollouts := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, _ client.Object) []reconcile.Request {
		return r.allRollouts(ctx)
	})
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("rollout").
		For(&v1alpha1.NodeSpawnRollout{}, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		// A rollout created, deleted or edited can change which owns a
		// node (the newest that selects it): the others look again.
		Watches(&v1alpha1.NodeSpawnRollout{}, allRollouts, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Watches(&v1alpha1.NodeSpawnNode{}, allRollouts, builder.WithPredicates(nsnChanged)).
		Watches(&corev1.Node{}, allRollouts, builder.WithPredicates(nodeChanged)).
		Watches(&v1alpha1.NodeSpawnConfig{}, handler.EnqueueRequestsFromMapFunc(r.rolloutsOfConfig)).
		Complete(r); err != nil {
		return err
	}
	n := &NodeReconciler{Client: mgr.GetClient(), Events: rec}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("node").
		For(&corev1.Node{}, builder.WithPredicates(nodeChanged)).
		// A NodeSpawnNode is named after its Node (deleted: made again).
		Watches(&v1alpha1.NodeSpawnNode{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: o.GetName()}}}
		}), builder.WithPredicates(predicate.Funcs{UpdateFunc: func(event.UpdateEvent) bool { return false }})).
		Complete(n); err != nil {
		return err
	}
	c := &ConfigReconciler{Client: mgr.GetClient()}
	return ctrl.NewControllerManagedBy(mgr).
		Named("config").
		For(&v1alpha1.NodeSpawnConfig{}, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Complete(c)
}

// nodeChanged passes Node events that can change a decision: labels,
// annotations, unschedulable and condition statuses (not heartbeats).
var nodeChanged = predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
	o, ok1 := e.ObjectOld.(*corev1.Node)
	n, ok2 := e.ObjectNew.(*corev1.Node)
	if !ok1 || !ok2 {
		return true
	}
	if !equality.Semantic.DeepEqual(o.Labels, n.Labels) || !equality.Semantic.DeepEqual(o.Annotations, n.Annotations) ||
		o.Spec.Unschedulable != n.Spec.Unschedulable || len(o.Status.Conditions) != len(n.Status.Conditions) {
		return true
	}
	for i := range o.Status.Conditions {
		if o.Status.Conditions[i].Type != n.Status.Conditions[i].Type || o.Status.Conditions[i].Status != n.Status.Conditions[i].Status {
			return true
		}
	}
	return false
}}

// nsnChanged passes NodeSpawnNode events except heartbeat-only updates.
var nsnChanged = predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
	o, ok1 := e.ObjectOld.(*v1alpha1.NodeSpawnNode)
	n, ok2 := e.ObjectNew.(*v1alpha1.NodeSpawnNode)
	if !ok1 || !ok2 {
		return true
	}
	os, ns := o.Status.DeepCopy(), n.Status.DeepCopy()
	os.Heartbeat, ns.Heartbeat = nil, nil
	return o.Generation != n.Generation || !equality.Semantic.DeepEqual(o.Annotations, n.Annotations) ||
		!equality.Semantic.DeepEqual(o.Labels, n.Labels) || !equality.Semantic.DeepEqual(os, ns)
}}

// ---------------------------------------------------------------------------
// Rollouts

// RolloutReconciler drives NodeSpawnRollouts.
type RolloutReconciler struct {
	Client    client.Client
	Clientset kubernetes.Interface
	Events    recorder.EventRecorder
	Now       func() time.Time
	metrics   *metrics
}

func (r *RolloutReconciler) allRollouts(ctx context.Context) []reconcile.Request {
	var l v1alpha1.NodeSpawnRolloutList
	if err := r.Client.List(ctx, &l); err != nil {
		return nil
	}
	out := make([]reconcile.Request, 0, len(l.Items))
	for _, ro := range l.Items {
		out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Name: ro.Name}})
	}
	return out
}

func (r *RolloutReconciler) rolloutsOfConfig(ctx context.Context, o client.Object) []reconcile.Request {
	var l v1alpha1.NodeSpawnRolloutList
	if err := r.Client.List(ctx, &l); err != nil {
		return nil
	}
	var out []reconcile.Request
	for _, ro := range l.Items {
		if ro.Spec.ConfigName == o.GetName() {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Name: ro.Name}})
		}
	}
	return out
}

// Reconcile rebuilds the rollout's state from the objects, asks the planner
// for the next step, carries it out and writes the status.
func (r *RolloutReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	res, err := r.reconcile(ctx, req)
	if apierrors.IsConflict(err) {
		// Someone wrote first (an agent's report, a node's change, this
		// controller's previous pass not yet in the cache): normal, and
		// the write that won brings its own reconcile. Planned again
		// from the new state, without the error log (and its stack)
		// controller-runtime prints for an error.
		log.FromContext(ctx).V(1).Info("conflict; planning again from the newer state", "error", err.Error())
		return reconcile.Result{RequeueAfter: conflictRetry}, nil
	}
	return res, err
}

// conflictRetry is when a pass that lost a write race runs again, should
// the winning write's own event not come first.
const conflictRetry = time.Second

func (r *RolloutReconciler) reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	lg := log.FromContext(ctx)
	var ro v1alpha1.NodeSpawnRollout
	if err := r.Client.Get(ctx, req.NamespacedName, &ro); err != nil {
		if apierrors.IsNotFound(err) {
			r.metrics.forget(req.Name)
			return r.forget(ctx, req.Name)
		}
		return reconcile.Result{}, err
	}
	now := r.Now()
	in := planner.Input{Rollout: &ro, Now: now}
	var cfg v1alpha1.NodeSpawnConfig
	switch err := r.Client.Get(ctx, types.NamespacedName{Name: ro.Spec.ConfigName}, &cfg); {
	case err == nil:
		in.Config = &cfg
	case !apierrors.IsNotFound(err):
		return reconcile.Result{}, err
	}

	sel, err := r.selectNodes(ctx, &ro)
	if err != nil {
		return reconcile.Result{}, err
	}
	nodes := sel.mine
	var nsns v1alpha1.NodeSpawnNodeList
	if err := r.Client.List(ctx, &nsns); err != nil {
		return reconcile.Result{}, err
	}
	byName := make(map[string]*v1alpha1.NodeSpawnNode, len(nsns.Items))
	for i := range nsns.Items {
		byName[nsns.Items[i].Name] = &nsns.Items[i]
	}
	// What it still holds on nodes it no longer owns: let go.
	var lost []held
	for i := range sel.others {
		n := &sel.others[i]
		nsn := byName[n.Name]
		if n.Annotations[v1alpha1.AnnotationCordonedBy] == ro.Name || (nsn != nil && nsn.Labels[v1alpha1.LabelRollout] == ro.Name) {
			why := fmt.Sprintf("rollout %s no longer selects the node", ro.Name)
			if o := sel.superseded[n.Name]; o != "" {
				why = fmt.Sprintf("rollout %s was superseded on the node by the newer rollout %s", ro.Name, o)
			}
			lost = append(lost, held{node: n, nsn: nsn, why: why})
		}
	}
	waiting, err := release(ctx, r.Client, r.Events, ro.Name, lost)
	if err != nil {
		return reconcile.Result{}, err
	}
	grant := planner.GrantID(&ro)
	for _, n := range nodes {
		ni := planner.NodeInput{Node: n, NSN: byName[n.Name]}
		if n.Annotations[v1alpha1.AnnotationCordonedBy] == ro.Name && ni.NSN != nil &&
			!(ni.NSN.Spec.Switch && ni.NSN.Spec.SwitchID == grant) {
			ni.PodsLeft, ni.DrainBlocked, err = r.podsLeft(ctx, &ro, n.Name)
			if err != nil {
				return reconcile.Result{}, err
			}
		}
		in.Nodes = append(in.Nodes, ni)
	}

	plan := planner.Decide(in)

	blocked := map[string]string{}
	for _, a := range plan.Actions {
		b, err := r.apply(ctx, &ro, a)
		if err != nil {
			return reconcile.Result{}, err
		}
		if b != "" {
			blocked[a.Node] = b
		}
	}
	for _, e := range plan.Events {
		typ := corev1.EventTypeNormal
		if e.Warning {
			typ = corev1.EventTypeWarning
		}
		r.Events.Eventf(&ro, nil, typ, e.Reason, e.Reason, "%s", e.Message)
	}

	st := plan.Status
	// A drain run in this reconcile says what blocks it now.
	for i := range st.Blocked {
		if b, ok := blocked[st.Blocked[i].Node]; ok && st.Blocked[i].Reason == "DrainBlocked" {
			st.Blocked[i].Message = b
			delete(blocked, st.Blocked[i].Node)
		}
	}
	for _, name := range sortedKeys(blocked) {
		st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: name, Reason: "DrainBlocked", Message: blocked[name]})
	}
	for _, name := range sortedKeys(sel.superseded) {
		st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: name, Reason: "SupersededByRollout",
			Message: fmt.Sprintf("selected by the newer rollout %s too, which has it", sel.superseded[name])})
	}
	st.Blocked = capList(st.Blocked)
	st.FailedNodes = capList(st.FailedNodes)
	r.metrics.observe(&ro, &st, plan.SwitchDurations)

	if !equality.Semantic.DeepEqual(ro.Status, st) {
		ro.Status = st
		if err := r.Client.Status().Update(ctx, &ro); err != nil {
			return reconcile.Result{}, err
		}
	}
	after := plan.RequeueAfter
	if len(blocked) > 0 && (after == 0 || after > planner.DrainRetry) {
		after = planner.DrainRetry
	}
	if waiting && (after == 0 || after > time.Minute) {
		// A lost node's switch is still in flight (its end is a
		// NodeSpawnNode change, which brings a reconcile first).
		after = time.Minute
	}
	lg.V(1).Info("reconciled", "nodes", st.Nodes, "updated", st.Updated, "failed", st.Failed, "actions", len(plan.Actions), "requeueAfter", after)
	return reconcile.Result{RequeueAfter: after}, nil
}

// selection is how a rollout's selector meets the fleet.
type selection struct {
	// mine are the enrolled Nodes the rollout selects and owns, by name.
	mine []corev1.Node
	// superseded are the Nodes it selects that a newer rollout owns:
	// node name -> that rollout.
	superseded map[string]string
	// others are the enrolled Nodes it does not own (superseded ones
	// included).
	others []corev1.Node
}

// selectNodes sorts the enrolled Nodes by the rollout's selector and the
// owners (ownerOf).
func (r *RolloutReconciler) selectNodes(ctx context.Context, ro *v1alpha1.NodeSpawnRollout) (selection, error) {
	var out selection
	var nl corev1.NodeList
	if err := r.Client.List(ctx, &nl, client.MatchingLabels{v1alpha1.LabelManaged: "true"}); err != nil {
		return out, err
	}
	cs, err := claimantsOf(ctx, r.Client)
	if err != nil {
		return out, err
	}
	sel, err := selectorOf(ro)
	if err != nil {
		return out, reconcile.TerminalError(fmt.Errorf("spec.nodeSelector: %w", err))
	}
	out.superseded = map[string]string{}
	for _, n := range nl.Items {
		if !sel.Matches(labels.Set(n.Labels)) {
			out.others = append(out.others, n)
			continue
		}
		if o := ownerOf(cs, n.Labels); o != ro.Name && o != "" {
			out.superseded[n.Name] = o
			out.others = append(out.others, n)
			continue
		}
		out.mine = append(out.mine, n)
	}
	sort.Slice(out.mine, func(i, j int) bool { return out.mine[i].Name < out.mine[j].Name })
	return out, nil
}

// claimant is a rollout as a candidate owner of the nodes it selects.
type claimant struct {
	name    string
	created metav1.Time
	sel     labels.Selector
}

// claimantsOf lists the rollouts that can own nodes, newest first. One
// being deleted, or whose selector does not parse (its own status says
// so), owns nothing.
func claimantsOf(ctx context.Context, c client.Reader) ([]claimant, error) {
	var rl v1alpha1.NodeSpawnRolloutList
	if err := c.List(ctx, &rl); err != nil {
		return nil, err
	}
	cs := make([]claimant, 0, len(rl.Items))
	for i := range rl.Items {
		o := &rl.Items[i]
		if o.DeletionTimestamp != nil {
			continue
		}
		sel, err := selectorOf(o)
		if err != nil {
			continue
		}
		cs = append(cs, claimant{name: o.Name, created: o.CreationTimestamp, sel: sel})
	}
	sort.Slice(cs, func(i, j int) bool { return newerThan(cs[i], cs[j]) })
	return cs, nil
}

// newerThan orders owners: the later creation time (the API server's, to
// the second), then the greater name.
func newerThan(a, b claimant) bool {
	if !a.created.Equal(&b.created) {
		return b.created.Before(&a.created)
	}
	return a.name > b.name
}

// ownerOf is the rollout that owns a node with these labels: the newest
// that selects it ("" when none does).
func ownerOf(cs []claimant, l map[string]string) string {
	for _, c := range cs {
		if c.sel.Matches(labels.Set(l)) {
			return c.name
		}
	}
	return ""
}

func selectorOf(ro *v1alpha1.NodeSpawnRollout) (labels.Selector, error) {
	if ro.Spec.NodeSelector == nil {
		return labels.Everything(), nil
	}
	return metav1.LabelSelectorAsSelector(ro.Spec.NodeSelector)
}

// podsLeft counts the pods still to go from a node the rollout cordoned,
// and says what blocks them.
func (r *RolloutReconciler) podsLeft(ctx context.Context, ro *v1alpha1.NodeSpawnRollout, node string) (int, string, error) {
	switch ro.Spec.Disruption.Mode {
	case v1alpha1.DisruptionInPlace:
		return 0, "", nil
	case v1alpha1.DisruptionWaitForPods:
		sel := labels.Everything()
		if ro.Spec.Disruption.PodSelector != nil {
			s, err := metav1.LabelSelectorAsSelector(ro.Spec.Disruption.PodSelector)
			if err != nil {
				return 0, "", reconcile.TerminalError(fmt.Errorf("spec.disruption.podSelector: %w", err))
			}
			sel = s
		}
		pods, err := r.Clientset.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node, LabelSelector: sel.String()})
		if err != nil {
			return 0, "", err
		}
		var left []string
		for _, p := range pods.Items {
			if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed && !nodeBound(&p) {
				left = append(left, p.Namespace+"/"+p.Name)
			}
		}
		if len(left) == 0 {
			return 0, "", nil
		}
		return len(left), "waiting for pods to finish: " + joinCapped(left), nil
	}
	list, errs := r.drainer(ctx).GetPodsForDeletion(node)
	if list == nil && len(errs) > 0 {
		return 0, "", errors.Join(errs...)
	}
	n := len(errs)
	var msgs []string
	for _, e := range errs {
		msgs = append(msgs, e.Error())
	}
	if list != nil {
		n += len(list.Pods())
	}
	return n, strings.Join(msgs, "; "), nil
}

// nodeBound is a pod that never leaves its node by itself: a DaemonSet's
// or a static (mirror) pod. WaitForPods does not wait for them (a drain
// leaves them too), or a wait without a podSelector would last until its
// timeout on every node that runs one.
func nodeBound(p *corev1.Pod) bool {
	if _, ok := p.Annotations[corev1.MirrorPodAnnotationKey]; ok {
		return true
	}
	if c := metav1.GetControllerOf(p); c != nil && c.Kind == "DaemonSet" {
		return true
	}
	return false
}

func (r *RolloutReconciler) drainer(ctx context.Context) *drain.Helper {
	return &drain.Helper{
		Ctx:                 ctx,
		Client:              r.Clientset,
		IgnoreAllDaemonSets: true,
		DeleteEmptyDirData:  true,
		GracePeriodSeconds:  -1,
	}
}

// evict asks the Eviction API to evict the node's pods; it returns what
// blocked (a PodDisruptionBudget names the pod) or "".
func (r *RolloutReconciler) evict(ctx context.Context, node string) (string, error) {
	list, errs := r.drainer(ctx).GetPodsForDeletion(node)
	var blocked []string
	for _, e := range errs {
		blocked = append(blocked, e.Error())
	}
	if list == nil {
		return strings.Join(blocked, "; "), nil
	}
	for _, p := range list.Pods() {
		if p.DeletionTimestamp != nil {
			continue // terminating already
		}
		ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}}
		err := r.Clientset.PolicyV1().Evictions(p.Namespace).Evict(ctx, ev)
		switch {
		case err == nil, apierrors.IsNotFound(err):
		case apierrors.IsTooManyRequests(err):
			blocked = append(blocked, fmt.Sprintf("evicting pod %s/%s: %s", p.Namespace, p.Name, apiMessage(err)))
		default:
			blocked = append(blocked, fmt.Sprintf("evicting pod %s/%s: %v", p.Namespace, p.Name, err))
		}
	}
	return strings.Join(blocked, "; "), nil
}

func apiMessage(err error) string {
	var se apierrors.APIStatus
	if errors.As(err, &se) {
		return se.Status().Message
	}
	return err.Error()
}

// apply carries out one node's action; it returns what blocks a drain.
func (r *RolloutReconciler) apply(ctx context.Context, ro *v1alpha1.NodeSpawnRollout, a planner.Action) (string, error) {
	var node corev1.Node
	if err := r.Client.Get(ctx, types.NamespacedName{Name: a.Node}, &node); err != nil {
		return "", client.IgnoreNotFound(err)
	}
	if a.Spec != nil || len(a.Annotations) > 0 {
		var nsn v1alpha1.NodeSpawnNode
		if err := r.Client.Get(ctx, types.NamespacedName{Name: a.Node}, &nsn); err != nil {
			return "", err
		}
		base := nsn.DeepCopy()
		if a.Spec != nil {
			nsn.Spec = *a.Spec
			metav1.SetMetaDataLabel(&nsn.ObjectMeta, v1alpha1.LabelRollout, ro.Name)
		}
		for k, v := range a.Annotations {
			if v == "" {
				delete(nsn.Annotations, k)
			} else {
				metav1.SetMetaDataAnnotation(&nsn.ObjectMeta, k, v)
			}
		}
		if err := r.Client.Patch(ctx, &nsn, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			return "", err
		}
	}
	if a.Cordon {
		if node.Spec.Unschedulable {
			// Someone cordoned it since the plan: theirs, left alone.
			return "", nil
		}
		base := node.DeepCopy()
		node.Spec.Unschedulable = true
		metav1.SetMetaDataAnnotation(&node.ObjectMeta, v1alpha1.AnnotationCordonedBy, ro.Name)
		metav1.SetMetaDataAnnotation(&node.ObjectMeta, v1alpha1.AnnotationCordonedAt, r.Now().UTC().Format(time.RFC3339))
		if err := r.Client.Patch(ctx, &node, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			return "", err
		}
	}
	if a.Uncordon {
		if err := uncordon(ctx, r.Client, &node, ro.Name); err != nil {
			return "", err
		}
	}
	for _, e := range a.Events {
		typ := corev1.EventTypeNormal
		if e.Warning {
			typ = corev1.EventTypeWarning
		}
		r.Events.Eventf(&node, ro, typ, e.Reason, e.Reason, "%s (rollout %s)", e.Message, ro.Name)
	}
	if a.Drain {
		return r.evict(ctx, a.Node)
	}
	return "", nil
}

// forget undoes what a deleted rollout left (release).
func (r *RolloutReconciler) forget(ctx context.Context, rollout string) (reconcile.Result, error) {
	var nsns v1alpha1.NodeSpawnNodeList
	if err := r.Client.List(ctx, &nsns); err != nil {
		return reconcile.Result{}, err
	}
	var nodes corev1.NodeList
	if err := r.Client.List(ctx, &nodes); err != nil {
		return reconcile.Result{}, err
	}
	byName := make(map[string]*v1alpha1.NodeSpawnNode, len(nsns.Items))
	for i := range nsns.Items {
		byName[nsns.Items[i].Name] = &nsns.Items[i]
	}
	why := fmt.Sprintf("rollout %s was deleted", rollout)
	var hs []held
	for i := range nodes.Items {
		n := &nodes.Items[i]
		nsn := byName[n.Name]
		delete(byName, n.Name)
		if n.Annotations[v1alpha1.AnnotationCordonedBy] == rollout || (nsn != nil && nsn.Labels[v1alpha1.LabelRollout] == rollout) {
			hs = append(hs, held{node: n, nsn: nsn, why: why})
		}
	}
	for _, nsn := range byName { // a NodeSpawnNode whose Node is gone
		if nsn.Labels[v1alpha1.LabelRollout] == rollout {
			hs = append(hs, held{nsn: nsn, why: why})
		}
	}
	waiting, err := release(ctx, r.Client, r.Events, rollout, hs)
	if err != nil || !waiting {
		return reconcile.Result{}, err
	}
	return reconcile.Result{RequeueAfter: time.Minute}, nil
}

// held is a node a rollout may hold something on: its cordon mark on the
// Node, its requests in the NodeSpawnNode. Either may be nil.
type held struct {
	node *corev1.Node
	nsn  *v1alpha1.NodeSpawnNode
	why  string // the reason, in the Events
}

// release lets go of nodes a rollout no longer owns (deleted, superseded
// by a newer rollout, no longer selected): a switch it granted that the
// agent has not taken up yet is revoked (a grant left in a NodeSpawnNode
// would still switch the node later), its prepare request and its label
// are withdrawn and its cordon undone, except on nodes in the middle of a
// switch, which are left as they are until the switch has ended (waiting
// says so).
func release(ctx context.Context, c client.Client, events recorder.EventRecorder, rollout string, hs []held) (waiting bool, err error) {
	for _, h := range hs {
		if h.nsn != nil {
			if ph := h.nsn.Status.Phase; ph == v1alpha1.PhaseSwitching || ph == v1alpha1.PhaseVerifying {
				waiting = true
				continue
			}
		}
		if nsn := h.nsn; nsn != nil && nsn.Labels[v1alpha1.LabelRollout] == rollout {
			base := nsn.DeepCopy()
			revoked := nsn.Spec.Switch && nsn.Spec.SwitchID != nsn.Status.SwitchID
			nsn.Spec.Switch, nsn.Spec.Prepare = false, false
			delete(nsn.Labels, v1alpha1.LabelRollout)
			if err := c.Patch(ctx, nsn, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
				if apierrors.IsNotFound(err) {
					continue
				}
				return waiting, err
			}
			if revoked && h.node != nil {
				events.Eventf(h.node, nil, corev1.EventTypeNormal, "GrantRevoked", "Revoke", "switch grant %s revoked: %s", base.Spec.SwitchID, h.why)
			}
		}
		if n := h.node; n != nil && n.Annotations[v1alpha1.AnnotationCordonedBy] == rollout {
			if err := uncordon(ctx, c, n, rollout); err != nil {
				if apierrors.IsNotFound(err) {
					continue
				}
				return waiting, err
			}
			events.Eventf(n, nil, corev1.EventTypeNormal, "Uncordoned", "Uncordon", "uncordoned: %s", h.why)
		}
	}
	return waiting, nil
}

// uncordon undoes a cordon the named rollout made, and only that.
func uncordon(ctx context.Context, c client.Client, node *corev1.Node, rollout string) error {
	if node.Annotations[v1alpha1.AnnotationCordonedBy] != rollout {
		return nil
	}
	base := node.DeepCopy()
	node.Spec.Unschedulable = false
	delete(node.Annotations, v1alpha1.AnnotationCordonedBy)
	delete(node.Annotations, v1alpha1.AnnotationCordonedAt)
	return c.Patch(ctx, node, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}))
}

func capList(l []v1alpha1.NodeProblem) []v1alpha1.NodeProblem {
	if len(l) <= maxListed {
		return l
	}
	more := len(l) - maxListed + 1
	l = append(l[:maxListed-1:maxListed-1], v1alpha1.NodeProblem{Node: "", Reason: "More", Message: fmt.Sprintf("and %d more node(s)", more)})
	return l
}

func joinCapped(xs []string) string {
	if len(xs) > 5 {
		return strings.Join(xs[:5], ", ") + fmt.Sprintf(" and %d more", len(xs)-5)
	}
	return strings.Join(xs, ", ")
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// ---------------------------------------------------------------------------
// Nodes

// NodeReconciler keeps a NodeSpawnNode for every enrolled Node and undoes
// cordons left by rollouts that are gone or no longer own the node.
type NodeReconciler struct {
	Client client.Client
	Events recorder.EventRecorder
}

// Reconcile enrols one Node.
func (n *NodeReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var node corev1.Node
	if err := n.Client.Get(ctx, req.NamespacedName, &node); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	managed := node.Labels[v1alpha1.LabelManaged] == "true"
	nsn := &v1alpha1.NodeSpawnNode{}
	err := n.Client.Get(ctx, req.NamespacedName, nsn)
	switch {
	case apierrors.IsNotFound(err) && managed:
		nsn = &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: node.Name}}
		if err := controllerutil.SetOwnerReference(&node, nsn, n.Client.Scheme()); err != nil {
			return reconcile.Result{}, err
		}
		if err := n.Client.Create(ctx, nsn); err != nil && !apierrors.IsAlreadyExists(err) {
			return reconcile.Result{}, err
		}
		n.Events.Eventf(&node, nil, corev1.EventTypeNormal, "Enrolled", "Enrol", "NodeSpawnNode %s created", node.Name)
	case apierrors.IsNotFound(err):
		nsn = nil
	case err != nil:
		return reconcile.Result{}, err
	}

	// A cordon whose rollout is gone or no longer owns the node (its
	// labels changed: the rollout's own reconcile may not run).
	by := node.Annotations[v1alpha1.AnnotationCordonedBy]
	if by == "" {
		return reconcile.Result{}, nil
	}
	if managed {
		cs, err := claimantsOf(ctx, n.Client)
		if err != nil {
			return reconcile.Result{}, err
		}
		if ownerOf(cs, node.Labels) == by {
			return reconcile.Result{}, nil
		}
	}
	// Its grant is revoked before the cordon goes, as the rollout's own
	// release does: an uncordoned node must not still hold a switch
	// grant that nobody is watching.
	waiting, err := release(ctx, n.Client, n.Events, by, []held{{node: &node, nsn: nsn,
		why: fmt.Sprintf("rollout %s is gone or no longer owns the node", by)}})
	if err != nil || !waiting {
		return reconcile.Result{}, err
	}
	return reconcile.Result{RequeueAfter: time.Minute}, nil
}

// ---------------------------------------------------------------------------
// Configs

// ConfigReconciler validates NodeSpawnConfigs: the manifest loads as a
// fleet config (manifest.LoadConfig: no secret), hashes to spec.digest,
// and the config carries the digest label.
type ConfigReconciler struct {
	Client client.Client
}

// Reconcile sets one config's Valid condition.
func (c *ConfigReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var cfg v1alpha1.NodeSpawnConfig
	if err := c.Client.Get(ctx, req.NamespacedName, &cfg); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	cond := Validate(&cfg)
	// The label holds v1alpha1.DigestLabelValue (63 hex digits: a label
	// value has at most 63 characters, a sha256 hex 64); the whole hex
	// was refused by the API server, and the config never got its status.
	if label := v1alpha1.DigestLabelValue(cfg.Spec.Digest); cond.Status == metav1.ConditionTrue && label != "" && cfg.Labels[v1alpha1.LabelConfigDigest] != label {
		base := cfg.DeepCopy()
		metav1.SetMetaDataLabel(&cfg.ObjectMeta, v1alpha1.LabelConfigDigest, label)
		if err := c.Client.Patch(ctx, &cfg, client.MergeFrom(base)); err != nil {
			return reconcile.Result{}, err
		}
	}
	st := cfg.Status.DeepCopy()
	st.ObservedGeneration = cfg.Generation
	meta.SetStatusCondition(&st.Conditions, cond)
	if equality.Semantic.DeepEqual(*st, cfg.Status) {
		return reconcile.Result{}, nil
	}
	cfg.Status = *st
	return reconcile.Result{}, c.Client.Status().Update(ctx, &cfg)
}

// Validate returns a config's Valid condition. Its message never holds a
// secret (manifest errors name paths, not values).
func Validate(cfg *v1alpha1.NodeSpawnConfig) metav1.Condition {
	cond := metav1.Condition{Type: "Valid", ObservedGeneration: cfg.Generation}
	m, err := manifest.LoadConfig("NodeSpawnConfig "+cfg.Name, []byte(cfg.Spec.Manifest))
	var se *manifest.SecretsError
	switch {
	case errors.As(err, &se):
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "HoldsSecret", err.Error()
		return cond
	case err != nil:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "InvalidManifest", err.Error()
		return cond
	}
	d, err := m.ConfigDigest()
	if err != nil {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "InvalidManifest", err.Error()
		return cond
	}
	if d.String() != cfg.Spec.Digest {
		cond.Status, cond.Reason = metav1.ConditionFalse, "DigestMismatch"
		cond.Message = fmt.Sprintf("the manifest hashes to %s, spec.digest says %s ('nodespawn config digest -f FILE' prints a manifest's digest)", d, cfg.Spec.Digest)
		return cond
	}
	cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, "Valid", "the manifest loads as a fleet config and hashes to spec.digest"
	return cond
}

// ---------------------------------------------------------------------------
// Metrics

type metrics struct {
	c         client.Reader
	rollout   *prometheus.GaugeVec
	halted    *prometheus.GaugeVec
	switchDur *prometheus.HistogramVec
	phases    *prometheus.Desc

	mu   sync.Mutex
	seen map[string]bool // node/switchID whose duration was observed
}

func newMetrics(c client.Reader) *metrics {
	return &metrics{
		c: c,
		rollout: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nodespawn_rollout_nodes", Help: "Nodes of a rollout by state (nodes, updated, preparing, prepared, switching, unavailable, failed).",
		}, []string{"rollout", "state"}),
		halted: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nodespawn_rollout_halted", Help: "1 when the rollout is halted (failure budget spent).",
		}, []string{"rollout"}),
		switchDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "nodespawn_switch_duration_seconds", Help: "Switch durations (agent's switchStarted to switchFinished) of nodes a rollout updated.",
			Buckets: []float64{10, 30, 60, 120, 300, 600, 1200, 1800, 3600},
		}, []string{"rollout"}),
		phases: prometheus.NewDesc("nodespawn_nodes", "NodeSpawnNodes by agent phase.", []string{"phase"}, nil),
		seen:   map[string]bool{},
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.rollout, m.halted, m.switchDur, m} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// Describe and Collect make the nodes-per-phase gauge, counted from the
// cache at scrape time.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) { ch <- m.phases }

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var l v1alpha1.NodeSpawnNodeList
	if err := m.c.List(ctx, &l); err != nil {
		return
	}
	counts := map[string]int{}
	for _, n := range l.Items {
		ph := string(n.Status.Phase)
		if ph == "" {
			ph = "Unknown"
		}
		counts[ph]++
	}
	for ph, n := range counts {
		ch <- prometheus.MustNewConstMetric(m.phases, prometheus.GaugeValue, float64(n), ph)
	}
}

func (m *metrics) observe(ro *v1alpha1.NodeSpawnRollout, st *v1alpha1.NodeSpawnRolloutStatus, durs map[string]time.Duration) {
	for state, v := range map[string]int32{
		"nodes": st.Nodes, "updated": st.Updated, "preparing": st.Preparing, "prepared": st.Prepared,
		"switching": st.Switching, "unavailable": st.Unavailable, "failed": st.Failed,
	} {
		m.rollout.WithLabelValues(ro.Name, state).Set(float64(v))
	}
	h := 0.0
	if meta.IsStatusConditionTrue(st.Conditions, v1alpha1.RolloutHalted) {
		h = 1
	}
	m.halted.WithLabelValues(ro.Name).Set(h)
	m.mu.Lock()
	defer m.mu.Unlock()
	grant := planner.GrantID(ro)
	for node, d := range durs {
		k := node + "/" + grant
		if !m.seen[k] {
			m.seen[k] = true
			m.switchDur.WithLabelValues(ro.Name).Observe(d.Seconds())
		}
	}
}

func (m *metrics) forget(rollout string) {
	m.rollout.DeletePartialMatch(prometheus.Labels{"rollout": rollout})
	m.halted.DeleteLabelValues(rollout)
}
