package registry_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

type nopSource struct{ greeting string }

func (nopSource) Run(ctx context.Context, _ core.Emitter) error { <-ctx.Done(); return nil }

// newRegistry returns a registry of its own holding the test plugin.
func newRegistry() *registry.Registry {
	r := registry.New()
	r.RegisterSource(registry.SourcePlugin{
		Name:    "regtest",
		Summary: "a source for the registry's tests",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			greeting := fs.String("regtestGreeting", "hello", "what to say")
			return func(registry.Env) (core.Source, error) { return nopSource{*greeting}, nil }
		},
	})
	return r
}

func TestBindGivesEachFlagSetItsOwnValues(t *testing.T) {
	fs1 := pflag.NewFlagSet("one", pflag.ContinueOnError)
	fs2 := pflag.NewFlagSet("two", pflag.ContinueOnError)
	r := newRegistry()
	b1, err := r.Bind(fs1)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := r.Bind(fs2)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs1.Parse([]string{"--regtestGreeting=hi"}); err != nil {
		t.Fatal(err)
	}
	s1, err := b1.NewSource("regtest", registry.Env{})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := b2.NewSource("regtest", registry.Env{})
	if err != nil {
		t.Fatal(err)
	}
	if g := s1.(nopSource).greeting; g != "hi" {
		t.Errorf("first flag set: %q, want hi", g)
	}
	if g := s2.(nopSource).greeting; g != "hello" {
		t.Errorf("second flag set: %q, want the default", g)
	}
	var found bool
	for _, g := range b1.Groups {
		if g.Name == "regtest" && g.Kind == "source" && g.Flags.Lookup("regtestGreeting") != nil {
			found = true
		}
	}
	if !found {
		t.Error("the plugin's flags are not grouped under it")
	}
}

func TestUnknownPluginIsAClearError(t *testing.T) {
	b, err := newRegistry().Bind(pflag.NewFlagSet("x", pflag.ContinueOnError))
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.NewSource("nosuch", registry.Env{})
	if err == nil || !strings.Contains(err.Error(), `"nosuch"`) || !strings.Contains(err.Error(), "regtest") {
		t.Errorf("err = %v, want it to name the plugin and list what exists", err)
	}
	if _, err := b.NewSink("nosuch", registry.Env{}); err == nil {
		t.Error("unknown sink accepted")
	}
}

func TestFlagClashIsAnError(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.String("regtestGreeting", "", "taken by the command")
	if _, err := newRegistry().Bind(fs); err == nil || !strings.Contains(err.Error(), "regtestGreeting") {
		t.Errorf("err = %v, want a clash on --regtestGreeting", err)
	}
}

func TestRegisterMistakesPanic(t *testing.T) {
	for name, p := range map[string]registry.SourcePlugin{
		"duplicate": {Name: "regtest", Setup: func(*pflag.FlagSet) registry.SourceFactory { return nil }},
		"no name":   {Setup: func(*pflag.FlagSet) registry.SourceFactory { return nil }},
		"no setup":  {Name: "nosetup"},
	} {
		t.Run(name, func(t *testing.T) {
			r := newRegistry()
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			r.RegisterSource(p)
		})
	}
}

func TestRegistriesAreIndependent(t *testing.T) {
	r := newRegistry()
	if got := len(registry.New().Sources()); got != 0 {
		t.Errorf("a new registry holds %d sources", got)
	}
	for _, p := range registry.Default.Sources() {
		if p.Name == "regtest" {
			t.Error("a test registry's plugin leaked into Default")
		}
	}
	if got := r.Sources(); len(got) != 1 || got[0].Name != "regtest" {
		t.Errorf("Sources() = %v", got)
	}
}

func TestFlagsThatRefuseZero(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	var s string
	var d time.Duration
	registry.NonEmptyStringVar(fs, &s, "name", "dflt", "a name")
	registry.PositiveDurationVar(fs, &d, "every", 5*time.Second, "an interval")
	if s != "dflt" || d != 5*time.Second {
		t.Fatalf("defaults not set: %q %v", s, d)
	}
	usage := fs.FlagUsages()
	for _, want := range []string{`--name string`, `(default "dflt")`, `--every duration`, `(default 5s)`} {
		if !strings.Contains(usage, want) {
			t.Errorf("usage %q lacks %q", usage, want)
		}
	}
	for _, args := range [][]string{{"--name="}, {"--every=0s"}, {"--every=-1s"}, {"--every=soon"}} {
		if err := fs.Parse(args); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	if err := fs.Parse([]string{"--name=n", "--every=2s"}); err != nil || s != "n" || d != 2*time.Second {
		t.Errorf("good values: %v, %q %v", err, s, d)
	}
}
