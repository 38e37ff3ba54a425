package core

import "errors"

// Mode is the networking mode. Which sinks it selects is the command's to
// say (core names no plugin); the mode gives the port policy.
type Mode int

// The networking modes.
const (
	// ModeLocal (neither admin install nor privileged service): every
	// binding is moved to localhost and privileged host ports are refused.
	ModeLocal Mode = iota
	// ModeTunnel (admin install): mappings go to the host as bound, with no
	// port policy.
	ModeTunnel
	// ModePrivileged: mappings go, as bound, to the privileged host service.
	ModePrivileged
)

// ModeFromFlags picks the mode from Rancher Desktop's two flags, which exclude
// each other.
func ModeFromFlags(adminInstall, privilegedService bool) (Mode, error) {
	switch {
	case adminInstall && privilegedService:
		return 0, errors.New("--adminInstall (network tunnel) and --privilegedService select different networking modes; use one of them")
	case adminInstall:
		return ModeTunnel, nil
	case privilegedService:
		return ModePrivileged, nil
	default:
		return ModeLocal, nil
	}
}

// String names the mode.
func (m Mode) String() string {
	switch m {
	case ModeTunnel:
		return "network-tunnel"
	case ModePrivileged:
		return "privileged-service"
	default:
		return "localhost"
	}
}

// Policy returns the port policy of the mode, or nil when ports go as
// they are.
func (m Mode) Policy() Policy {
	if m == ModeLocal {
		return LoopbackOnly
	}
	return nil
}
