package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/containerd/platforms"
	"github.com/pelletier/go-toml/v2"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/config"
)

// dropIn is what containerd 2.x needs to use kiln, as a drop-in for the
// conf.d directory its config.toml imports (containerd merges tables and
// migrates each file from its own version):
//
//   - kiln's snapshotter and differ as proxy plugins (one entry each,
//     since an entry has one type); containerd connects lazily, so it
//     starts and serves its other snapshotters while kiln is down;
//   - unpacking into kiln with kiln's differ, for pulls through the
//     transfer service (ctr image pull, CRI). The list replaces
//     containerd's default, so overlayfs is listed again.
//
// containerd's diff service, which client-side unpacks (ctr image pull
// --local) and diffs (ctr snapshots diff, nerdctl commit) use, tries its
// differs in order and stops at the first that fails for another reason
// than "not implemented", a differ whose socket is down included. kiln's
// differ goes into that order only on request (--diff-service): then
// those need kiln running, for every snapshotter.
var dropIn = template.Must(template.New("").Funcs(template.FuncMap{"toml": tomlString}).Parse(`# kiln: containerd drop-in. Put it in a directory containerd's config.toml
# imports (imports = ['/etc/containerd/conf.d/*.toml']) and restart containerd.
version = 3

[proxy_plugins.{{.Snapshotter}}]
  type = "snapshot"
  address = {{toml .Address}}
  [proxy_plugins.{{.Snapshotter}}.exports]
    root = {{toml .Root}}
    # Tell kiln which image each layer is pulled for ([share] in kiln's config).
    enable_remote_snapshot_annotations = "true"

[proxy_plugins.{{.Differ}}]
  type = "diff"
  address = {{toml .Address}}

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = {{toml .Platform}}
  snapshotter = "{{.Snapshotter}}"
  differ = "{{.Differ}}"

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = {{toml .Platform}}
  snapshotter = "overlayfs"
  differ = "walking"
{{- if .DiffService}}

# kiln's differ first for client-side unpacks and for diffs of kiln's
# containers (ctr snapshots diff, nerdctl commit). While kiln is down, these
# fail for every snapshotter.
[plugins.'io.containerd.service.v1.diff-service']
  default = ["{{.Differ}}", "walking"]
{{- end}}
`))

// tomlString quotes s as a TOML basic string.
func tomlString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// Names of kiln's plugins in containerd.
const (
	snapshotterName = "kiln"
	differName      = "kiln-diff"
)

func newContainerdConfigCommand() *cobra.Command {
	var (
		configPath     string
		address        string
		platform       string
		output         string
		containerdConf string
		diffService    bool
	)
	cmd := &cobra.Command{
		Use:   "containerd-config",
		Short: "Write the containerd drop-in that plugs kiln in",
		Long: `Print, or write with --output, the drop-in that plugs kiln into containerd 2.x:
kiln's snapshotter and differ as proxy plugins, and unpacking into kiln with
kiln's differ. Install it in containerd's conf.d:

  kiln containerd-config -o /etc/containerd/conf.d/kiln.toml
  systemctl restart containerd

containerd keeps starting, and keeps serving its other snapshotters, while
kiln is down.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("address") {
				cfg.Address = address
			}
			if platform == "" {
				platform = platforms.DefaultString()
			}
			var buf bytes.Buffer
			if err := dropIn.Execute(&buf, map[string]any{
				"Snapshotter": snapshotterName,
				"Differ":      differName,
				"Address":     cfg.Address,
				"Root":        cfg.Root,
				"Platform":    platform,
				"DiffService": diffService,
			}); err != nil {
				return err
			}
			if output == "" || output == "-" {
				_, err := io.Copy(cmd.OutOrStdout(), &buf)
				return err
			}
			if err := writeDropIn(output, buf.Bytes()); err != nil {
				return err
			}
			if warning := checkImported(containerdConf, output); warning != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "kiln: warning: %s\n", warning)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultPath, "kiln's configuration file")
	f.StringVar(&address, "address", "", "kiln's socket (default from the config)")
	f.StringVar(&platform, "platform", "", fmt.Sprintf("platform to unpack for (default %s)", platforms.DefaultString()))
	f.StringVarP(&output, "output", "o", "", "write the drop-in to this file instead of printing it")
	f.StringVar(&containerdConf, "containerd-config", "/etc/containerd/config.toml",
		"containerd's main config, checked for an imports entry that covers --output")
	f.BoolVar(&diffService, "diff-service", false,
		"also put kiln's differ first in containerd's diff service, for ctr snapshots diff and nerdctl commit of kiln's containers (client-side unpacks and diffs then need kiln running)")
	return cmd
}

// writeDropIn writes the drop-in atomically.
func writeDropIn(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// checkImported says what is wrong when containerd's main config would
// not read the drop-in: containerd only follows the imports of the file
// it loads.
func checkImported(mainConfig, dropIn string) string {
	raw, err := os.ReadFile(mainConfig)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Sprintf("%s does not exist: write containerd's defaults there (containerd config default > %s), which import %s",
			mainConfig, mainConfig, filepath.Join(filepath.Dir(mainConfig), "conf.d", "*.toml"))
	}
	if err != nil {
		return err.Error()
	}
	var c struct {
		Imports []string `toml:"imports"`
	}
	if err := toml.Unmarshal(raw, &c); err != nil {
		return fmt.Sprintf("%s: %v", mainConfig, err)
	}
	abs, _ := filepath.Abs(dropIn)
	for _, glob := range c.Imports {
		if !filepath.IsAbs(glob) {
			glob = filepath.Join(filepath.Dir(mainConfig), glob)
		}
		if ok, _ := filepath.Match(glob, abs); ok {
			return ""
		}
	}
	return fmt.Sprintf("%s does not import %s: add it to its imports, e.g. imports = ['%s']",
		mainConfig, dropIn, filepath.Join(filepath.Dir(abs), "*.toml"))
}
