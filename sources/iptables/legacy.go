package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread of its own in the network namespace at
// path, or at once in the current one when path is empty. Processes fn
// starts run in that namespace (they are forked from its thread). The
// thread is never unlocked, so the runtime ends it with fn's goroutine
// rather than reusing it in the wrong namespace.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening network namespace: %w", err)
	}
	defer f.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("entering network namespace %s: %w", path, err)
			return
		}
		done <- fn()
	}()
	return <-done
}

// legacySaver reads one family's legacy (x_tables) nat table with its
// save command, when the namespace has that table.
type legacySaver struct {
	family string // "ip" or "ip6", for messages
	save   string // the iptables-legacy-save command, "" when none is installed
	names  string // the /proc file listing the family's x_tables tables
}

// legacySavers finds the save commands of the legacy back-end:
// iptables-legacy-save (ip6tables-legacy-save), or iptables-save
// (ip6tables-save) when that is the legacy variant.
func legacySavers() []legacySaver {
	find := func(legacy, plain string) string {
		if p, err := exec.LookPath(legacy); err == nil {
			return p
		}
		p, err := exec.LookPath(plain)
		if err != nil {
			return ""
		}
		out, err := exec.Command(p, "--version").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "legacy") {
			return ""
		}
		return p
	}
	return []legacySaver{
		{family: "ip", save: find("iptables-legacy-save", "iptables-save"), names: "ip_tables_names"},
		{family: "ip6", save: find("ip6tables-legacy-save", "ip6tables-save"), names: "ip6_tables_names"},
	}
}

// legacyTimeout bounds one run of a save command.
const legacyTimeout = 10 * time.Second

// readLegacy returns the lines of the chains the source reads from every
// family's legacy nat table in the namespace. A family whose nat table is
// not instantiated there (the kernel lists the tables in use in
// /proc/net/ip_tables_names) is not read, so no process runs for it.
func readLegacy(netns string, savers []legacySaver) ([]string, map[string]error) {
	var out []string
	problems := map[string]error{}
	err := inNetns(netns, func() error {
		for _, s := range savers {
			names, err := os.ReadFile("/proc/thread-self/net/" + s.names)
			if err != nil || !slices.Contains(strings.Fields(string(names)), "nat") {
				continue // no x_tables, or no legacy nat table, in this namespace
			}
			what := s.family + " legacy"
			if s.save == "" {
				problems[what] = errors.New("the namespace has a legacy nat table, but iptables-legacy-save is not installed")
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), legacyTimeout)
			var stdout, stderr bytes.Buffer
			cmd := exec.CommandContext(ctx, s.save, "-t", "nat")
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err = cmd.Run()
			cancel()
			if err != nil {
				problems[what] = fmt.Errorf("%s -t nat: %w: %s", s.save, err, strings.TrimSpace(stderr.String()))
				continue
			}
			out = append(out, selectLines(strings.Split(stdout.String(), "\n"))...)
		}
		return nil
	})
	if err != nil {
		problems["legacy"] = err
	}
	return out, problems
}

// selectLines keeps the rules of the chains the source reads from a save
// dump of the nat table: those of natChains and of the CNI-DN-* chains
// that CNI-HOSTPORT-DNAT jumps to, as listing those chains would print.
func selectLines(lines []string) []string {
	inChains := func(chains []string) []string {
		var out []string
		for _, l := range lines {
			chain, ok := ruleChain(l)
			if ok && slices.Contains(chains, chain) {
				out = append(out, l)
			}
		}
		return out
	}
	out := inChains(natChains)
	_, cni := ParseIptables(out)
	return append(out, inChains(cni)...)
}

// ruleChain is the chain of an "-A CHAIN ..." line.
func ruleChain(line string) (string, bool) {
	rest, ok := strings.CutPrefix(line, "-A ")
	if !ok {
		return "", false
	}
	chain, _, _ := strings.Cut(rest, " ")
	return chain, true
}

// command is an iptables command given with --iptablesCommands, run per
// scan as `CMD -t nat -S CHAIN` for each chain the source reads.
type command struct {
	name string
	ipt  *goipt.IPTables
}

// readCommands lists the chains with every command, inside the namespace.
func readCommands(netns string, cmds []command) ([]string, map[string]error) {
	var out []string
	problems := map[string]error{}
	err := inNetns(netns, func() error {
		for _, c := range cmds {
			lines, err := listChains(c.ipt, natChains...)
			if err == nil {
				_, cni := ParseIptables(lines)
				var more []string
				more, err = listChains(c.ipt, cni...)
				lines = append(lines, more...)
			}
			if err != nil {
				problems[c.name] = err
				continue
			}
			out = append(out, lines...)
		}
		return nil
	})
	if err != nil {
		problems["commands"] = err
	}
	return out, problems
}

func listChains(ipt *goipt.IPTables, chains ...string) ([]string, error) {
	var out []string
	for _, c := range chains {
		lines, err := ipt.List("nat", c)
		if err != nil {
			// iptables-nft reports a chain that does not exist as
			// "incompatible"; either way there is nothing to read.
			var e *goipt.Error
			if errors.As(err, &e) && (e.IsNotExist() || strings.Contains(e.Error(), "incompatible")) {
				continue
			}
			return nil, fmt.Errorf("listing nat %s: %w", c, err)
		}
		out = append(out, lines...)
	}
	return out, nil
}
