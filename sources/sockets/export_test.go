package sockets

// SetDumpHook makes s call f before each dump, with whether an eBPF
// wake-up brought the dump forward.
func SetDumpHook(s *Source, f func(woken bool)) { s.onDump = f }

// Wakeups is the eBPF wake-ups' channel, for tests.
type Wakeups struct {
	C      <-chan struct{}
	UDP    bool  // bound UDP sockets wake it too
	UDPErr error // why not
	Close  func()
}

// LoadWakeups loads and attaches s's eBPF program with the filter s
// builds, and says whose listeners wake it.
func LoadWakeups(s *Source) (Wakeups, string, error) {
	f, how := s.wakeFilter()
	w, err := loadWakeups(f)
	if err != nil {
		return Wakeups{}, "", err
	}
	return Wakeups{C: w.C, UDP: w.UDP, UDPErr: w.UDPErr, Close: w.close}, how, nil
}
