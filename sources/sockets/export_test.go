package sockets

// SetDumpHook makes s call f before each dump, with whether an eBPF
// wake-up brought the dump forward.
func SetDumpHook(s *Source, f func(woken bool)) { s.onDump = f }
