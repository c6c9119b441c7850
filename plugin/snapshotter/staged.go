package snapshotter

import (
	"context"
	"io"
	"sync"

	"github.com/containerd/log"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Staged trees save the replay when a disk is built right after it was
// pulled: while kiln's differ stores a layer it also replays it into the
// staging tree its parent layer left, and the tree passes from layer to
// layer up the chain, taking file contents from the stored layer tars.
// Building the top layer's disk then only runs e2fsprogs and copies the
// contents. A tree is an optimisation only: whatever is not
// staged (after a restart, a second image on the same base) is replayed
// from the stored layers.

// maxStaged bounds the trees kept for layers whose disk may still be
// built or that may still get a child layer.
const maxStaged = 4

type stagedTree struct {
	tree *fstree.Tree
	wd   *workdir.Dir
	// mu lets builds read the tree (mke2fs reads the staging directory)
	// while a child layer waits to change it; owner says which snapshot's
	// chain the tree holds, so a build that waited learns it moved on.
	mu    sync.RWMutex
	owner string
}

type stagedTrees struct {
	opts  build.Options // what the trees are built with
	mu    sync.Mutex
	byID  map[string]*stagedTree
	order []string // oldest first
}

// get returns the tree staged for snapshot id, if any, leaving it there.
func (st *stagedTrees) get(id string) *stagedTree {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.byID[id]
}

// take removes the tree staged for snapshot id, if any; the caller owns it.
func (st *stagedTrees) take(id string) *stagedTree {
	st.mu.Lock()
	defer st.mu.Unlock()
	t := st.byID[id]
	if t != nil {
		delete(st.byID, id)
		for i, o := range st.order {
			if o == id {
				st.order = append(st.order[:i], st.order[i+1:]...)
				break
			}
		}
	}
	return t
}

// put keeps a tree for snapshot id, dropping the oldest beyond maxStaged.
func (st *stagedTrees) put(id string, t *stagedTree) {
	st.mu.Lock()
	if st.byID == nil {
		st.byID = map[string]*stagedTree{}
	}
	st.byID[id] = t
	st.order = append(st.order, id)
	var evicted []*stagedTree
	for len(st.order) > maxStaged {
		evicted = append(evicted, st.byID[st.order[0]])
		delete(st.byID, st.order[0])
		st.order = st.order[1:]
	}
	st.mu.Unlock()
	for _, t := range evicted {
		go t.release()
	}
}

// release deletes a tree no longer kept, once the builds still reading it
// are done.
func (t *stagedTree) release() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.wd.Release()
}

// drop releases the tree of a removed snapshot.
func (st *stagedTrees) drop(id string) {
	if t := st.take(id); t != nil {
		go t.release()
	}
}

func (st *stagedTrees) close() {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, t := range st.byID {
		t.wd.Release()
	}
	st.byID, st.order = nil, nil
}

// StagedLayer replays a layer into the tree staged for its snapshot's
// chain, for kiln's differ.
type StagedLayer struct {
	trees *stagedTrees
	id    string
	tree  *stagedTree
}

// stage returns a sink for the layer of extraction snapshot id, whose
// parents (nearest first) are given, or nil when the parent's tree is not
// at hand (the layer is then replayed at build time).
func (st *stagedTrees) stage(tmp, id string, parents []string) *StagedLayer {
	var t *stagedTree
	if len(parents) == 0 {
		wd, err := workdir.New(tmp)
		if err != nil {
			return nil
		}
		tree, err := build.NewTree(wd.Path, st.opts)
		if err != nil {
			wd.Release()
			return nil
		}
		t = &stagedTree{tree: tree, wd: wd, owner: id}
	} else if t = st.take(parents[0]); t == nil {
		return nil
	}
	// Wait for builds still reading the parent's tree (the child's
	// Prepare called off those nobody waits for).
	t.mu.Lock()
	t.owner = id
	t.mu.Unlock()
	return &StagedLayer{trees: st, id: id, tree: t}
}

// Apply replays the layer's tar into the tree; the tree takes file
// contents from the stored tar.
func (l *StagedLayer) Apply(ctx context.Context, r io.Reader, name, storedAt string) error {
	return l.tree.tree.ApplyStored(ctx, r, name, storedAt)
}

// Done keeps the tree for the snapshot when the layer was stored, or
// drops it.
func (l *StagedLayer) Done(ok bool) {
	if !ok {
		l.tree.wd.Release()
		return
	}
	l.trees.put(l.id, l.tree)
}

// build builds the disk of snapshot id from its staged tree, if it has
// one (ok false otherwise). Without injection the build only reads the
// tree, which stays for a child layer until the build is done; injection
// adds files to the tree, so then the build takes it.
func (st *stagedTrees) build(ctx context.Context, id string, req build.Request) (res build.Result, ok bool, err error) {
	var t *stagedTree
	if req.Options.Inject != nil {
		if t = st.take(id); t == nil {
			return res, false, nil
		}
		defer t.wd.Release()
	} else {
		if t = st.get(id); t == nil {
			return res, false, nil
		}
		t.mu.RLock()
		if t.owner != id {
			t.mu.RUnlock()
			return res, false, nil // a child layer took it
		}
		defer func() {
			t.mu.RUnlock()
			if err == nil {
				// Built: the disk is likely an image's top; free the
				// staging space, after the caller has the result.
				if st.take(id) == t {
					go t.release()
				}
			}
		}()
	}
	log.G(ctx).WithField("snapshot", id).Debug("building disk from its staged tree")
	req.WorkDir = t.wd.Path
	res, err = build.FromTree(ctx, t.tree, req, nil)
	return res, true, err
}
