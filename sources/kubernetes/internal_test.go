package kubernetes

import "testing"

func TestZeroConfigMeansTheDefaults(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if s.cfg.Path != DefaultKubeconfig || s.cfg.Check != DefaultCheckInterval || s.cfg.NewClient == nil ||
		s.cfg.ListenAddr.String() != "127.0.0.1" || s.log == nil {
		t.Errorf("New(Config{}) holds %+v", s.cfg)
	}
}
