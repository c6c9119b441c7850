package kernel_test

import (
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/vmboot/kernel"
	"github.com/kilnfs/kiln/internal/vmboot/vmboottest"
)

// TestLoadOrder resolves modules in Debian's cloud kernel, which has
// overlayfs and virtio as modules and ext4 built in.
func TestLoadOrder(t *testing.T) {
	k, err := kernel.Open(vmboottest.Kernel(t).Vmlinuz)
	if err != nil {
		t.Fatal(err)
	}
	order := func(names ...string) string {
		t.Helper()
		mods, err := k.LoadOrder(names...)
		if err != nil {
			t.Fatalf("LoadOrder(%q): %v", names, err)
		}
		var s []string
		for _, m := range mods {
			if !strings.HasSuffix(m.Path, ".ko") {
				t.Errorf("module %s at %s", m.Name, m.Path)
			}
			s = append(s, m.Name)
		}
		return strings.Join(s, " ")
	}
	if got := order("overlay"); got != "overlay" {
		t.Errorf("overlay: %q", got)
	}
	if got := order("ext4", "nvme"); got != "" {
		t.Errorf("built-in modules: %q, want none", got)
	}
	// Each once, dependencies first, the named ones in the order given.
	chain := strings.Fields(order("virtio_pci", "virtio-mmio", "virtio_blk"))
	pos := map[string]int{}
	for i, m := range chain {
		pos[m] = i + 1
	}
	if len(chain) != 7 || len(pos) != 7 {
		t.Fatalf("virtio chain %q, want 7 modules", chain)
	}
	for _, dep := range [][2]string{
		{"virtio", "virtio_pci"}, {"virtio_ring", "virtio_pci"}, {"virtio_pci_modern_dev", "virtio_pci"},
		{"virtio_pci_legacy_dev", "virtio_pci"}, {"virtio", "virtio_mmio"}, {"virtio_ring", "virtio_blk"},
		{"virtio_pci", "virtio_mmio"}, {"virtio_mmio", "virtio_blk"},
	} {
		if pos[dep[0]] == 0 || pos[dep[0]] > pos[dep[1]] {
			t.Errorf("virtio chain %q: %s is not before %s", chain, dep[0], dep[1])
		}
	}
	if _, err := k.LoadOrder("no_such_module"); err == nil || !strings.Contains(err.Error(), "no_such_module") {
		t.Errorf("unknown module: %v", err)
	}
}

func TestOpenNeedsPackageLayout(t *testing.T) {
	if _, err := kernel.Open("/boot/bzImage"); err == nil {
		t.Error("Open accepted a kernel not named vmlinuz-RELEASE")
	}
	if _, err := kernel.Open(t.TempDir() + "/boot/vmlinuz-6.1.0-test"); err == nil {
		t.Error("Open accepted a kernel without lib/modules")
	}
}
