package netconf

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

// DefaultHostname is used when neither the command line nor the image names
// the machine.
const DefaultHostname = "kiln"

// Config is the network setup requested on the kernel command line.
type Config struct {
	// IP is the ip= parameter, or nil when there is none.
	IP *IPParam
	// DNS lists the name servers: those of kiln.dns= when given,
	// otherwise those of ip=.
	DNS []netip.Addr
	// Hostname comes from kiln.hostname=, otherwise from ip=. Empty means
	// the image's /etc/hostname, then DefaultHostname.
	Hostname string
}

// FromCmdline extracts the network setup from a kernel command line.
func FromCmdline(c cmdline.Cmdline) (Config, error) {
	var cfg Config
	if v, ok := c.Lookup("ip"); ok {
		p, err := ParseIPParam(v)
		if err != nil {
			return Config{}, err
		}
		cfg.IP = &p
		cfg.DNS = p.DNS
		cfg.Hostname = p.Hostname
	}
	if v, ok := c.Lookup(guest.ParamDNS); ok {
		dns, err := ParseDNSList(v)
		if err != nil {
			return Config{}, fmt.Errorf("%s=%s: %w", guest.ParamDNS, v, err)
		}
		cfg.DNS = dns
	}
	if v, ok := c.Lookup(guest.ParamHostname); ok && v != "" {
		cfg.Hostname = v
	}
	if cfg.Hostname != "" {
		if err := ValidateHostname(cfg.Hostname); err != nil {
			return Config{}, err
		}
	}
	return cfg, nil
}

// ParseDNSList parses a comma-separated list of name server addresses
// (IPv4 or IPv6).
func ParseDNSList(s string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("name server %q is not an IP address", f)
		}
		out = append(out, a)
	}
	return out, nil
}

// ValidateHostname checks that name can be set with sethostname(2) and makes
// sense as a host name.
func ValidateHostname(name string) error {
	if len(name) > 64 {
		return fmt.Errorf("hostname %q is longer than 64 bytes", name)
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r >= 0x7f {
			return fmt.Errorf("hostname %q contains %q", name, r)
		}
	}
	if name == "" {
		return errors.New("hostname is empty")
	}
	return nil
}

// ResolveHostname picks the hostname: the one configured on the command
// line, else the first line of the image's /etc/hostname under root, else
// DefaultHostname.
func ResolveHostname(cfg Config, root string) string {
	if cfg.Hostname != "" {
		return cfg.Hostname
	}
	if data, err := os.ReadFile(filepath.Join(root, "etc/hostname")); err == nil {
		line, _, _ := strings.Cut(string(data), "\n")
		if name := strings.TrimSpace(line); ValidateHostname(name) == nil {
			return name
		}
	}
	return DefaultHostname
}

// ParsePNP reads /proc/net/pnp, where the kernel records the name servers
// and domain it learned when it autoconfigured the network (CONFIG_IP_PNP).
func ParsePNP(r io.Reader) (servers []netip.Addr, domain string) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		key, value, _ := strings.Cut(strings.TrimSpace(s.Text()), " ")
		value = strings.TrimSpace(value)
		switch key {
		case "nameserver":
			if a, err := netip.ParseAddr(value); err == nil && !a.IsUnspecified() {
				servers = append(servers, a)
			}
		case "domain":
			domain = value
		}
	}
	return servers, domain
}

// Options say where Setup applies the configuration.
type Options struct {
	// Root is the guest root holding etc/hostname and etc/resolv.conf;
	// "/" in the guest.
	Root string
	// RunDir receives resolv.conf when /etc is read-only; guest.RunDir in
	// the guest.
	RunDir string
	// LinkTimeout bounds the wait for the network interface to appear.
	LinkTimeout time.Duration
	// Warnf reports problems that do not stop the setup; it may be nil.
	Warnf func(format string, args ...any)
}

// DefaultLinkTimeout is how long Setup waits for a network interface whose
// driver is still probing.
const DefaultLinkTimeout = 5 * time.Second

// Setup applies cfg: the hostname, the loopback and ip= interfaces with the
// default route, and /etc/resolv.conf. Every step is attempted; their
// errors are returned joined, and warnings go to opts.Warnf.
func Setup(cfg Config, opts Options) error {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.RunDir == "" {
		opts.RunDir = guest.RunDir
	}
	if opts.LinkTimeout == 0 {
		opts.LinkTimeout = DefaultLinkTimeout
	}
	warnf := opts.Warnf
	if warnf == nil {
		warnf = func(string, ...any) {}
	}

	var errs []error
	hostname := ResolveHostname(cfg, opts.Root)
	if err := unix.Sethostname([]byte(hostname)); err != nil {
		errs = append(errs, fmt.Errorf("set hostname %q: %w", hostname, err))
	}
	if err := ConfigureLinks(cfg.IP, opts.LinkTimeout, warnf); err != nil {
		errs = append(errs, err)
	}

	dns, search := cfg.DNS, ""
	if len(dns) == 0 && cfg.IP != nil && cfg.IP.Autoconfigures() {
		// The kernel may have run DHCP itself (CONFIG_IP_PNP).
		if f, err := os.Open("/proc/net/pnp"); err == nil {
			dns, search = ParsePNP(f)
			f.Close()
		}
	}
	if len(dns) > 0 {
		written, err := WriteResolvConf(opts.Root, opts.RunDir, dns, search)
		if err != nil {
			errs = append(errs, err)
		} else if written != filepath.Join(opts.Root, "etc/resolv.conf") {
			warnf("/etc is read-only: wrote %s and bind-mounted it over /etc/resolv.conf", written)
		}
	}
	return errors.Join(errs...)
}
