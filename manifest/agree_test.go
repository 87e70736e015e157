package manifest

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kaptinlin/jsonschema"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/schema"
)

// shape is one node of a structure: its JSON kind and its members.
type shape struct {
	kind   string // object, map, array, scalar
	fields map[string]*shape
	elem   *shape // map values and array items
}

func goShape(t reflect.Type) *shape {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		s := &shape{kind: "object", fields: map[string]*shape{}}
		addStructFields(t, s)
		return s
	case reflect.Slice:
		return &shape{kind: "array", elem: goShape(t.Elem())}
	case reflect.Map:
		return &shape{kind: "map", elem: goShape(t.Elem())}
	}
	return &shape{kind: "scalar"}
}

func addStructFields(t reflect.Type, s *shape) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if f.Anonymous && name == "" {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			addStructFields(ft, s)
			continue
		}
		if !f.IsExported() || name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		s.fields[name] = goShape(f.Type)
	}
}

func schemaShape(s *jsonschema.Schema) *shape {
	for s.ResolvedRef != nil {
		s = s.ResolvedRef
	}
	switch {
	case s.Properties != nil:
		sh := &shape{kind: "object", fields: map[string]*shape{}}
		for name, p := range *s.Properties {
			sh.fields[name] = schemaShape(p)
		}
		return sh
	case s.Items != nil:
		return &shape{kind: "array", elem: schemaShape(s.Items)}
	}
	if ap := s.AdditionalProperties; ap != nil && ap.Boolean == nil {
		return &shape{kind: "map", elem: schemaShape(ap)}
	}
	return &shape{kind: "scalar"}
}

// compareShapes reports every member one side has and the other lacks.
func compareShapes(errorf func(string, ...any), path string, g, s *shape) {
	if g.kind != s.kind {
		errorf("%s: Go type is %s, schema says %s", path, g.kind, s.kind)
		return
	}
	var names []string
	for n := range g.fields {
		names = append(names, n)
	}
	for n := range s.fields {
		if _, ok := g.fields[n]; !ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		gf, sf := g.fields[n], s.fields[n]
		switch {
		case sf == nil:
			errorf("%s.%s: in the Go types, not in the schema", path, n)
		case gf == nil:
			errorf("%s.%s: in the schema, not in the Go types", path, n)
		default:
			compareShapes(errorf, path+"."+n, gf, sf)
		}
	}
	if g.elem != nil && s.elem != nil {
		compareShapes(errorf, path+"[]", g.elem, s.elem)
	}
}

func TestSchemaMatchesTypes(t *testing.T) {
	sch, err := schema.Compile()
	if err != nil {
		t.Fatal(err)
	}
	g := goShape(reflect.TypeOf(Manifest{}))
	s := schemaShape(sch)
	if len(g.fields) < 6 || len(s.fields) < 6 {
		t.Fatalf("walk found too little: go %d fields, schema %d", len(g.fields), len(s.fields))
	}
	compareShapes(t.Errorf, "$", g, s)
}

// TestShapeCompareFails keeps the agreement test honest: a member missing
// on either side, however deep, must be noticed.
func TestShapeCompareFails(t *testing.T) {
	type extraTaint struct {
		Taint
		Bogus string `json:"bogus"`
	}
	type kube struct {
		Kubernetes
		Taints []extraTaint `json:"taints"`
	}
	type manifest struct {
		Manifest
		Kubernetes kube `json:"kubernetes"`
	}
	sch, err := schema.Compile()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	collect := func(format string, args ...any) { got = append(got, fmt.Sprintf(format, args...)) }
	compareShapes(collect, "$", goShape(reflect.TypeOf(manifest{})), schemaShape(sch))
	if len(got) != 1 || !strings.HasPrefix(got[0], "$.kubernetes.taints[].bogus:") {
		t.Fatalf("want one complaint about $.kubernetes.taints[].bogus, got %q", got)
	}
}

func TestExamples(t *testing.T) {
	files, err := filepath.Glob("../examples/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 4 {
		t.Fatalf("found %d examples, want at least 4", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			// User-data examples (cloud-config, MIME multipart) carry a
			// manifest inside; the source tests read those.
			for _, p := range []string{"#cloud-config", "Content-Type:", "MIME-Version:"} {
				if strings.HasPrefix(string(data), p) {
					t.Skipf("%s is user-data, not a manifest", f)
				}
			}
			if !strings.HasPrefix(string(data), "# yaml-language-server: $schema=../schema/schema.json\n") {
				t.Errorf("%s: does not start with the yaml-language-server modeline", f)
			}
			m, err := Load(f, data)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if m.Kubernetes.APIServer == "" {
				t.Errorf("decoded manifest has no apiServer")
			}
		})
	}
}

// TestSchemaDefaults keeps the defaults editors show (the schema's
// "default" annotations) equal to the ones Load applies.
func TestSchemaDefaults(t *testing.T) {
	sch, err := schema.Compile()
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]any{
		"machine.name":                    DefaultMachineName,
		"machine.rootfs.image":            DefaultImage,
		"machine.rootfs.gpuImage":         DefaultGPUImage,
		"machine.rootfs.layout.reference": DefaultLayoutReference,
		"machine.gpu":                     string(SwitchAuto),
		"machine.kvm":                     string(SwitchAuto),
		"machine.bpffs":                   string(SwitchOn),
		"kubernetes.version":              DefaultKubernetesVersion,
		"kubernetes.clusterDomain":        DefaultClusterDomain,
		"kubernetes.sandboxImage":         DefaultSandboxImage,
		"kubernetes.auth.exec.apiVersion": DefaultExecAPIVersion,
		"host.nftablesFlush":              true,
		"host.disableSwap":                true,
		"host.installPackages":            true,
		"host.aptGuard":                   false,
		"upgrade.readyTimeout":            DefaultReadyTimeout,
		"upgrade.stopTimeout":             DefaultStopTimeout,
	} {
		s := sch
		for _, name := range strings.Split(path, ".") {
			s = properties(deref(s))[name]
			if s == nil {
				t.Fatalf("%s: not in the schema", path)
			}
		}
		if s.Default == nil || s.Default != want {
			t.Errorf("%s: schema default %v, Load's default %v", path, s.Default, want)
		}
	}
}

// TestDefaultStopTimeout: the stop timeout of a manifest that sets
// neither it nor the grace period is layout's one default, which is the
// default grace period plus layout's margin.
func TestDefaultStopTimeout(t *testing.T) {
	if got := parseDuration(DefaultShutdownGracePeriod) + layout.StopMargin; got != layout.DefaultStopTimeout {
		t.Errorf("default grace period %s + margin %s = %s, want layout.DefaultStopTimeout %s", DefaultShutdownGracePeriod, layout.StopMargin, got, layout.DefaultStopTimeout)
	}
	var m Manifest
	ApplyDefaults(&m)
	if Duration(m.Upgrade.StopTimeout) != layout.DefaultStopTimeout || m.Upgrade.StopTimeout != DefaultStopTimeout {
		t.Errorf("upgrade.stopTimeout defaults to %q, want %q (%s)", m.Upgrade.StopTimeout, DefaultStopTimeout, layout.DefaultStopTimeout)
	}
	if Duration(m.Upgrade.ReadyTimeout) != layout.DefaultReadyTimeout || m.Upgrade.ReadyTimeout != "10m" {
		t.Errorf("upgrade.readyTimeout defaults to %q, want \"10m\" (%s)", m.Upgrade.ReadyTimeout, layout.DefaultReadyTimeout)
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		10 * time.Minute: "10m", 90 * time.Second: "1m30s", time.Hour: "1h",
		90 * time.Minute: "1h30m", 30 * time.Second: "30s", time.Hour + time.Second: "1h0m1s",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}
