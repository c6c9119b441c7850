package dminit

import (
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/go-dmverity/pkg/dm"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

const verityTable = "0 131072 verity 1 /dev/vda /dev/vda 4096 4096 16384 16385 sha256 " +
	"4f1c0000000000000000000000000000000000000000000000000000000000aa 9a07"

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name   string
		create string
		want   []Device
	}{
		{"verity root", "vroot,,,ro," + verityTable, []Device{{
			Name: "vroot", ReadOnly: true,
			Targets: []dm.Target{{Length: 131072, Type: "verity", Params: verityTable[len("0 131072 verity "):]}},
		}}},
		// The examples of the kernel's dm-init.rst.
		{"linear, two tables", "lroot,,,rw, 0 4096 linear 98:16 0, 4096 4096 linear 98:32 0", []Device{{
			Name: "lroot",
			Targets: []dm.Target{
				{Length: 4096, Type: "linear", Params: "98:16 0"},
				{SectorStart: 4096, Length: 4096, Type: "linear", Params: "98:32 0"},
			},
		}}},
		{"two devices, uuid and minor",
			"a,4a7a3b6b-0b8f-4c2b-9c1d-4d1a2f8c0a11,0x10,ro,0 8 linear /dev/vda 0;b,,010,rw,0 8 striped 1 128 /dev/vdb 0",
			[]Device{
				{Name: "a", UUID: "4a7a3b6b-0b8f-4c2b-9c1d-4d1a2f8c0a11", Minor: 16, HasMinor: true, ReadOnly: true,
					Targets: []dm.Target{{Length: 8, Type: "linear", Params: "/dev/vda 0"}}},
				{Name: "b", Minor: 8, HasMinor: true,
					Targets: []dm.Target{{Length: 8, Type: "striped", Params: "1 128 /dev/vdb 0"}}},
			}},
		{"spaces around fields", " v ,  , 0 , ro ,  0   8  linear  /dev/vda 0 ", []Device{{
			Name: "v", HasMinor: true, ReadOnly: true,
			Targets: []dm.Target{{Length: 8, Type: "linear", Params: "/dev/vda 0"}},
		}}},
	} {
		got, err := Parse(tc.create)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, got, tc.want)
		}
	}
}

func TestParseMalformed(t *testing.T) {
	for _, tc := range []struct{ create, err string }{
		{"", `device 1: "": want <name>,<uuid>,<minor>,<flags>,<table>`},
		{"vroot", `device 1: "vroot": want <name>,<uuid>,<minor>,<flags>,<table>`},
		{"vroot,,,ro", `device 1: "vroot,,,ro": want`},
		{"vroot,,,ro,", `device 1: "vroot": table 1: "": want <start_sector> <num_sectors> <target_type> <target_args>`},
		{"vroot,,,ro,0 8 linear", `table 1: "0 8 linear": want`},
		{"vroot,,,rx," + verityTable, `device 1: "vroot": flags "rx", want ro or rw`},
		{"vroot,,,RO," + verityTable, `flags "RO", want ro or rw`},
		{",,,ro," + verityTable, `device 1: "": no name`},
		{"a/b,,,ro," + verityTable, `"a/b": not a valid device name`},
		{"..,,,ro," + verityTable, `"..": not a valid device name`},
		{strings.Repeat("n", 128) + ",,,ro," + verityTable, "name is longer than 127 bytes"},
		{"vroot," + strings.Repeat("u", 129) + ",,ro," + verityTable, "is longer than 128 bytes"},
		{"vroot,,x,ro," + verityTable, `minor "x": invalid syntax`},
		{"vroot,,-1,ro," + verityTable, `minor "-1": invalid syntax`},
		{"vroot,,09,ro," + verityTable, `minor "09": invalid syntax`},
		{"vroot,,0x100000000,ro," + verityTable, `minor "0x100000000": value out of range`},
		{"vroot,,,ro,x 8 linear /dev/vda 0", `start sector "x": invalid syntax`},
		{"vroot,,,ro,0 -8 linear /dev/vda 0", `number of sectors "-8": invalid syntax`},
		{"vroot,,,ro,0 8 zero /dev/vda", `target type "zero": the kernel creates only crypt, delay, linear, snapshot-origin, striped, verity devices`},
		{"vroot,,,ro,0 8 thin-pool /dev/vda 0", `target type "thin-pool"`},
		{"vroot,,,ro," + verityTable + ",", `"vroot": table 2: "": want`},
		{"vroot,,,ro," + verityTable + ";", `device 2: "": want`},
		{"vroot,,,ro," + verityTable + ";vroot,,,ro," + verityTable, `device 2: the name "vroot" is given twice`},
		{"vroot,,,ro," + verityTable + strings.Repeat(" ", 4096), "bytes long, the kernel takes at most 4095"},
		{"a,,,ro" + strings.Repeat(",0 1 linear x", 257), `"a": more than 256 tables`},
	} {
		_, err := Parse(tc.create)
		if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.HasPrefix(err.Error(), ParamCreate+": ") {
			name := tc.create
			if len(name) > 60 {
				name = name[:60] + "..."
			}
			t.Errorf("%q: error %v, want one containing %q", name, err, tc.err)
		}
	}
}

func TestFromCmdline(t *testing.T) {
	s, err := FromCmdline(cmdline.Parse(`console=ttyS0 root=/dev/dm-0 ro`))
	if err != nil || len(s.Devices) != 0 || s.Modules() != nil || s.BlockDevices() != nil {
		t.Errorf("without dm-mod.create: %+v, %v", s, err)
	}

	// The kernel treats - and _ alike in parameter names; the value is
	// quoted because it holds spaces.
	s, err = FromCmdline(cmdline.Parse(`dm_mod.create="vroot,,,ro,` + verityTable + `;lin,,,ro,0 8 linear /dev/vdb 0,8 8 linear /dev/vda 8" ` +
		`dm-mod.waitfor=/dev/vdc,/dev/vda root=/dev/dm-0`))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Devices) != 2 || s.Devices[1].Name != "lin" || len(s.Devices[1].Targets) != 2 {
		t.Errorf("devices %+v", s.Devices)
	}
	if want := []string{"dm_mod", "dm_verity"}; !reflect.DeepEqual(s.Modules(), want) {
		t.Errorf("Modules() = %q, want %q", s.Modules(), want)
	}
	if want := []string{"/dev/vdc", "/dev/vda", "/dev/vdb"}; !reflect.DeepEqual(s.BlockDevices(), want) {
		t.Errorf("BlockDevices() = %q, want %q", s.BlockDevices(), want)
	}

	for _, tc := range []struct{ cmdline, err string }{
		{`dm-mod.create`, `dm-mod.create: device 1: "": want`},
		{`dm-mod.create="vroot,,,ro,0 8 linear /dev/vda 0" dm-mod.waitfor=PARTUUID=1234`,
			`dm-mod.waitfor: "PARTUUID=1234": only /dev paths are supported`},
	} {
		if _, err := FromCmdline(cmdline.Parse(tc.cmdline)); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: error %v, want one containing %q", tc.cmdline, err, tc.err)
		}
	}
}
