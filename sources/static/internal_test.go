package static

import "testing"

func TestZeroConfigMeansTheDefaults(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if s.path != DefaultFile || s.poll != DefaultPollInterval || s.log == nil {
		t.Errorf("New(Config{}) = file %q, poll %v, log %v; want %q, %v and a logger", s.path, s.poll, s.log, DefaultFile, DefaultPollInterval)
	}
}
