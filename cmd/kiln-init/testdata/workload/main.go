// Command workload is the program kiln-init runs in its end-to-end tests. It
// reports what it sees as "key=value" lines, in a mode chosen by its first
// argument. Installed as /.kiln/agent it stands in for the agent instead.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if filepath.Base(os.Args[0]) == "agent" {
		fakeAgent()
		return
	}
	mode := ""
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	switch mode {
	case "report":
		report()
		code, _ := strconv.Atoi(os.Getenv("EXIT_CODE"))
		os.Exit(code)
	case "orphans":
		orphans()
	case "spawn-and-exit":
		spawnAndExit()
	case "exit-after":
		// The orphan: outlives its parent briefly, then exits.
		time.Sleep(200 * time.Millisecond)
		fmt.Printf("orphan-ppid=%d\n", os.Getppid())
	case "wait-signal":
		waitSignal()
	case "kill-self":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		time.Sleep(time.Second)
	default:
		fmt.Printf("unknown mode %q\n", mode)
		os.Exit(3)
	}
}

func fakeAgent() {
	os.WriteFile("/run/agent-started", []byte(strconv.Itoa(os.Getpid())), 0o644)
	for {
		time.Sleep(time.Hour)
	}
}

func report() {
	args, _ := json.Marshal(os.Args[1:])
	fmt.Printf("args=%s\n", args)
	fmt.Printf("pid=%d\n", os.Getpid())
	fmt.Printf("uid=%d gid=%d\n", os.Getuid(), os.Getgid())
	groups, _ := os.Getgroups()
	sort.Ints(groups)
	fmt.Printf("groups=%v\n", groups)
	cwd, _ := os.Getwd()
	fmt.Printf("cwd=%s\n", cwd)
	env := os.Environ()
	sort.Strings(env)
	envJSON, _ := json.Marshal(env)
	fmt.Printf("env=%s\n", envJSON)
	host, _ := os.Hostname()
	fmt.Printf("hostname=%s\n", host)

	sid, _ := unix.Getsid(0)
	pgrp, _ := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	fmt.Printf("setsid=%t\n", sid == os.Getpid())
	fmt.Printf("foreground=%t\n", pgrp == unix.Getpgrp())

	flags, _ := os.ReadFile("/sys/class/net/lo/flags")
	lo, _ := strconv.ParseUint(strings.TrimSpace(string(flags)), 0, 32)
	fmt.Printf("lo-up=%t\n", lo&1 == 1)

	fmt.Printf("mounts=%s\n", mountTypes("/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run", "/tmp"))
	// The agent starts in the background, so give it a moment when
	// it is expected.
	deadline := time.Now().Add(10 * time.Second)
	_, err := os.Stat("/run/agent-started")
	for err != nil && os.Getenv("EXPECT_AGENT") != "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		_, err = os.Stat("/run/agent-started")
	}
	fmt.Printf("agent-started=%t\n", err == nil)
}

// mountTypes lists "target:fstype" for the given mount points.
func mountTypes(targets ...string) string {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	types := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && len(fields) > 4 {
				types[fields[4]] = fields[i+1]
			}
		}
	}
	var out []string
	for _, t := range targets {
		out = append(out, t+":"+types[t])
	}
	return strings.Join(out, ",")
}

// orphans leaves a grandchild to be re-parented to PID 1 and checks, once it
// has exited, that PID 1 reaped it.
func orphans() {
	child := exec.Command("/proc/self/exe", "spawn-and-exit")
	child.Stdout, child.Stderr = os.Stdout, os.Stderr
	if err := child.Run(); err != nil {
		fmt.Printf("error=%v\n", err)
		os.Exit(1)
	}
	time.Sleep(600 * time.Millisecond)
	fmt.Printf("zombies=%d\n", countZombies())
}

// spawnAndExit starts a grandchild and exits without waiting for it.
func spawnAndExit() {
	grandchild := exec.Command("/proc/self/exe", "exit-after")
	grandchild.Stdout, grandchild.Stderr = os.Stdout, os.Stderr
	if err := grandchild.Start(); err != nil {
		fmt.Printf("error=%v\n", err)
		os.Exit(1)
	}
}

func countZombies() int {
	n := 0
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		if _, err := strconv.Atoi(d.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + d.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(stat)
		if i := strings.LastIndexByte(s, ')'); i >= 0 && strings.HasPrefix(s[i+1:], " Z") {
			n++
		}
	}
	return n
}

func waitSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGUSR1)
	fmt.Println("ready")
	sig := <-sigs
	fmt.Printf("got=%s\n", unix.SignalName(sig.(syscall.Signal)))
	os.Exit(42)
}
