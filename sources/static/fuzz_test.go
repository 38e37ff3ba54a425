package static_test

import (
	"os"
	"testing"

	"github.com/guestagent/guestagent/sources/static"
)

// FuzzParse feeds arbitrary bytes to the static file parser: it must not
// panic, and what it accepts must be valid mappings.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile("../../testdata/static/demo.json"); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostPort":8080}]}]}`))
	f.Add([]byte(`{"mappings":[{"id":"a"},{"id":"a"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ms, err := static.Parse(data)
		if err != nil {
			return
		}
		for _, m := range ms {
			if err := m.Validate(); err != nil {
				t.Fatalf("accepted an invalid mapping: %v", err)
			}
		}
	})
}
