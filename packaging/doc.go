// Package packaging holds the tests of the files that install guestagent as
// a service in the distribution image: the OpenRC service script and its
// conf.d file (openrc/), the logrotate file (logrotate/) and the static
// binaries of `make dist`. It has no code of its own.
package packaging
