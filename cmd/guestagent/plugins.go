package main

// Every plugin built into the agent; adding one is one line here.
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
