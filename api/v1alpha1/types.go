// Package v1alpha1 holds the nodespawn.dev/v1alpha1 API: the custom
// resources through which a fleet of nodes is rolled from one node manifest
// to another by the cluster the nodes join.
//
//   - NodeSpawnConfig: a node manifest, immutable, named by its digest.
//   - NodeSpawnRollout: which config, which nodes, in what waves, with what
//     disruption policy, failure budget and window.
//   - NodeSpawnNode: one per Node (owned by it). The controller writes the
//     spec (the config the node should run, permission to switch); the
//     node's agent writes the status.
//
// All three are cluster-scoped. The CRDs under deploy/crds are generated
// from these types by controller-gen (make generate).
//
// +kubebuilder:object:generate=true
// +groupName=nodespawn.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Labels, annotations and finalizer-free markers shared by the controller
// and the agent.
const (
	// LabelConfigDigest on a NodeSpawnConfig: DigestLabelValue of its
	// digest (the hex of its manifest's sha256 without the "sha256:"
	// prefix, cut to 63 digits: label values hold no colon and at most 63
	// characters). On a Node: the same of the config its active machine
	// runs (set by the agent).
	LabelConfigDigest = "nodespawn.dev/config-digest"
	// AnnotationCordonedBy on a Node: the rollout that cordoned it. The
	// controller uncordons only nodes that carry it, and removes it.
	AnnotationCordonedBy = "nodespawn.dev/cordoned-by"
	// LabelRollout on a NodeSpawnNode: the rollout that last wrote its spec.
	LabelRollout = "nodespawn.dev/rollout"
	// LabelManaged on a Node, "true": the node is enrolled; the controller
	// keeps a NodeSpawnNode for it (owned by the Node). Nodes without it are
	// never touched by a rollout, whatever its selector.
	LabelManaged = "nodespawn.dev/managed"
	// AnnotationCordonedAt on a Node: when the rollout named by
	// AnnotationCordonedBy cordoned it (RFC 3339); the drain or wait timeout
	// runs from it.
	AnnotationCordonedAt = "nodespawn.dev/cordoned-at"
	// AnnotationPrepareRequested on a NodeSpawnNode (written by the
	// controller): "DIGEST RFC3339", when prepare of DIGEST was requested;
	// the phase timeout of a prepare runs from it.
	AnnotationPrepareRequested = "nodespawn.dev/prepare-requested"
	// AnnotationSwitchGranted on a NodeSpawnNode (written by the
	// controller): when spec.switchID was granted (RFC 3339); the phase
	// timeout of a switch runs from it.
	AnnotationSwitchGranted = "nodespawn.dev/switch-granted"
	// AnnotationFailed on a NodeSpawnNode (written by the controller):
	// "SWITCHID REASON: MESSAGE", the failure the rollout counted against
	// its budget for that grant. A failure stays counted while the grant
	// (the rollout's generation) stands.
	AnnotationFailed = "nodespawn.dev/failed"
)

// ---------------------------------------------------------------------------
// NodeSpawnConfig

// NodeSpawnConfigSpec is a node manifest. It is immutable: a new manifest is
// a new config. It must hold no secret: an upgrade keeps the node's
// identity, so no bootstrap token is needed, and validation refuses one.
type NodeSpawnConfigSpec struct {
	// Manifest is the node manifest (YAML or JSON, the same document that
	// `nodespawn apply -f` takes).
	//
	// A manifest that sets kubernetes.auth.bootstrapToken is refused when
	// it is written (a config is readable by every node): the key, in YAML
	// or JSON, anywhere in the text. The other secrets a manifest can hold
	// (exec plugin environment values, HTTP header values) cannot be told
	// from the text by a rule; the controller finds them (Valid False,
	// HoldsSecret) and agents refuse the config.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1048576
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="manifest is immutable: create a new NodeSpawnConfig"
	// +kubebuilder:validation:XValidation:rule=`!self.matches(r'(^|\W)bootstrapToken\W?\s*:')`,message="manifest sets kubernetes.auth.bootstrapToken: a NodeSpawnConfig is readable by every node and holds no secret; remove it (an upgrade keeps the identity the node joined with)"
	Manifest string `json:"manifest"`
	// Digest is "sha256:" and the hex sha256 of the canonical manifest
	// (`nodespawn config digest -f FILE` prints it). The agent refuses a
	// config whose manifest does not hash to it.
	// +kubebuilder:validation:Pattern=`^sha256:[0-9a-f]{64}$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="digest is immutable"
	Digest string `json:"digest"`
}

// NodeSpawnConfigStatus says whether the controller found the config usable.
type NodeSpawnConfigStatus struct {
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Valid (the manifest parses, matches its digest and holds
	// no secret).
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// NodeSpawnConfig is an immutable node manifest.
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=nsc
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Digest",type=string,JSONPath=`.spec.digest`
// +kubebuilder:printcolumn:name="Valid",type=string,JSONPath=`.status.conditions[?(@.type=="Valid")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodeSpawnConfig struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NodeSpawnConfigSpec   `json:"spec"`
	Status NodeSpawnConfigStatus `json:"status,omitempty"`
}

// NodeSpawnConfigList is a list of NodeSpawnConfig.
// +kubebuilder:object:root=true
type NodeSpawnConfigList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeSpawnConfig `json:"items"`
}

// ---------------------------------------------------------------------------
// NodeSpawnRollout

// DisruptionMode is how a node's workloads are treated before it switches.
// +kubebuilder:validation:Enum=Drain;WaitForPods;InPlace
type DisruptionMode string

const (
	// DisruptionDrain cordons the node and evicts its pods through the
	// Eviction API (PodDisruptionBudgets honoured) before the switch.
	DisruptionDrain DisruptionMode = "Drain"
	// DisruptionWaitForPods cordons the node and waits until no pod
	// matching the selector runs on it (training jobs finish on their own).
	DisruptionWaitForPods DisruptionMode = "WaitForPods"
	// DisruptionInPlace switches without cordon or drain: for nodes that
	// run only DaemonSet-type workloads.
	DisruptionInPlace DisruptionMode = "InPlace"
)

// TimeoutAction is what happens when a drain or a wait runs out of time.
// +kubebuilder:validation:Enum=Fail;Proceed
type TimeoutAction string

const (
	// TimeoutFail counts the node as failed (against the failure budget),
	// uncordons it if the rollout cordoned it, and does not switch it.
	TimeoutFail TimeoutAction = "Fail"
	// TimeoutProceed switches anyway: the pods left get kubelet's graceful
	// shutdown.
	TimeoutProceed TimeoutAction = "Proceed"
)

// Disruption is the rollout's disruption policy.
type Disruption struct {
	// +kubebuilder:default=Drain
	Mode DisruptionMode `json:"mode,omitempty"`
	// Timeout bounds the drain or the wait (default 1h).
	// +optional
	Timeout *metav1.Duration `json:"timeout,omitempty"`
	// OnTimeout says what happens when Timeout expires.
	// +kubebuilder:default=Fail
	OnTimeout TimeoutAction `json:"onTimeout,omitempty"`
	// PodSelector (WaitForPods): the pods to wait for.
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
}

// MaintenanceWindow allows switches only inside recurring windows. Prepare
// runs outside them (it disrupts nothing).
type MaintenanceWindow struct {
	// Schedule is a cron expression (5 fields) for each window's start.
	// +kubebuilder:validation:MinLength=1
	Schedule string `json:"schedule"`
	// Duration of each window.
	Duration metav1.Duration `json:"duration"`
	// TimeZone is an IANA name (default UTC).
	// +optional
	TimeZone string `json:"timeZone,omitempty"`
}

// RolloutStrategy shapes the waves.
type RolloutStrategy struct {
	// MaxUnavailable is how many selected nodes may be unavailable at once
	// (a count or a percent of the selected nodes, rounded down, at least
	// 1). Nodes already unavailable for other reasons count.
	// +kubebuilder:default=1
	// +kubebuilder:validation:XIntOrString
	MaxUnavailable *intstr.IntOrString `json:"maxUnavailable,omitempty"`
	// Waves are explicit wave sizes (counts or percents); the last wave
	// takes the rest. Empty: every wave is MaxUnavailable nodes.
	// +optional
	Waves []intstr.IntOrString `json:"waves,omitempty"`
	// Soak is how long a finished wave must stay healthy before the next
	// wave starts.
	// +optional
	Soak *metav1.Duration `json:"soak,omitempty"`
	// PrepareAhead is how many nodes beyond the current wave may prepare
	// (pull and build the new machine beside the running one).
	// +kubebuilder:validation:Minimum=0
	// +optional
	PrepareAhead int32 `json:"prepareAhead,omitempty"`
	// MaxPreparing caps concurrent prepares across the fleet, so that a
	// fleet does not pull a new image all at once (0: no cap beyond
	// PrepareAhead and the wave).
	// +kubebuilder:validation:Minimum=0
	// +optional
	MaxPreparing int32 `json:"maxPreparing,omitempty"`
	// PhaseTimeout bounds each node's prepare and switch (default 30m); a
	// node past it counts as failed.
	// +optional
	PhaseTimeout *metav1.Duration `json:"phaseTimeout,omitempty"`
}

// NodeSpawnRolloutSpec is a rollout of one config to a set of nodes.
type NodeSpawnRolloutSpec struct {
	// ConfigName names the NodeSpawnConfig to roll out.
	// +kubebuilder:validation:MinLength=1
	ConfigName string `json:"configName"`
	// NodeSelector picks the Nodes (empty: every node with a NodeSpawnNode).
	// +optional
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`
	// +optional
	Strategy RolloutStrategy `json:"strategy,omitempty"`
	// +optional
	Disruption Disruption `json:"disruption,omitempty"`
	// FailureBudget is how many node failures (rolled back, phase timeout,
	// failed gate, drain timeout with onTimeout Fail) the rollout absorbs:
	// when the count of failed nodes reaches it, the rollout halts. Nodes in
	// flight finish; no new node is granted a switch.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=1
	FailureBudget int32 `json:"failureBudget,omitempty"`
	// +optional
	MaintenanceWindow *MaintenanceWindow `json:"maintenanceWindow,omitempty"`
	// Paused stops granting switches and starting prepares; nodes in flight
	// finish.
	// +optional
	Paused bool `json:"paused,omitempty"`
	// HealthGates are Node condition types that must be in their healthy
	// status (Ready: True; any other: False) on an updated node for it to
	// count as done, e.g. a GPU health or node-problem-detector condition.
	// +optional
	HealthGates []HealthGate `json:"healthGates,omitempty"`
}

// HealthGate is a Node condition a node must show after its switch.
type HealthGate struct {
	// Type is the Node condition type.
	Type string `json:"type"`
	// Status is the healthy status (default: True for Ready, else False).
	// +kubebuilder:validation:Enum=True;False
	// +optional
	Status string `json:"status,omitempty"`
}

// Rollout condition types.
const (
	RolloutProgressing = "Progressing"
	RolloutHalted      = "Halted"
	RolloutComplete    = "Complete"
)

// WaveStatus counts one wave's nodes.
type WaveStatus struct {
	Index   int32 `json:"index"`
	Size    int32 `json:"size"`
	Updated int32 `json:"updated"`
	Failed  int32 `json:"failed"`
	// SoakedAt is when the wave's last node became healthy.
	// +optional
	SoakedAt *metav1.Time `json:"soakedAt,omitempty"`
}

// NodeProblem names a node the rollout is held on or failed, and why.
type NodeProblem struct {
	Node    string `json:"node"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// NodeSpawnRolloutStatus is rebuilt from the objects on every reconcile.
type NodeSpawnRolloutStatus struct {
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// ConfigDigest is the digest of the config being rolled out.
	ConfigDigest string `json:"configDigest,omitempty"`
	Nodes        int32  `json:"nodes"`
	Updated      int32  `json:"updated"`
	Preparing    int32  `json:"preparing"`
	Prepared     int32  `json:"prepared"`
	Switching    int32  `json:"switching"`
	Unavailable  int32  `json:"unavailable"`
	Failed       int32  `json:"failed"`
	// CurrentWave is the index of the wave being switched.
	CurrentWave int32        `json:"currentWave"`
	Waves       []WaveStatus `json:"waves,omitempty"`
	// Blocked lists nodes the rollout waits on (a drain blocked by a
	// PodDisruptionBudget names the pod).
	// +optional
	Blocked []NodeProblem `json:"blocked,omitempty"`
	// FailedNodes lists the nodes counted against the failure budget.
	// +optional
	FailedNodes []NodeProblem `json:"failedNodes,omitempty"`
}

// NodeSpawnRollout rolls a NodeSpawnConfig out to nodes in waves.
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=nsr
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Config",type=string,JSONPath=`.spec.configName`
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=`.status.nodes`
// +kubebuilder:printcolumn:name="Updated",type=integer,JSONPath=`.status.updated`
// +kubebuilder:printcolumn:name="Failed",type=integer,JSONPath=`.status.failed`
// +kubebuilder:printcolumn:name="Wave",type=integer,JSONPath=`.status.currentWave`
// +kubebuilder:printcolumn:name="Progressing",type=string,JSONPath=`.status.conditions[?(@.type=="Progressing")].status`
// +kubebuilder:printcolumn:name="Halted",type=string,JSONPath=`.status.conditions[?(@.type=="Halted")].status`
// +kubebuilder:printcolumn:name="Complete",type=string,JSONPath=`.status.conditions[?(@.type=="Complete")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodeSpawnRollout struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NodeSpawnRolloutSpec   `json:"spec"`
	Status NodeSpawnRolloutStatus `json:"status,omitempty"`
}

// NodeSpawnRolloutList is a list of NodeSpawnRollout.
// +kubebuilder:object:root=true
type NodeSpawnRolloutList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeSpawnRollout `json:"items"`
}

// ---------------------------------------------------------------------------
// NodeSpawnNode

// NodeSpawnNodeSpec is written by the controller.
type NodeSpawnNodeSpec struct {
	// ConfigName and ConfigDigest: the config the node should run. Empty:
	// no rollout concerns the node.
	// +optional
	ConfigName string `json:"configName,omitempty"`
	// +optional
	ConfigDigest string `json:"configDigest,omitempty"`
	// Prepare allows the agent to prepare ConfigDigest beside the running
	// machine (pull, build; disrupts nothing).
	// +optional
	Prepare bool `json:"prepare,omitempty"`
	// Switch allows the agent to switch to the prepared machine (the
	// controller has cordoned and drained the node, or the policy is
	// InPlace). The agent switches at most once per SwitchID.
	// +optional
	Switch bool `json:"switch,omitempty"`
	// SwitchID identifies one grant (the rollout's name and generation); a
	// new grant after a failure gets a new ID.
	// +optional
	SwitchID string `json:"switchID,omitempty"`
}

// NodePhase is where a node stands.
// +kubebuilder:validation:Enum=Idle;Preparing;Prepared;Switching;Verifying;Ready;RolledBack;Failed
type NodePhase string

const (
	PhaseIdle       NodePhase = "Idle"
	PhasePreparing  NodePhase = "Preparing"
	PhasePrepared   NodePhase = "Prepared"
	PhaseSwitching  NodePhase = "Switching"
	PhaseVerifying  NodePhase = "Verifying"
	PhaseReady      NodePhase = "Ready"
	PhaseRolledBack NodePhase = "RolledBack"
	PhaseFailed     NodePhase = "Failed"
)

// NodeSpawnNodeStatus is written by the node's agent.
type NodeSpawnNodeStatus struct {
	// ObservedGeneration is the spec generation the agent acted on.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Phase of the last operation.
	// +optional
	Phase NodePhase `json:"phase,omitempty"`
	// ActiveDigest: the config the running machine was made from.
	// +optional
	ActiveDigest string `json:"activeDigest,omitempty"`
	// ActiveMachine: its name.
	// +optional
	ActiveMachine string `json:"activeMachine,omitempty"`
	// PreparedDigest: the config of the machine prepared beside it.
	// +optional
	PreparedDigest string `json:"preparedDigest,omitempty"`
	// PreviousDigest: the config of the kept previous machine (a rollout
	// back to it switches without preparing).
	// +optional
	PreviousDigest string `json:"previousDigest,omitempty"`
	// SwitchID of the last grant the agent acted on.
	// +optional
	SwitchID string `json:"switchID,omitempty"`
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// LastError is the last operation's error, as nodespawn printed it.
	// +optional
	LastError string `json:"lastError,omitempty"`
	// +optional
	PrepareStarted *metav1.Time `json:"prepareStarted,omitempty"`
	// +optional
	PrepareFinished *metav1.Time `json:"prepareFinished,omitempty"`
	// +optional
	SwitchStarted *metav1.Time `json:"switchStarted,omitempty"`
	// +optional
	SwitchFinished *metav1.Time `json:"switchFinished,omitempty"`
	// Heartbeat is renewed by the agent while it runs.
	// +optional
	Heartbeat *metav1.Time `json:"heartbeat,omitempty"`
	// AgentVersion is the nodespawn version of the agent.
	// +optional
	AgentVersion string `json:"agentVersion,omitempty"`
}

// NodeSpawnNode is one node's desired config and what its agent reports.
// Its name is the Node's; the Node owns it.
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=nsn
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Active",type=string,JSONPath=`.status.activeDigest`
// +kubebuilder:printcolumn:name="Desired",type=string,JSONPath=`.spec.configDigest`
// +kubebuilder:printcolumn:name="Switch",type=boolean,JSONPath=`.spec.switch`
// +kubebuilder:printcolumn:name="Error",type=string,JSONPath=`.status.lastError`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodeSpawnNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NodeSpawnNodeSpec   `json:"spec,omitempty"`
	Status NodeSpawnNodeStatus `json:"status,omitempty"`
}

// NodeSpawnNodeList is a list of NodeSpawnNode.
// +kubebuilder:object:root=true
type NodeSpawnNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeSpawnNode `json:"items"`
}
