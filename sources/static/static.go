// Package static is a source that reads mappings from a JSON file and
// re-reads it whenever it changes: manual forwards, and a source for tests.
//
// The file holds {"mappings": [{"id": "...", "ports": [{"protocol": "tcp",
// "containerPort": 80, "hostIP": "127.0.0.1", "hostPort": 8080}],
// "connectAddrs": [{"network": "tcp", "addr": "10.4.0.22:80"}]}]}.
// A missing file means no mappings; a file that does not parse is reported
// and the previous mappings stay.
package static

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "static"

// MaxFileSize bounds what the source reads; larger files are refused.
const MaxFileSize = 8 << 20

// DefaultFile is the --staticFile default.
const DefaultFile = "/etc/guestagent/static.json"

// DefaultPollInterval is the --staticPollInterval default.
const DefaultPollInterval = 5 * time.Second

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "mappings read from a JSON file, re-read when it changes",
		Noun:    "static file entry",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.File, "staticFile", DefaultFile, "JSON file of static mappings (see README)")
			registry.PositiveDurationVar(fs, &cfg.PollInterval, "staticPollInterval", DefaultPollInterval, "how often the static file is re-checked besides change notifications")
			return func(env registry.Env) (core.Source, error) {
				c := cfg
				c.Log = env.Log
				return New(c)
			}
		},
	})
}

// Config configures a Source; a zero field means its default.
type Config struct {
	// File is the JSON file to read (--staticFile); empty means
	// DefaultFile.
	File string
	// PollInterval is how often the file is read again besides change
	// notifications (--staticPollInterval); zero means
	// DefaultPollInterval, and it must not be negative.
	PollInterval time.Duration
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source watches one static file.
type Source struct {
	path string
	poll time.Duration
	log  *zap.Logger
}

// New fills cfg's defaults, checks it and returns a Source.
func New(cfg Config) (*Source, error) {
	if cfg.File == "" {
		cfg.File = DefaultFile
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.PollInterval < 0 {
		return nil, fmt.Errorf("--staticPollInterval must be positive, got %s", cfg.PollInterval)
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	return &Source{
		path: cfg.File,
		poll: cfg.PollInterval,
		log:  cfg.Log.With(zap.String("source", Name), zap.String("file", cfg.File)),
	}, nil
}

// Run reports the file's mappings until ctx is done.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		s.log.Warn("change notifications unavailable; polling only", zap.Error(err))
	} else {
		defer w.Close()
	}
	st := &state{}
	watching := s.watch(w, false)
	s.reload(out, st)

	ticker := time.NewTicker(s.poll)
	defer ticker.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w != nil {
		events, errs = w.Events, w.Errors
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if filepath.Clean(ev.Name) == filepath.Clean(s.path) {
				debounce.Reset(50 * time.Millisecond)
			}
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			s.log.Warn("change notification error", zap.Error(err))
		case <-debounce.C:
			s.reload(out, st)
		case <-ticker.C:
			watching = s.watch(w, watching)
			s.reload(out, st)
		}
	}
}

// watch starts watching the file's directory if it is not watched yet.
func (s *Source) watch(w *fsnotify.Watcher, watching bool) bool {
	if w == nil || watching {
		return watching
	}
	if err := w.Add(filepath.Dir(s.path)); err != nil {
		s.log.Debug("cannot watch directory yet; polling", zap.Error(err))
		return false
	}
	return true
}

// state is what the source last reported.
type state struct {
	reported bool
	missing  bool
	content  []byte
	failed   []byte // content that last failed to parse, to log it once
}

func (s *Source) reload(out core.Emitter, st *state) {
	data, err := readFile(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if !st.reported || !st.missing {
			s.log.Info("static file absent: no static mappings")
			out.Snapshot(nil)
		}
		*st = state{reported: true, missing: true}
		return
	case err != nil:
		s.log.Error("cannot read static file; keeping previous mappings", zap.Error(err))
		return
	}
	if st.reported && !st.missing && bytes.Equal(data, st.content) {
		return
	}
	ms, err := Parse(data)
	if err != nil {
		if !bytes.Equal(data, st.failed) {
			s.log.Error("invalid static file; keeping previous mappings", zap.Error(err))
		}
		st.failed = data
		return
	}
	s.log.Info("static mappings loaded", zap.Int("mappings", len(ms)))
	out.Snapshot(ms)
	*st = state{reported: true, content: data}
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("file is larger than %d bytes", MaxFileSize)
	}
	return data, nil
}

// Interface guards.
var _ core.Source = (*Source)(nil)
