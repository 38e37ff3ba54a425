package main

// The sinks the networking modes select (--sinks=auto) are in every build,
// a custom one (make build PLUGINS=...) included.
import (
	_ "github.com/guestagent/guestagent/sinks/hostswitch"
	_ "github.com/guestagent/guestagent/sinks/vtunnel"
	_ "github.com/guestagent/guestagent/sinks/wslproxy"
)
