package initproc

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/initconfig"
	"github.com/kilnfs/kiln/internal/guest/pty"
)

// exited and killed build wait statuses as the kernel encodes them.
func exited(code int) unix.WaitStatus        { return unix.WaitStatus(code << 8) }
func killed(sig unix.Signal) unix.WaitStatus { return unix.WaitStatus(sig) }

func TestStatusLine(t *testing.T) {
	for _, tc := range []struct {
		ws     unix.WaitStatus
		line   string
		status int
	}{
		{exited(0), "workload exited with status 0", 0},
		{exited(3), "workload exited with status 3", 3},
		{killed(unix.SIGKILL), "workload killed by signal SIGKILL", 137},
		{killed(unix.SIGTERM), "workload killed by signal SIGTERM", 143},
	} {
		if got := StatusLine(tc.ws); got != tc.line {
			t.Errorf("StatusLine(%#x) = %q, want %q", uint32(tc.ws), got, tc.line)
		}
		if got := ExitStatus(tc.ws); got != tc.status {
			t.Errorf("ExitStatus(%#x) = %d, want %d", uint32(tc.ws), got, tc.status)
		}
	}
	if got := FailureLine(127); got != "workload exited with status 127" {
		t.Errorf("FailureLine = %q", got)
	}
}

func TestStartError(t *testing.T) {
	for _, tc := range []struct {
		err    error
		status int
		text   string
	}{
		{&os.PathError{Op: "fork/exec", Path: "/bin/app", Err: unix.ENOENT}, 127, "interpreter is missing"},
		{&os.PathError{Op: "fork/exec", Path: "/bin/app", Err: unix.ENOEXEC}, 126, "without a #! line"},
		{&os.PathError{Op: "fork/exec", Path: "/bin/app", Err: unix.EACCES}, 126, "permission denied"},
		{&os.PathError{Op: "fork/exec", Path: "/bin/app", Err: unix.E2BIG}, 1, "argument list too long"},
	} {
		err := StartError("/bin/app", tc.err)
		if got := initconfig.ExitStatus(err); got != tc.status {
			t.Errorf("%v: status %d, want %d", tc.err, got, tc.status)
		}
		if !strings.Contains(err.Error(), tc.text) || !strings.Contains(err.Error(), "/bin/app") {
			t.Errorf("%v: message %q should name the file and mention %q", tc.err, err, tc.text)
		}
	}
}

func TestPrepareWorkingDir(t *testing.T) {
	dir := t.TempDir()
	if err := PrepareWorkingDir(dir + "/a/b"); err != nil {
		t.Errorf("missing directory should be created: %v", err)
	}
	file := dir + "/file"
	os.WriteFile(file, nil, 0o644)
	err := PrepareWorkingDir(file)
	if initconfig.ExitStatus(err) != 1 || !strings.Contains(fmt.Sprint(err), "not a directory") {
		t.Errorf("file as working directory: %v", err)
	}
}

func TestCommand(t *testing.T) {
	p := &initconfig.Process{Args: []string{"app", "-x"}, Path: "/bin/app", Env: []string{"A=1"}, Dir: "/srv",
		UID: 1000, GID: 1001, Groups: []uint32{10}}

	controller, terminal, err := pty.Open()
	if err != nil {
		t.Skip(err)
	}
	defer controller.Close()
	defer terminal.Close()
	cmd := Command(p, terminal)
	a := cmd.SysProcAttr
	if cmd.Path != "/bin/app" || cmd.Dir != "/srv" || !a.Setsid || !a.Setctty || a.Ctty != 0 ||
		a.Credential.Uid != 1000 || a.Credential.Gid != 1001 || len(a.Credential.Groups) != 1 {
		t.Errorf("command on a terminal: %+v %+v", cmd, a)
	}

	// Without a terminal there is no controlling terminal to set.
	f, err := os.CreateTemp(t.TempDir(), "console")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if cmd := Command(p, f); cmd.SysProcAttr.Setctty || !cmd.SysProcAttr.Setsid {
		t.Errorf("command without a terminal: %+v", cmd.SysProcAttr)
	}
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/with\040space`: "/mnt/with space",
		`/plain`:             "/plain",
		`/tab\011x\`:         "/tab\tx\\",
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}
