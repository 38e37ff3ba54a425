package iptables

import (
	"testing"
	"time"
)

func TestNextScanStretchesWithScanCost(t *testing.T) {
	tests := []struct {
		interval, took, want time.Duration
	}{
		{3 * time.Second, 20 * time.Millisecond, 3 * time.Second},
		{3 * time.Second, 150 * time.Millisecond, 3 * time.Second},
		{3 * time.Second, 340 * time.Millisecond, 6800 * time.Millisecond},
		{3 * time.Second, 3200 * time.Millisecond, 64 * time.Second},
		{100 * time.Millisecond, 10 * time.Millisecond, 200 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := nextScan(tt.interval, tt.took); got != tt.want {
			t.Errorf("nextScan(%v, %v) = %v, want %v", tt.interval, tt.took, got, tt.want)
		}
	}
}
