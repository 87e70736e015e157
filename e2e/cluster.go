//go:build e2e

package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The test cluster: a real etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler at the kubelet's version, on the network namespace's
// loopback. The guest reaches the API server through qemu's guestfwd as
// guestHostIP:apiServerPort; the API server reaches the kubelet through
// qemu's hostfwd on the node's address, which run.sh makes local to the
// namespace (CONTROL-PLANE-NOTES.md §7).
const (
	// bootstrapToken is what kubeadm would create: id.secret.
	bootstrapTokenID     = "abcdef"
	bootstrapTokenSecret = "0123456789abcdef"
	bootstrapToken       = bootstrapTokenID + "." + bootstrapTokenSecret
	// execToken is what the exec credential plugin hands the kubelet of
	// execNodeName; the API server's static token file maps it to that
	// node's identity, as a cloud's token webhook would.
	execToken    = "e2e-exec-credential-token"
	execNodeName = "e2e-node-exec"
	serviceCIDR  = "10.96.0.0/16"
	clusterCIDR  = "10.244.0.0/16"
	// guestNodeIP is the guest's slirp address, the node's InternalIP.
	guestNodeIP = "10.0.2.15"
	kubeletPort = 10250
)

// cluster is the running control plane.
type cluster struct {
	dir     string
	kubectl string
	// admin is the system:masters kubeconfig.
	admin string
	caPEM string
	procs []proc
}

// proc is a process start began; done is closed when it has exited.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// startCluster makes the certificates, starts etcd and the control plane
// from the component binaries in bin, and creates the bootstrap token with
// the RBAC kubeadm would. stop kills everything; it is set even on error.
func startCluster(ctx context.Context, bin, dir string) (*cluster, func(), error) {
	c := &cluster{dir: dir, kubectl: filepath.Join(bin, "kubectl"), admin: filepath.Join(dir, "admin.conf")}
	stop := func() {
		// The API server lingers when etcd goes first: stop in reverse.
		for i := len(c.procs) - 1; i >= 0; i-- {
			c.procs[i].stop()
		}
	}
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, stop, err
	}
	if err := c.writePKI(pki); err != nil {
		return nil, stop, fmt.Errorf("cluster certificates: %w", err)
	}
	p := func(name string) string { return filepath.Join(pki, name) }
	tokens := fmt.Sprintf("%s,system:node:%s,%s,\"system:nodes\"\n", execToken, execNodeName, execNodeName)
	if err := os.WriteFile(p("tokens.csv"), []byte(tokens), 0o600); err != nil {
		return nil, stop, err
	}
	if err := c.start("etcd", filepath.Join(bin, "etcd"),
		"--name=e2e", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--unsafe-no-fsync"); err != nil {
		return nil, stop, err
	}
	if err := c.start("kube-apiserver", filepath.Join(bin, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", apiServerPort), "--advertise-address="+guestHostIP,
		"--client-ca-file="+p("ca.crt"), "--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"), "--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--enable-bootstrap-token-auth=true", "--token-auth-file="+p("tokens.csv"), "--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction", "--allow-privileged=true"); err != nil {
		return nil, stop, err
	}
	// The controller manager exits when it starts before the API server's
	// RBAC bootstrap policy exists: wait for /readyz first.
	if err := c.waitReady(ctx, pki, 2*time.Minute); err != nil {
		return nil, stop, err
	}
	if err := c.start("kube-controller-manager", filepath.Join(bin, "kube-controller-manager"),
		"--kubeconfig="+p("controller-manager.conf"),
		"--authentication-kubeconfig="+p("controller-manager.conf"), "--authorization-kubeconfig="+p("controller-manager.conf"),
		"--bind-address=127.0.0.1", "--leader-elect=false",
		"--client-ca-file="+p("ca.crt"), "--root-ca-file="+p("ca.crt"),
		"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
		"--service-account-private-key-file="+p("sa.key"), "--use-service-account-credentials=true",
		// "*" has the CSR approver and signer; these two are off by default.
		"--controllers=*,bootstrapsigner,tokencleaner",
		"--allocate-node-cidrs=true", "--cluster-cidr="+clusterCIDR, "--service-cluster-ip-range="+serviceCIDR); err != nil {
		return nil, stop, err
	}
	if err := c.start("kube-scheduler", filepath.Join(bin, "kube-scheduler"),
		"--kubeconfig="+p("scheduler.conf"),
		"--authentication-kubeconfig="+p("scheduler.conf"), "--authorization-kubeconfig="+p("scheduler.conf"),
		"--bind-address=127.0.0.1", "--leader-elect=false"); err != nil {
		return nil, stop, err
	}
	bootstrap := filepath.Join(dir, "bootstrap.yaml")
	if err := os.WriteFile(bootstrap, []byte(bootstrapObjects), 0o644); err != nil {
		return nil, stop, err
	}
	if _, err := c.run(ctx, "apply", "-f", bootstrap); err != nil {
		return nil, stop, err
	}
	return c, stop, nil
}

// start runs one component with its output in dir/NAME.log; it dies with
// the test binary.
func (c *cluster) start(name, bin string, args ...string) error {
	_, err := c.startProc(name, bin, args...)
	return err
}

// startProc is start, and returns the process (to stop it before the
// cluster, or to see it exit).
func (c *cluster) startProc(name, bin string, args ...string) (proc, error) {
	logFile, err := os.Create(c.logPath(name))
	if err != nil {
		return proc{}, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return proc{}, fmt.Errorf("start %s: %w", name, err)
	}
	p := proc{cmd, make(chan struct{})}
	go func() { cmd.Wait(); logFile.Close(); close(p.done) }()
	c.procs = append(c.procs, p)
	return p, nil
}

// stop kills the process and waits until it has exited.
func (p proc) stop() {
	p.cmd.Process.Kill()
	<-p.done
}

// logPath is where the process start ran as name logs.
func (c *cluster) logPath(name string) string { return filepath.Join(c.dir, name+".log") }

// waitReady polls the API server's /readyz with the admin certificate.
func (c *cluster) waitReady(ctx context.Context, pki string, timeout time.Duration) error {
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "admin.crt"), filepath.Join(pki, "admin.key"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(c.caPEM))
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) && ctx.Err() == nil {
		resp, err := hc.Get(fmt.Sprintf("https://127.0.0.1:%d/readyz", apiServerPort))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, b)
		} else {
			last = err.Error()
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready within %s (last: %s); see %s", timeout, last, filepath.Join(c.dir, "kube-apiserver.log"))
}

// run is kubectl with the admin kubeconfig.
func (c *cluster) run(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.kubectl, append([]string{"--kubeconfig=" + c.admin}, args...)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// writePKI makes the cluster CA (also the CSR signing CA, as in kubeadm),
// the serving and client certificates, the service-account key and the
// kubeconfigs the components use.
func (c *cluster) writePKI(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nodespawn-e2e-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	c.caPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), []byte(c.caPEM), 0o644); err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, "ca.key"), caKey); err != nil {
		return err
	}
	serial := int64(2)
	issue := func(name string, subject pkix.Name, usage x509.ExtKeyUsage, ips []string, dns []string) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: subject,
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, DNSNames: dns, BasicConstraintsValid: true,
		}
		serial++
		for _, ip := range ips {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
			return err
		}
		return writeKey(filepath.Join(dir, name+".key"), key)
	}
	masters := []string{"system:masters"}
	for _, x := range []struct {
		name    string
		subject pkix.Name
		usage   x509.ExtKeyUsage
		ips     []string
		dns     []string
	}{
		// 10.96.0.1 is the kubernetes Service's address in pods.
		{"apiserver", pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth,
			[]string{"127.0.0.1", guestHostIP, "10.96.0.1"},
			[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"}},
		{"apiserver-kubelet-client", pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: masters}, x509.ExtKeyUsageClientAuth, nil, nil},
		{"admin", pkix.Name{CommonName: "kubernetes-admin", Organization: masters}, x509.ExtKeyUsageClientAuth, nil, nil},
		{"controller-manager", pkix.Name{CommonName: "system:kube-controller-manager"}, x509.ExtKeyUsageClientAuth, nil, nil},
		{"scheduler", pkix.Name{CommonName: "system:kube-scheduler"}, x509.ExtKeyUsageClientAuth, nil, nil},
	} {
		if err := issue(x.name, x.subject, x.usage, x.ips, x.dns); err != nil {
			return fmt.Errorf("issue %s: %w", x.name, err)
		}
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, "sa.key"), saKey); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return err
	}
	for name, conf := range map[string]string{"admin": c.admin, "controller-manager": filepath.Join(dir, "controller-manager.conf"), "scheduler": filepath.Join(dir, "scheduler.conf")} {
		if err := c.writeKubeconfig(conf, filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	return nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

// writeKubeconfig writes a kubeconfig for the loopback API server with the
// client certificate at certBase.crt/.key.
func (c *cluster) writeKubeconfig(path, certBase string) error {
	b64 := func(p string) (string, error) {
		b, err := os.ReadFile(p)
		return base64.StdEncoding.EncodeToString(b), err
	}
	crt, err := b64(certBase + ".crt")
	if err != nil {
		return err
	}
	key, err := b64(certBase + ".key")
	if err != nil {
		return err
	}
	conf := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://127.0.0.1:%d", certificate-authority-data: %s}
users:
- name: e2e
  user: {client-certificate-data: %s, client-key-data: %s}
contexts:
- name: e2e
  context: {cluster: e2e, user: e2e}
current-context: e2e
`, apiServerPort, base64.StdEncoding.EncodeToString([]byte(c.caPEM)), crt, key)
	return os.WriteFile(path, []byte(conf), 0o600)
}

// bootstrapObjects are the bootstrap token Secret and the RBAC `kubeadm init`
// creates for joining nodes: bootstrappers may create CSRs, their first
// client CSR is approved automatically, and nodes may renew their own.
const bootstrapObjects = `apiVersion: v1
kind: Secret
metadata: {name: bootstrap-token-` + bootstrapTokenID + `, namespace: kube-system}
type: bootstrap.kubernetes.io/token
stringData:
  token-id: ` + bootstrapTokenID + `
  token-secret: ` + bootstrapTokenSecret + `
  usage-bootstrap-authentication: "true"
  usage-bootstrap-signing: "true"
  auth-extra-groups: system:bootstrappers:kubeadm:default-node-token
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "kubeadm:kubelet-bootstrap"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node-bootstrapper"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:kubeadm:default-node-token"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "kubeadm:node-autoapprove-bootstrap"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:nodeclient"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:kubeadm:default-node-token"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "kubeadm:node-autoapprove-certificate-rotation"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
`
