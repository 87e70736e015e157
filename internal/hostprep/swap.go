package hostprep

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// swapMarker precedes each fstab entry DisableSwap comments out, so a reader
// knows who did it and why.
const swapMarker = "# nodespawn: swap disabled (kubelet requires swap off); original entry:"

// disableSwap turns off every active swap area listed in <root>/proc/swaps
// and comments out the swap entries of the fstab at <root>/<fstab>, so swap
// stays off after a reboot. Only entries whose type (third field) is "swap"
// are touched; comments, blank lines and the spacing of every other line are
// kept. The file is rewritten atomically and only when something changed, so
// a second call does nothing. A missing proc/swaps (a --root that is not a
// live system) means no active swap; a missing fstab means no entries.
func disableSwap(ctx context.Context, log *slog.Logger, root, fstab string, swapoff func(string) error) error {
	if root == "" {
		root = "/"
	}
	areas, err := activeSwaps(filepath.Join(root, "proc/swaps"))
	if err != nil {
		return fmt.Errorf("disable swap: %w", err)
	}
	var errs []error
	for _, a := range areas {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("disable swap: %w", err)
		}
		if err := swapoff(a); err != nil {
			errs = append(errs, fmt.Errorf("swapoff %s: %w", a, err))
			continue
		}
		log.InfoContext(ctx, "swap turned off", "area", a)
	}
	if len(errs) > 0 {
		return fmt.Errorf("disable swap (is there enough free memory to take the swapped pages back?): %w", errors.Join(errs...))
	}
	if fstab == "" {
		return nil
	}
	host, err := confine.Open(root)
	if err != nil {
		return fmt.Errorf("disable swap: %w", err)
	}
	defer host.Close()
	data, err := host.ReadFile(fstab)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("disable swap: read fstab: %w", err)
	}
	out, n := commentSwapEntries(data)
	if n == 0 {
		return nil
	}
	// The fstab itself, not a link to it, is rewritten (the link stays).
	fi, err := host.Stat(fstab)
	if err != nil {
		return fmt.Errorf("disable swap: %w", err)
	}
	target := fstab
	if lfi, err := host.Lstat(fstab); err == nil && lfi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("disable swap: %s is a symlink; comment out its swap entries by hand or point the manifest's host.swap.fstab at the real file", host.Show(fstab))
	}
	uid, gid := confine.Owner(fi)
	// Keep the fstab's own mode and owner; only its swap lines change.
	if err := host.WriteFile(target, out, confine.ModeOf(fi), uid, gid); err != nil {
		return fmt.Errorf("disable swap: rewrite fstab: %w", err)
	}
	log.InfoContext(ctx, "swap entries commented out", "fstab", host.Show(fstab), "entries", n)
	return nil
}

// swapoff is swapoff(2); x/sys/unix has the number but no wrapper.
func swapoff(path string) error {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	if _, _, errno := unix.Syscall(unix.SYS_SWAPOFF, uintptr(unsafe.Pointer(p)), 0, 0); errno != 0 {
		return errno
	}
	return nil
}

// activeSwaps lists the areas in a /proc/swaps file, unescaping the octal
// escapes the kernel uses for blanks in file names.
func activeSwaps(procSwaps string) ([]string, error) {
	data, err := os.ReadFile(procSwaps)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read active swaps: %w", err)
	}
	var areas []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	first := true
	for sc.Scan() {
		if first {
			first = false // the "Filename Type Size Used Priority" header
			continue
		}
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		areas = append(areas, unescapeOctal(fields[0]))
	}
	return areas, sc.Err()
}

// unescapeOctal undoes the kernel's \ooo escapes in a /proc/swaps file
// name (\040 for a space, \011 a tab, \012 a newline, \134 a
// backslash). The mount table's are moby/sys/mountinfo's to undo; this
// file is not a mount table.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// commentSwapEntries comments out every fstab entry whose type is swap and
// returns the new contents and how many entries it changed. Lines are split
// with their own endings, so CRLF files and a missing final newline survive.
func commentSwapEntries(data []byte) ([]byte, int) {
	var out bytes.Buffer
	n := 0
	for len(data) > 0 {
		line := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line = data[:i+1]
		}
		data = data[len(line):]
		body := bytes.TrimRight(line, "\r\n")
		fields := strings.Fields(string(body))
		if len(fields) >= 3 && !strings.HasPrefix(fields[0], "#") && fields[2] == "swap" {
			eol := line[len(body):]
			if len(eol) == 0 {
				eol = []byte("\n")
			}
			out.WriteString(swapMarker)
			out.Write(eol)
			out.WriteString("#")
			out.Write(line)
			n++
			continue
		}
		out.Write(line)
	}
	return out.Bytes(), n
}
