package tsc

import (
	"errors"
	"testing"
)

func TestFrequencyKHz(t *testing.T) {
	khz, err := FrequencyKHz()
	if errors.Is(err, ErrUnsupported) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("host TSC: %d kHz", khz)
	// A second call returns the first measurement.
	if again, _ := FrequencyKHz(); again != khz {
		t.Errorf("second call gave %d kHz, want the cached %d", again, khz)
	}
}
