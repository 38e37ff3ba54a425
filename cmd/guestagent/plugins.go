//go:build !custom

package main

// Every plugin built into the agent; adding one is one line here. (A build
// with the tag custom takes its list from elsewhere: make build PLUGINS=...)
import (
	_ "github.com/guestagent/guestagent/sinks/hostswitch"
	_ "github.com/guestagent/guestagent/sinks/stdout"
	_ "github.com/guestagent/guestagent/sinks/vtunnel"
	_ "github.com/guestagent/guestagent/sinks/wslproxy"
	_ "github.com/guestagent/guestagent/sources/containerd"
	_ "github.com/guestagent/guestagent/sources/docker"
	_ "github.com/guestagent/guestagent/sources/iptables"
	_ "github.com/guestagent/guestagent/sources/kubernetes"
	_ "github.com/guestagent/guestagent/sources/sockets"
	_ "github.com/guestagent/guestagent/sources/static"
)
