module github.com/guestagent/guestagent

go 1.26.0

require (
	github.com/fsnotify/fsnotify v1.10.1
	github.com/mdlayher/vsock v1.4.0
	github.com/moby/moby/api v1.56.1
	github.com/spf13/pflag v1.1.0
	go.uber.org/goleak v1.3.0
	go.uber.org/zap v1.28.0
)

require (
	github.com/mdlayher/socket v0.8.0 // indirect
	go.uber.org/multierr v1.10.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/sync v0.24.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
