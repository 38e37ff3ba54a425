// Command webserver is the static test workload baked into the test
// images: it answers HTTP on every port given as an argument (default 80)
// with its hostname.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"
)

func main() {
	ports := os.Args[1:]
	if len(ports) == 0 {
		ports = []string{"80"}
	}
	host, _ := os.Hostname()
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, host) })
	errs := make(chan error, len(ports))
	for _, p := range ports {
		go func() { errs <- http.ListenAndServe(":"+p, h) }()
	}
	log.Fatal(<-errs)
}
