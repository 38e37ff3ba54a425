package iptables_test

import (
	"os"
	"slices"
)

func writeExec(path, script string) error { return os.WriteFile(path, []byte(script), 0o755) }

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
