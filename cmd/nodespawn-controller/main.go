// Command nodespawn-controller drives fleet rollouts: it enrols Nodes
// labelled nodespawn.dev/managed=true (a NodeSpawnNode each), validates
// NodeSpawnConfigs and rolls them out by NodeSpawnRollouts, in waves, with
// cordon, drain, health gates and a failure budget. It runs as a Deployment
// (deploy/controller); replicas elect a leader through a Lease.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/fleet/controller"
)

var version = "dev"

func main() {
	var (
		metricsAddr   = flag.String("metrics-bind-address", ":8080", "where Prometheus metrics are served (0 turns them off)")
		probeAddr     = flag.String("health-probe-bind-address", ":8081", "where /healthz and /readyz are served")
		leaderElect   = flag.Bool("leader-elect", true, "elect a leader through a Lease, so that only one replica acts")
		leaseNS       = flag.String("leader-election-namespace", "", "namespace of the Lease (default: the pod's, from POD_NAMESPACE, else nodespawn-system)")
		leaseDuration = flag.Duration("lease-duration", 15*time.Second, "how long a leader's Lease lasts without renewal")
		showVersion   = flag.Bool("version", false, "print the version and exit")
	)
	opts := zap.Options{}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	if err := run(*metricsAddr, *probeAddr, *leaderElect, *leaseNS, *leaseDuration); err != nil {
		fmt.Fprintln(os.Stderr, "nodespawn-controller:", err)
		os.Exit(1)
	}
}

func run(metricsAddr, probeAddr string, leaderElect bool, leaseNS string, leaseDuration time.Duration) error {
	if leaseNS == "" {
		leaseNS = os.Getenv("POD_NAMESPACE")
	}
	if leaseNS == "" {
		leaseNS = "nodespawn-system"
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("no cluster to talk to (in a pod: its service account; else --kubeconfig or KUBECONFIG): %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	renew := leaseDuration * 2 / 3
	retry := leaseDuration / 7
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                        scheme,
		Metrics:                       metricsserver.Options{BindAddress: metricsAddr},
		HealthProbeBindAddress:        probeAddr,
		LeaderElection:                leaderElect,
		LeaderElectionID:              "nodespawn-controller.nodespawn.dev",
		LeaderElectionNamespace:       leaseNS,
		LeaderElectionReleaseOnCancel: true,
		LeaseDuration:                 &leaseDuration,
		RenewDeadline:                 &renew,
		RetryPeriod:                   &retry,
	})
	if err != nil {
		return err
	}
	if err := controller.Setup(mgr, controller.Options{Registry: metrics.Registry}); err != nil {
		return err
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return err
	}
	ctrl.Log.Info("starting", "version", version, "leaderElection", leaderElect, "leaseNamespace", leaseNS)
	return mgr.Start(ctrl.SetupSignalHandler())
}
