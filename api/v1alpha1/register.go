package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is nodespawn.dev/v1alpha1. The package registers its types
// with apimachinery alone, so that the agent in the nodespawn binary can use
// them without controller-runtime.
var GroupVersion = schema.GroupVersion{Group: "nodespawn.dev", Version: "v1alpha1"}

var (
	schemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds the nodespawn.dev/v1alpha1 types to a scheme.
	AddToScheme = schemeBuilder.AddToScheme
)

// Resource names, as the API server serves them.
const (
	ResourceConfigs  = "nodespawnconfigs"
	ResourceRollouts = "nodespawnrollouts"
	ResourceNodes    = "nodespawnnodes"
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&NodeSpawnConfig{}, &NodeSpawnConfigList{},
		&NodeSpawnRollout{}, &NodeSpawnRolloutList{},
		&NodeSpawnNode{}, &NodeSpawnNodeList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
