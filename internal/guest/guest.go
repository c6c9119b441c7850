// Package guest describes the pieces kiln injects into a root filesystem so
// that an OCI image boots as a microVM: the kiln-init PID 1, the kiln-agent
// guest agent and the systemd units that start them on systemd images.
//
// The paths below are fixed and owned by kiln; the guest binaries and the
// host-side engine agree on them through this package.
package guest

const (
	// Dir is the kiln-owned directory at the root of the guest filesystem.
	Dir = "/.kiln"
	// InitPath is where the kiln-init binary lives in the guest. Kernels boot
	// it with init=/.kiln/init.
	InitPath = "/.kiln/init"
	// AgentPath is where the kiln-agent binary lives in the guest.
	AgentPath = "/.kiln/agent"
	// ImageConfigPath holds the image's OCI config document
	// (application/vnd.oci.image.config.v1+json).
	ImageConfigPath = "/.kiln/image-config.json"
	// RunDir is kiln's scratch directory on the guest's /run tmpfs, used for
	// files that cannot be written to a read-only root.
	RunDir = "/run/kiln"
)

// Host-side file names of the guest binaries, as built from cmd/kiln-init
// and cmd/kiln-agent.
const (
	InitBinary  = "kiln-init"
	AgentBinary = "kiln-agent"
)

// Kernel command line parameters understood by the guest binaries.
const (
	// ParamHostname sets the guest hostname: kiln.hostname=NAME.
	ParamHostname = "kiln.hostname"
	// ParamDNS lists name servers: kiln.dns=1.1.1.1,8.8.8.8.
	ParamDNS = "kiln.dns"
	// ParamAgent selects the agent transport: kiln.agent=vsock:1024 or
	// kiln.agent=serial:/dev/ttyS1.
	ParamAgent = "kiln.agent"
)
