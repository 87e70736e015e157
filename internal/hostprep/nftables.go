package hostprep

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/google/nftables"
)

// flushNftablesIn flushes the ruleset of the network namespace at netnsPath
// (/run/netns/<name>, /proc/<pid>/ns/net) and leaves the caller's own
// namespace alone.
func flushNftablesIn(ctx context.Context, log *slog.Logger, netnsPath string) error {
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("flush nftables: open network namespace: %w", err)
	}
	defer f.Close()
	return flushNftables(ctx, log, netnsPath, nftables.WithNetNSFd(int(f.Fd())))
}

func flushNftables(ctx context.Context, log *slog.Logger, where string, opts ...nftables.ConnOption) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("flush nftables in %s: %w", where, err)
	}
	conn, err := nftables.New(append(opts, nftables.AsLasting())...)
	if err != nil {
		return fmt.Errorf("flush nftables in %s: open netlink: %w", where, err)
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTables()
	if err != nil {
		return fmt.Errorf("flush nftables in %s: list tables (is nf_tables available?): %w", where, err)
	}
	if len(tables) == 0 {
		return nil
	}
	names := make([]string, 0, len(tables))
	for _, t := range tables {
		names = append(names, fmt.Sprintf("%s %s", familyName(t.Family), t.Name))
	}
	conn.FlushRuleset()
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("flush nftables in %s: flush ruleset (%d tables): %w", where, len(tables), err)
	}
	log.InfoContext(ctx, "nftables ruleset flushed", "netns", where, "tables", names)
	return nil
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyARP:
		return "arp"
	case nftables.TableFamilyNetdev:
		return "netdev"
	case nftables.TableFamilyBridge:
		return "bridge"
	}
	return fmt.Sprintf("family%d", f)
}
