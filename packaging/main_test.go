package packaging_test

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"testing"
)

// listenEnv, set to an address, makes the test binary a helper that
// listens there on TCP, prints "listening" and waits for SIGTERM. Run
// through a link named for a command (docker-proxy), it is a process of
// that name, as the agent's sockets source sees it.
const listenEnv = "GUESTAGENT_PACKAGING_LISTEN"

func TestMain(m *testing.M) {
	if addr := os.Getenv(listenEnv); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ln.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}
