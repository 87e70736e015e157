package manifest

import (
	"bufio"
	"fmt"
	"strings"
	"unicode"
)

// unitTypes are the unit type suffixes systemd loads from unit files
// (Ignition also takes .snapshot, a type systemd dropped in v228).
var unitTypes = []string{"service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer", "slice", "scope"}

// unitNameMax is systemd's UNIT_NAME_MAX less the terminating NUL.
const unitNameMax = 255

// MaxExecString is the longest string the kernel passes to a program as
// one argument or one environment entry, without its NUL: MAX_ARG_STRLEN
// (include/uapi/linux/binfmts.h: 32 pages, 128 KiB with 4 KiB pages) less
// one; execve fails with E2BIG beyond it. A service whose Environment=
// assignment (NAME=value, passed whole in the environment) or expanded
// Exec argument is longer never starts. It is tighter than systemd's
// limit on a unit file line (unitLineMax).
const MaxExecString = 32*4096 - 1

// unitLineMax is systemd's LONG_LINE_MAX (src/basic/fileio.h, 1 MiB):
// config_parse (src/shared/conf-parser.c) reads unit files with
// read_line(f, LONG_LINE_MAX, ...) and refuses the whole file ("Line too
// long") when a line reaches it. read_line_full (src/basic/fileio.c) ends
// a line at a NUL byte as well as at '\n' and '\r'.
const unitLineMax = 1 << 20

// unitContentsProblem refuses what systemd would refuse in a unit file or
// drop-in: a line of unitLineMax bytes or more, or a NUL byte, which
// systemd reads as the end of a line.
func unitContentsProblem(contents string) string {
	if strings.IndexByte(contents, 0) >= 0 {
		return "must not contain a NUL byte: systemd ends a unit file line there"
	}
	for line := range strings.Lines(contents) {
		// read_line fails once a line, without its end, reaches the limit.
		if line = strings.TrimRight(line, "\r\n"); len(line) >= unitLineMax {
			return fmt.Sprintf("has a line of %d bytes; systemd refuses unit files with a line of %d bytes or more (LONG_LINE_MAX)", len(line), unitLineMax)
		}
	}
	return ""
}

// unitNameProblem applies systemd's unit_name_is_valid, accepting plain
// names (foo.service), templates (foo@.service) and instances
// (foo@bar.service). The name becomes a file name under
// /etc/systemd/system, so it must also never hold a '/'.
func unitNameProblem(name string) string {
	switch {
	case name == "":
		return "unit name must not be empty"
	case len(name) > unitNameMax:
		return fmt.Sprintf("unit name must be at most %d characters", unitNameMax)
	case strings.Contains(name, "/"):
		return "unit name must not contain '/': it is a file name in the unit directory"
	}
	dot := strings.LastIndexByte(name, '.')
	if dot < 0 {
		return "unit name needs a type suffix, like foo.service"
	}
	if dot == 0 {
		return "unit name needs a name before its type suffix, like foo.service"
	}
	if suffix := name[dot+1:]; !contains(unitTypes, suffix) {
		return fmt.Sprintf("%q is not a unit type; want one of .%s", "."+suffix, strings.Join(unitTypes, ", ."))
	}
	for _, r := range name[:dot] {
		if !unitNameRune(r) {
			return fmt.Sprintf("unit name may hold only ASCII letters, digits, ':', '-', '_', '.', '\\' and '@', not %q (systemd-escape writes other characters as \\xNN)", r)
		}
	}
	if name[0] == '@' {
		return "unit name must not start with '@' (a template is named like foo@.service)"
	}
	return ""
}

func unitNameRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(":-_.\\@", r)
}

// isTemplate reports whether a valid unit name is a template (foo@.service).
func isTemplate(name string) bool {
	dot := strings.LastIndexByte(name, '.')
	return dot > 0 && name[dot-1] == '@' && strings.IndexByte(name, '@') == dot-1
}

// instanceExample names an instance of template name (foo@.service ->
// foo@1.service).
func instanceExample(name string) string {
	at := strings.IndexByte(name, '@')
	return name[:at+1] + "1" + name[at+1:]
}

// dropinNameProblem: systemd reads the files ending in ".conf" from a
// unit's .d directory and skips hidden ones; the name is a file name there.
func dropinNameProblem(name string) string {
	switch {
	case name == "":
		return "drop-in name must not be empty"
	case strings.Contains(name, "/"):
		return "drop-in name must not contain '/': it is a file name in the unit's .d directory"
	case !strings.HasSuffix(name, ".conf"):
		return `drop-in name must end in ".conf"; systemd reads no other files`
	case strings.HasPrefix(name, "."):
		return "drop-in name must not start with '.'; systemd skips hidden files"
	case len(name) > unitNameMax:
		return fmt.Sprintf("drop-in name must be at most %d characters", unitNameMax)
	case strings.ContainsFunc(name, unicode.IsControl):
		return "drop-in name must not contain control characters"
	}
	return ""
}

// InstallTarget is a unit that an [Install] section hooks a unit into.
type InstallTarget struct {
	// Target is the unit named by WantedBy= or RequiredBy=.
	Target string
	// Requires is true for RequiredBy=, false for WantedBy=.
	Requires bool
}

// InstallTargets reads WantedBy= and RequiredBy= from a unit's [Install]
// section, in the order written. Load uses it to refuse enabling a unit
// that has none; render to link the unit into each target.
func InstallTargets(contents string) []InstallTarget {
	var out []InstallTarget
	section := ""
	sc := bufio.NewScanner(strings.NewReader(contents))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = line
			continue
		}
		if section != "[Install]" {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		key = strings.TrimSpace(key)
		if key != "WantedBy" && key != "RequiredBy" {
			continue
		}
		for _, t := range strings.Fields(val) {
			out = append(out, InstallTarget{t, key == "RequiredBy"})
		}
	}
	return out
}
