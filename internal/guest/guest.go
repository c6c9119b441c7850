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
	// (application/vnd.oci.image.config.v1+json). The init piece leaves it
	// empty in a disk that images sharing their layers share; kiln writes
	// the config of one image into that image's own disk: the file kiln
	// convert and kiln export write, or a container's disk.
	ImageConfigPath = "/.kiln/image-config.json"
	// ImageConfigMode is its permission bits.
	ImageConfigMode = 0o644
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
	// ParamOverlay names the scratch disk kiln-init composes an overlay
	// root with: kiln.overlay=/dev/vdb, kiln.overlay=LABEL=NAME or
	// kiln.overlay=off. Without it kiln-init looks for a disk labelled
	// ScratchLabel.
	ParamOverlay = "kiln.overlay"
	// ParamInit is the image's own init, which kiln-init execs instead of
	// running a workload: kiln.init=/sbin/init.
	ParamInit = "kiln.init"
)

// ScratchLabel is the ext4 volume label of a container's scratch disk: the
// writable upper layer of an overlay root over the read-only image. The
// disk holds the directories ScratchUpper and ScratchWork.
const (
	ScratchLabel = "kiln-scratch"
	ScratchUpper = "upper"
	ScratchWork  = "work"
)

// InitramfsManifest is a file at the root of the initramfs that kiln boot
// builds for kernels which need modules before the root is mounted. It lists
// the module files to load, one absolute path a line, in order. Its presence
// on a RAM-backed root tells kiln-init that it runs as the initramfs's /init.
const InitramfsManifest = "/kiln-initramfs"
