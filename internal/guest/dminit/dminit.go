// Package dminit creates the device-mapper devices that the kernel
// parameter dm-mod.create= describes, for kernels that cannot do it
// themselves: those without CONFIG_DM_INIT, such as distribution kernels
// with device-mapper and dm-verity as modules. kiln-init does it as the
// initramfs's /init, after loading the modules and before mounting root=
// (see package switchroot), so one command line boots a verity root on
// either kind of kernel:
//
//	dm-mod.create="vroot,,,ro,0 SECTORS verity 1 /dev/vda /dev/vda ..." root=/dev/dm-0 ro
//
// The syntax is the kernel's (Documentation/admin-guide/device-mapper/dm-init.rst),
// with its limits and its list of allowed targets:
//
//	dm-mod.create=<name>,<uuid>,<minor>,<flags>,<table>[,<table>+][;<name>,<uuid>,<minor>,<flags>,<table>[,<table>+]+]
//	<table> ::= <start_sector> <num_sectors> <target_type> <target_args>
//	dm-mod.waitfor=<device>[,<device>+]
//
// Devices the kernel already created are left as they are.
package dminit

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/go-dmverity/pkg/dm"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

// The kernel parameters read here.
const (
	ParamCreate  = "dm-mod.create"
	ParamWaitFor = "dm-mod.waitfor"
)

const devPrefix = "/dev/"

// The kernel's dm-init limits.
const (
	maxCreate  = 4095 // bytes of dm-mod.create, which also bounds the number of devices
	maxTargets = 256  // per device
	maxName    = dm.DMNameLen - 1
	maxUUID    = dm.DMUUIDLen - 1
	maxType    = dm.DMMaxTypeName - 1
)

// targetModules are the targets dm-init allows, with the module that
// provides each.
var targetModules = map[string]string{
	"crypt":           "dm_crypt",
	"delay":           "dm_delay",
	"linear":          "dm_mod",
	"snapshot-origin": "dm_snapshot",
	"striped":         "dm_mod",
	"verity":          "dm_verity",
}

// Device is one device of dm-mod.create.
type Device struct {
	Name string
	UUID string // "" for none
	// Minor is the device's minor number when HasMinor.
	Minor    uint32
	HasMinor bool
	ReadOnly bool
	Targets  []dm.Target
}

// Spec is what the kernel command line asks for.
type Spec struct {
	Devices []Device
	// WaitFor are the devices dm-mod.waitfor names.
	WaitFor []string
}

// FromCmdline reads dm-mod.create and dm-mod.waitfor. Without
// dm-mod.create the Spec is empty.
func FromCmdline(c cmdline.Cmdline) (Spec, error) {
	create, ok := c.Lookup(ParamCreate)
	if !ok {
		return Spec{}, nil
	}
	devs, err := Parse(create)
	if err != nil {
		return Spec{}, err
	}
	s := Spec{Devices: devs}
	if w, ok := c.Lookup(ParamWaitFor); ok {
		for _, d := range strings.Split(w, ",") {
			if d = strings.TrimSpace(d); d == "" {
				continue
			}
			if !strings.HasPrefix(d, devPrefix) {
				return Spec{}, fmt.Errorf("%s: %q: only /dev paths are supported", ParamWaitFor, d)
			}
			s.WaitFor = append(s.WaitFor, d)
		}
	}
	return s, nil
}

// Parse parses the value of dm-mod.create as the kernel does.
func Parse(create string) ([]Device, error) {
	if len(create) > maxCreate {
		return nil, fmt.Errorf("%s: %d bytes long, the kernel takes at most %d", ParamCreate, len(create), maxCreate)
	}
	var devs []Device
	names := map[string]bool{}
	for rest, more := create, true; more; {
		var d Device
		var err error
		d, rest, more, err = parseDevice(rest)
		if err != nil {
			return nil, fmt.Errorf("%s: device %d: %w", ParamCreate, len(devs)+1, err)
		}
		if names[d.Name] {
			return nil, fmt.Errorf("%s: device %d: the name %q is given twice", ParamCreate, len(devs)+1, d.Name)
		}
		names[d.Name] = true
		devs = append(devs, d)
	}
	return devs, nil
}

// parseDevice parses the device at the start of s, up to a ';'. more
// says whether another device follows in rest.
func parseDevice(s string) (d Device, rest string, more bool, err error) {
	text, _, _ := strings.Cut(s, ";")
	var f [4]string // name, uuid, minor, flags
	for i := range f {
		var ok bool
		if f[i], s, ok = delimit(s, ','); !ok {
			return Device{}, "", false, fmt.Errorf("%q: want <name>,<uuid>,<minor>,<flags>,<table>", strings.TrimSpace(text))
		}
	}
	table, rest, more := delimit(s, ';')
	d = Device{Name: f[0], UUID: f[1]}
	if err := d.parseFields(f[2], f[3], table); err != nil {
		return Device{}, "", false, fmt.Errorf("%q: %w", d.Name, err)
	}
	return d, rest, more, nil
}

// parseFields checks the name and uuid and parses the other fields of d.
func (d *Device) parseFields(minor, flags, table string) error {
	switch {
	case d.Name == "":
		return errors.New("no name")
	case len(d.Name) > maxName:
		return fmt.Errorf("the name is longer than %d bytes", maxName)
	case d.Name == "." || d.Name == ".." || strings.Contains(d.Name, "/"):
		return errors.New("not a valid device name")
	case len(d.UUID) > maxUUID:
		return fmt.Errorf("uuid %q is longer than %d bytes", d.UUID, maxUUID)
	}
	if minor != "" {
		n, err := parseNumber(minor, 32)
		if err != nil {
			return fmt.Errorf("minor %q: %w", minor, err)
		}
		d.Minor, d.HasMinor = uint32(n), true
	}
	switch flags {
	case "ro":
		d.ReadOnly = true
	case "rw":
	default:
		return fmt.Errorf("flags %q, want ro or rw", flags)
	}
	for more := true; more; {
		if len(d.Targets) == maxTargets {
			return fmt.Errorf("more than %d tables", maxTargets)
		}
		var entry string
		entry, table, more = delimit(table, ',')
		t, err := parseTarget(entry)
		if err != nil {
			return fmt.Errorf("table %d: %w", len(d.Targets)+1, err)
		}
		d.Targets = append(d.Targets, t)
	}
	return nil
}

// parseTarget parses "<start_sector> <num_sectors> <target_type> <target_args>".
func parseTarget(s string) (dm.Target, error) {
	start, s, ok1 := delimit(s, ' ')
	length, s, ok2 := delimit(s, ' ')
	typ, args, ok3 := delimit(s, ' ')
	args = strings.TrimSpace(args)
	if !ok1 || !ok2 || !ok3 || args == "" {
		return dm.Target{}, fmt.Errorf("%q: want <start_sector> <num_sectors> <target_type> <target_args>",
			strings.TrimSpace(strings.Join([]string{start, length, typ, args}, " ")))
	}
	var t dm.Target
	var err error
	if t.SectorStart, err = parseNumber(start, 64); err != nil {
		return dm.Target{}, fmt.Errorf("start sector %q: %w", start, err)
	}
	if t.Length, err = parseNumber(length, 64); err != nil {
		return dm.Target{}, fmt.Errorf("number of sectors %q: %w", length, err)
	}
	if _, ok := targetModules[typ]; !ok || len(typ) > maxType {
		return dm.Target{}, fmt.Errorf("target type %q: the kernel creates only %s devices from its command line",
			typ, strings.Join(slices.Sorted(maps.Keys(targetModules)), ", "))
	}
	t.Type, t.Params = typ, args
	return t, nil
}

// delimit splits s at the first sep as the kernel's dm-init does: field
// is what comes before it without surrounding whitespace, rest what
// follows it, and ok is false when s holds no sep (field is then all of
// s).
func delimit(s string, sep byte) (field, rest string, ok bool) {
	field, rest, ok = strings.Cut(strings.TrimLeft(s, spaces), string(sep))
	return strings.TrimSpace(field), rest, ok
}

// spaces are what the kernel's isspace() accepts.
const spaces = " \t\n\v\f\r"

// parseNumber parses an unsigned number as the kernel's kstrtoull with
// base 0: 0x for hexadecimal, a leading 0 for octal, else decimal.
func parseNumber(s string, bits int) (uint64, error) {
	base := 10
	switch {
	case len(s) > 2 && (s[:2] == "0x" || s[:2] == "0X"):
		s, base = s[2:], 16
	case len(s) > 1 && s[0] == '0':
		s, base = s[1:], 8
	}
	n, err := strconv.ParseUint(s, base, bits)
	if err != nil {
		return 0, errors.Unwrap(err) // strconv's own error repeats the text
	}
	return n, nil
}

// Modules returns the kernel modules the devices need: device-mapper and
// the modules of their targets, each once. Dependencies are the loader's
// business.
func (s Spec) Modules() []string {
	if len(s.Devices) == 0 {
		return nil
	}
	mods := []string{"dm_mod"}
	seen := map[string]bool{"dm_mod": true}
	for _, d := range s.Devices {
		for _, t := range d.Targets {
			if m := targetModules[t.Type]; !seen[m] {
				seen[m] = true
				mods = append(mods, m)
			}
		}
	}
	return mods
}

// BlockDevices returns the /dev paths the devices are made of, and those
// dm-mod.waitfor names, each once: they must exist before the devices are
// created.
func (s Spec) BlockDevices() []string {
	var paths []string
	seen := map[string]bool{}
	add := func(p string) {
		if !seen[p] {
			seen[p] = true
			paths = append(paths, p)
		}
	}
	for _, p := range s.WaitFor {
		add(p)
	}
	for _, d := range s.Devices {
		for _, t := range d.Targets {
			for _, arg := range strings.Fields(t.Params) {
				if strings.HasPrefix(arg, devPrefix) {
					add(arg)
				}
			}
		}
	}
	return paths
}
