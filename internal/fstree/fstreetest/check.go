package fstreetest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kilnfs/kiln/internal/fstree"
)

// blockSize is the tree's block size, which runs are aligned to.
const blockSize = 4096

// Check checks what must hold of any tree, whatever layers made it:
// every node's parent and children agree, Lookup finds every node Walk
// visits (once), hard links share an inode (never a directory's), a
// device's Names are its names, Resolve never leads out of the tree, and
// every file's runs lie in file order, apart, block-aligned and within
// its size, and apart from every other file's in the data space.
func Check(tr *fstree.Tree) error {
	visited := map[*fstree.Node]bool{}
	links := map[*fstree.Inode][]*fstree.Node{}
	if tr.Root().Parent() != nil {
		return fmt.Errorf("the root has a parent")
	}
	err := tr.Walk(func(n *fstree.Node) error {
		if visited[n] {
			return fmt.Errorf("%q visited twice", n.Path())
		}
		visited[n] = true
		in := n.Inode()
		links[in] = append(links[in], n)
		if tr.Lookup(n.Path()) != n {
			return fmt.Errorf("Lookup(%q) does not find the node Walk visits", n.Path())
		}
		names := n.ChildNames()
		if in.Type != fstree.TypeDir && len(names) > 0 {
			return fmt.Errorf("%q: a %s with children %q", n.Path(), in.Type, names)
		}
		for _, name := range names {
			c := n.Child(name)
			if c.Parent() != n || c.Name() != name || name == "" || name == "." || name == ".." || strings.Contains(name, "/") {
				return fmt.Errorf("%q: child %q is named %q under %q", n.Path(), name, c.Name(), c.Parent().Path())
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	var runs []fstree.Run
	for in, nodes := range links {
		name := nodes[0].Path()
		if in.Type == fstree.TypeDir && len(nodes) > 1 {
			return fmt.Errorf("%q: a directory with %d names", name, len(nodes))
		}
		if in.Type.IsDevice() && !sameNodes(tr.Names(in), nodes) {
			return fmt.Errorf("%q: device names %q, the tree has %q", name, paths(tr.Names(in)), paths(nodes))
		}
		if in.Type == fstree.TypeReg {
			if err := checkRuns(tr, in); err != nil {
				return fmt.Errorf("%q (size %d, runs %+v): %w", name, in.Size, in.Data(), err)
			}
			runs = append(runs, in.Data()...)
		}
	}
	slices.SortFunc(runs, func(a, b fstree.Run) int { return int(a.Virtual - b.Virtual) })
	for i, r := range runs {
		end := r.Virtual + (r.Length+blockSize-1)/blockSize*blockSize
		if r.Virtual%blockSize != 0 || end > tr.DataSpace() || i+1 < len(runs) && end > runs[i+1].Virtual {
			return fmt.Errorf("run %+v overlaps the next or leaves the data space of %d", r, tr.DataSpace())
		}
	}
	if s := tr.Stats(); s.Inodes != int64(len(links)) {
		return fmt.Errorf("Stats counts %d inodes, the tree has %d", s.Inodes, len(links))
	}
	for n := range visited {
		p := n.Path()
		for _, q := range []string{p, p + "/.", p + "/../" + n.Name(), n.Inode().Target(), p + "/" + n.Inode().Target()} {
			r, err := tr.Resolve(q)
			if err == nil && r != nil && !visited[r] {
				return fmt.Errorf("Resolve(%q) leads out of the tree", q)
			}
		}
	}
	return nil
}

// checkRuns checks a regular file's runs.
func checkRuns(tr *fstree.Tree, in *fstree.Inode) error {
	var end int64
	for _, r := range in.Data() {
		if r.Offset < end || r.Length <= 0 || r.Offset+r.Length > in.Size || r.Offset%blockSize != 0 ||
			r.Length%blockSize != 0 && r.Offset+r.Length != in.Size ||
			r.File < 0 || r.File >= len(tr.DataFiles()) || r.File == 0 && r.DataOffset != r.Virtual {
			return fmt.Errorf("bad run %+v", r)
		}
		end = r.Offset + r.Length
	}
	return nil
}

func sameNodes(a, b []*fstree.Node) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(n *fstree.Node) bool { return !slices.Contains(b, n) })
}

func paths(nodes []*fstree.Node) []string {
	var p []string
	for _, n := range nodes {
		p = append(p, n.Path())
	}
	return p
}

// Content reads a regular file's content from the tree's data files.
func Content(tr *fstree.Tree, in *fstree.Inode) ([]byte, error) {
	b := make([]byte, in.Size)
	for _, r := range in.Data() {
		f, err := tr.OpenData(r.File)
		if err != nil {
			return nil, err
		}
		_, err = f.ReadAt(b[r.Offset:r.Offset+r.Length], r.DataOffset)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	return b, nil
}

// Apply applies the layer to tr under name. With dir set, the tar is
// also a file there, and the tree takes contents from it in place
// (ApplyStored), as kiln serve keeps layers.
func (l Layer) Apply(tr *fstree.Tree, name, dir string) error {
	tarball := l.Tar()
	if dir == "" {
		return tr.Apply(context.Background(), bytes.NewReader(tarball), name)
	}
	stored := filepath.Join(dir, name+".tar")
	if err := os.WriteFile(stored, tarball, 0o600); err != nil {
		return err
	}
	return tr.ApplyStored(context.Background(), bytes.NewReader(tarball), name, stored)
}

// Store keeps the layer in dir as kiln serve does (fstree.StoreLayer),
// where the tree's data space ends, and replays it into tr from there.
// When storing fails, the error is the one applying the layer gives, or
// says that applying it did not fail: a layer is refused whole either way.
func (l Layer) Store(tr *fstree.Tree, name, dir string, limits fstree.Limits) error {
	tarball := l.Tar()
	data, err := os.Create(filepath.Join(dir, name+".data"))
	if err != nil {
		return err
	}
	defer data.Close()
	record := filepath.Join(dir, name+".record")
	rf, err := os.Create(record)
	if err != nil {
		return err
	}
	_, err = fstree.StoreLayer(context.Background(), bytes.NewReader(tarball), name, limits, tr.DataSpace(), data, rf)
	if cerr := rf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if aerr := tr.Apply(context.Background(), bytes.NewReader(tarball), name); aerr != nil {
			return aerr
		}
		return fmt.Errorf("storing failed where applying did not: %w", err)
	}
	rf, err = os.Open(record)
	if err != nil {
		return err
	}
	defer rf.Close()
	return tr.ApplyStoredLayer(context.Background(), rf, name, data.Name())
}
