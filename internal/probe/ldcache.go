package probe

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// libEntry is one linker-cache entry: the name a program asks for and the
// file the dynamic linker loads for it.
type libEntry struct {
	Name string
	Path string
	// Arch is the Go architecture the entry is built for; empty for an ABI
	// the probe does not bind (x32, armhf, ...).
	Arch string
}

// Magic strings of glibc's ld.so.cache. glibc 2.32+ writes only the new
// format; older ones (Ubuntu 20.04, Debian 11) write the "compat" layout: an
// old-format table followed by the new one, which is the part we read.
const (
	newCacheMagic = "glibc-ld.so.cache1.1"
	oldCacheMagic = "ld.so-1.7.0"
)

// Sizes of the on-disk records (glibc's struct cache_file_new and
// struct file_entry_new; struct cache_file and struct file_entry).
const (
	newHeaderSize = 48
	newEntrySize  = 24
	oldHeaderSize = 16
	oldEntrySize  = 12
)

// Entry flags: the low byte is the library type, the high byte the ABI.
// Only the ABIs nodespawn can run on matter; everything else is skipped.
const (
	flagELFLibc6  = 0x0003
	flagX8664     = 0x0300
	flagAArch64   = 0x0a00
	flagsMaskUsed = 0xffff
)

// archOfFlags maps an entry's flags to a Go architecture name.
func archOfFlags(flags uint32) string {
	switch flags & flagsMaskUsed {
	case flagELFLibc6 | flagX8664:
		return "amd64"
	case flagELFLibc6 | flagAArch64:
		return "arm64"
	case flagELFLibc6:
		// Plain libc6 is i386 on x86 hosts (the 32-bit NVIDIA libraries in
		// /usr/lib/i386-linux-gnu that must not be bound on amd64).
		return "386"
	}
	return ""
}

// archOfText maps the ABI tag `ldconfig -p` prints in parentheses.
var archOfText = map[string]string{
	"libc6,x86-64":  "amd64",
	"libc6,AArch64": "arm64",
	"libc6":         "386",
}

// parseLdCache reads a linker cache: the binary /etc/ld.so.cache (new or
// compat format) or the text `ldconfig -p` prints, told apart by the magic.
func parseLdCache(data []byte) ([]libEntry, error) {
	if bytes.HasPrefix(data, []byte(oldCacheMagic)) {
		newPart, err := skipOldCache(data)
		if err != nil {
			return nil, err
		}
		return parseNewCache(newPart)
	}
	if bytes.HasPrefix(data, []byte(newCacheMagic)) {
		return parseNewCache(data)
	}
	return parseLdconfigText(data)
}

// skipOldCache returns the new-format cache that follows the old table in a
// compat-format file.
func skipOldCache(data []byte) ([]byte, error) {
	if len(data) < oldHeaderSize {
		return nil, errors.New("old-format header is truncated")
	}
	nlibs := binary.NativeEndian.Uint32(data[12:16])
	end := uint64(oldHeaderSize) + uint64(nlibs)*oldEntrySize
	if end > uint64(len(data)) {
		return nil, fmt.Errorf("old-format table of %d entries runs past the end of the file", nlibs)
	}
	// The new part is aligned to the new header's alignment: 8 on 64-bit
	// hosts, 4 on some 32-bit ones; look at both places.
	rest := data[end:]
	for skip := 0; skip < 8 && skip < len(rest); skip++ {
		if bytes.HasPrefix(rest[skip:], []byte(newCacheMagic)) {
			return rest[skip:], nil
		}
	}
	return nil, errors.New("old-format-only cache (no glibc-ld.so.cache1.1 part); run ldconfig to rebuild it")
}

// parseNewCache decodes the "glibc-ld.so.cache1.1" format. String offsets
// are relative to the start of this header.
func parseNewCache(data []byte) ([]libEntry, error) {
	if len(data) < newHeaderSize {
		return nil, errors.New("header is truncated")
	}
	var order binary.ByteOrder
	switch data[28] & 3 {
	case 0: // written before glibc recorded byte order: the writer's own
		order = binary.NativeEndian
	case 2:
		order = binary.LittleEndian
	case 3:
		order = binary.BigEndian
	default:
		return nil, errors.New("header marks the byte order invalid")
	}
	nlibs := order.Uint32(data[20:24])
	if uint64(newHeaderSize)+uint64(nlibs)*newEntrySize > uint64(len(data)) {
		return nil, fmt.Errorf("table of %d entries runs past the end of the file", nlibs)
	}
	entries := make([]libEntry, 0, nlibs)
	for i := range int(nlibs) {
		rec := data[newHeaderSize+i*newEntrySize:]
		flags := order.Uint32(rec[0:4])
		name, err := cString(data, order.Uint32(rec[4:8]))
		if err != nil {
			return nil, fmt.Errorf("entry %d name: %w", i, err)
		}
		path, err := cString(data, order.Uint32(rec[8:12]))
		if err != nil {
			return nil, fmt.Errorf("entry %d path: %w", i, err)
		}
		entries = append(entries, libEntry{Name: name, Path: path, Arch: archOfFlags(flags)})
	}
	return entries, nil
}

// cString reads the NUL-terminated string at off.
func cString(data []byte, off uint32) (string, error) {
	if uint64(off) >= uint64(len(data)) {
		return "", fmt.Errorf("string offset %d is past the end of the file", off)
	}
	n := bytes.IndexByte(data[off:], 0)
	if n < 0 {
		return "", fmt.Errorf("string at offset %d is not terminated", off)
	}
	return string(data[off : int(off)+n]), nil
}

// ldconfigLine matches one `ldconfig -p` entry:
//
//	libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
//	libfoo.so (libc6,x86-64, hwcap: "x86-64-v3") => /usr/lib/...
var ldconfigLine = lazyre.New(`^(\S+) \(([^)]*)\) => (\S.*)$`)

// ldconfigChatter matches the lines around the entries: the count on top,
// and the generator note glibc 2.32+ prints at the end.
var ldconfigChatter = lazyre.New("^(\\d+ libs found in cache `.*'|Cache generated by: .*)$")

// parseLdconfigText reads what `ldconfig -p` prints.
func parseLdconfigText(data []byte) ([]libEntry, error) {
	var entries []libEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || ldconfigChatter().MatchString(line) {
			continue
		}
		m := ldconfigLine().FindStringSubmatch(line)
		if m == nil {
			return nil, fmt.Errorf("line %d is neither a binary ld.so.cache nor an `ldconfig -p` entry: %q", n, line)
		}
		// The ABI tag is the type and the arch; hwcap and OS ABI notes
		// follow after ", " and do not change the arch.
		tag, _, _ := strings.Cut(m[2], ", ")
		entries = append(entries, libEntry{Name: m[1], Path: m[3], Arch: archOfText[tag]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return entries, nil
}
