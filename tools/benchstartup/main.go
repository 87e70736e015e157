// Command benchstartup compares how fast two builds of nodespawn start:
// the tree as it is and an earlier revision (the previous release), built
// the same way into a temporary directory and run in the same session,
// alternately, so both see the same machine load. For each command line
// it prints the median and the fastest wall time, the median CPU time
// (user+system, steadier than wall on a busy machine) and the median of
// the package init time the Go runtime reports (GODEBUG=inittrace=1, in
// separate runs). Where the time goes, package by package:
//
//	GODEBUG=inittrace=1 bin/nodespawn version 2>&1 >/dev/null | sort -k5 -n -r | head
//
//	go run ./tools/benchstartup -base v0.3.0 -n 30
//
// Below the two builds it prints floors: do-nothing Go programs with no
// imports, with net/http, and with every package nodespawn imports, so
// that what is nodespawn's own start-up can be told from what any Go
// binary with those dependencies pays on this machine.
//
// A benchmark, not a test: it asserts nothing, the figures are read.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

func main() {
	base := flag.String("base", "HEAD~", "the revision to compare with (a release tag)")
	n := flag.Int("n", 20, "runs of each command line by each build")
	keep := flag.Bool("keep", false, "keep the temporary directory with both builds")
	flag.Parse()
	log.SetFlags(0)

	top := strings.TrimSpace(output("git", "rev-parse", "--show-toplevel"))
	rev := strings.TrimSpace(output("git", "rev-parse", "--short", *base))
	tmp, err := os.MkdirTemp("", "nodespawn-bench-startup-")
	if err != nil {
		log.Fatal(err)
	}
	if *keep {
		log.Printf("builds kept in %s", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}

	// The earlier revision from git's object store (git archive leaves no
	// worktree behind), built with the same toolchain and flags.
	src := filepath.Join(tmp, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		log.Fatal(err)
	}
	archive := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", rev, src)
	archive.Dir, archive.Stderr = top, os.Stderr
	if err := archive.Run(); err != nil {
		log.Fatalf("git archive %s: %v", rev, err)
	}
	builds := []struct{ name, bin, dir string }{
		{rev, filepath.Join(tmp, "base"), src},
		{"this tree", filepath.Join(tmp, "head"), top},
	}
	for _, b := range builds {
		log.Printf("building %s", b.name)
		build := exec.Command("go", "build", "-o", b.bin, ".")
		build.Dir, build.Stdout, build.Stderr = b.dir, os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			log.Fatalf("build %s: %v", b.name, err)
		}
	}
	floors := buildFloors(top, tmp)

	lines := [][]string{
		{"version"},
		{"apply", "--dry-run", "-f", "examples/minimal.yaml"},
	}
	fmt.Printf("%-52s %-10s %9s %9s %9s %9s\n", "command (n="+strconv.Itoa(*n)+")", "build", "wall p50", "wall min", "cpu p50", "init p50")
	for _, args := range lines {
		type sample struct{ wall, cpu, init []time.Duration }
		samples := make([]sample, len(builds))
		for i := -2; i < *n; i++ { // two runs each to warm the page cache
			for j, b := range builds {
				wall, cpu, _ := runOnce(top, b.bin, args, false)
				if i >= 0 {
					samples[j].wall = append(samples[j].wall, wall)
					samples[j].cpu = append(samples[j].cpu, cpu)
				}
			}
		}
		// The init figures from runs of their own: writing the trace
		// slows the process it measures.
		for range min(*n, 10) {
			for j, b := range builds {
				_, _, init := runOnce(top, b.bin, args, true)
				samples[j].init = append(samples[j].init, init)
			}
		}
		for j, b := range builds {
			s := samples[j]
			fmt.Printf("%-52s %-10s %9s %9s %9s %9s\n", "nodespawn "+strings.Join(args, " "), b.name,
				ms(median(s.wall)), ms(slices.Min(s.wall)), ms(median(s.cpu)), ms(median(s.init)))
		}
	}

	// The floors: what a process that does nothing costs here, with no
	// imports, with net/http and crypto/tls (any binary that downloads
	// over HTTPS), and with every package nodespawn's main imports (their
	// package init, nodespawn's own code never run). version minus the
	// last is what nodespawn's own start-up costs.
	fmt.Printf("\n%-52s %9s %9s %9s %9s\n", "floor (n="+strconv.Itoa(*n)+")", "wall p50", "wall min", "cpu p50", "init p50")
	for _, f := range floors {
		var wall, cpu, init []time.Duration
		for i := -2; i < *n; i++ {
			w, c, _ := runOnce(top, f.bin, nil, false)
			if i >= 0 {
				wall, cpu = append(wall, w), append(cpu, c)
			}
		}
		for range min(*n, 10) {
			_, _, in := runOnce(top, f.bin, nil, true)
			init = append(init, in)
		}
		fmt.Printf("%-52s %9s %9s %9s %9s\n", f.name, ms(median(wall)), ms(slices.Min(wall)), ms(median(cpu)), ms(median(init)))
	}
}

type floor struct{ name, bin string }

// buildFloors builds the do-nothing programs the figures are read against.
// The one with nodespawn's imports is built inside the module (an overlay
// adds its file, so internal packages import and the tree is not
// written to).
func buildFloors(top, tmp string) []floor {
	imports := strings.Fields(output("go", "list", "-f", `{{join .Imports " "}}`, top))
	var withDeps strings.Builder
	withDeps.WriteString("package main\n\nimport (\n")
	for _, p := range imports {
		fmt.Fprintf(&withDeps, "\t_ %q\n", p)
	}
	withDeps.WriteString(")\n\nfunc main() {}\n")
	progs := []struct{ name, src string }{
		{"go: main() {}, no imports", "package main\n\nfunc main() {}\n"},
		{"go: net/http and crypto/tls imported", "package main\n\nimport (\n\t_ \"crypto/tls\"\n\t_ \"net/http\"\n)\n\nfunc main() {}\n"},
		{"go: nodespawn's " + strconv.Itoa(len(imports)) + " imports, main() {}", withDeps.String()},
	}
	var out []floor
	for i, p := range progs {
		file := filepath.Join(tmp, fmt.Sprintf("floor%d.go", i))
		if err := os.WriteFile(file, []byte(p.src), 0o644); err != nil {
			log.Fatal(err)
		}
		// A package of its own under the module, that only the overlay
		// holds.
		pkg := filepath.Join(top, "internal", fmt.Sprintf("zz-benchstartup-floor%d", i))
		overlay := filepath.Join(tmp, fmt.Sprintf("overlay%d.json", i))
		o := fmt.Sprintf(`{"Replace": {%q: %q}}`, filepath.Join(pkg, "main.go"), file)
		if err := os.WriteFile(overlay, []byte(o), 0o644); err != nil {
			log.Fatal(err)
		}
		bin := filepath.Join(tmp, fmt.Sprintf("floor%d", i))
		build := exec.Command("go", "build", "-overlay", overlay, "-o", bin, "./"+filepath.Base(filepath.Dir(pkg))+"/"+filepath.Base(pkg))
		build.Dir, build.Stdout, build.Stderr = top, os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			log.Fatalf("build floor %q: %v", p.name, err)
		}
		out = append(out, floor{p.name, bin})
	}
	return out
}

// initLine is one package's line of GODEBUG=inittrace=1.
var initLine = regexp.MustCompile(`(?m)^init \S+ @\S+ ms, ([0-9.]+) ms clock`)

// runOnce runs the binary once with its output discarded, and returns its
// wall time, CPU time and, with trace, the package init time it reported.
func runOnce(dir, bin string, args []string, trace bool) (wall, cpu, init time.Duration) {
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	if trace {
		cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		log.Fatalf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, stderr.String())
	}
	wall = time.Since(start)
	cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	for _, m := range initLine.FindAllStringSubmatch(stderr.String(), -1) {
		f, _ := strconv.ParseFloat(m[1], 64)
		init += time.Duration(f * float64(time.Millisecond))
	}
	return wall, cpu, init
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

func output(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		log.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return string(out)
}
