package tsc

const supported = true

// rdtsc returns the current TSC value; implemented in rdtsc_amd64.s.
func rdtsc() uint64
