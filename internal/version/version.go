// Package version holds kiln's version, set at build time with
// -ldflags "-X github.com/kilnfs/kiln/internal/version.Version=...".
package version

// Version of kiln.
var Version = "0.1.0-dev"

// UserAgent is what kiln sends to registries.
func UserAgent() string { return "kiln/" + Version }
