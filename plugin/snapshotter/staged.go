package snapshotter

import (
	"context"
	"slices"
	"sync"

	"github.com/containerd/log"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Staged trees save the replay when a disk is built right after it was
// pulled: once kiln's differ has stored a layer, its record is replayed
// into the tree its parent layer left, and the tree passes from layer to
// layer up the chain, taking file contents from the layers' data files.
// Building the top layer's disk then only writes the ext4. A tree is an optimisation only: whatever is not
// staged (after a restart, a second image on the same base) is replayed
// from the stored layers.

// maxStaged bounds the trees kept for layers whose disk may still be
// built or that may still get a child layer.
const maxStaged = 4

type stagedTree struct {
	tree *fstree.Tree
	wd   *workdir.Dir
	// mu lets builds read the tree (mke2fs reads the staging directory,
	// the writers the data file) while whoever took it from stagedTrees
	// waits to change it (a child layer) or delete it (eviction, removal).
	mu sync.RWMutex
}

type stagedTrees struct {
	opts  build.Options // what the trees are built with
	limit int           // trees kept at most; 0 is maxStaged
	// afterRead, if set, is called when a build has found the tree of
	// snapshot id, before it reads it.
	afterRead func(id string)

	mu     sync.Mutex
	byID   map[string]*stagedTree
	order  []string // oldest first
	closed bool
	// releasing counts the trees being deleted in the background.
	releasing sync.WaitGroup
}

// read returns the tree staged for snapshot id read-locked, or nil. The
// lookup and the lock are one step: whoever changes or deletes a tree
// takes it out of byID first, then waits for its readers. (So a tree in
// byID has no writer and TryRLock does not fail.)
func (st *stagedTrees) read(id string) *stagedTree {
	st.mu.Lock()
	defer st.mu.Unlock()
	t := st.byID[id]
	if t == nil || !t.mu.TryRLock() {
		return nil
	}
	return t
}

// take removes the tree staged for snapshot id, if any; the caller owns it.
func (st *stagedTrees) take(id string) *stagedTree {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.takeLocked(id)
}

func (st *stagedTrees) takeLocked(id string) *stagedTree {
	t := st.byID[id]
	if t != nil {
		delete(st.byID, id)
		st.order = slices.DeleteFunc(st.order, func(o string) bool { return o == id })
	}
	return t
}

// put keeps a tree for snapshot id, dropping the oldest beyond the limit.
func (st *stagedTrees) put(id string, t *stagedTree) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		t.wd.Release() // kiln is stopping
		return
	}
	if st.byID == nil {
		st.byID = map[string]*stagedTree{}
	}
	if old := st.takeLocked(id); old != nil {
		st.releaseLater(old) // the layer was stored again
	}
	st.byID[id] = t
	st.order = append(st.order, id)
	limit := st.limit
	if limit <= 0 {
		limit = maxStaged
	}
	for len(st.order) > limit {
		st.releaseLater(st.takeLocked(st.order[0]))
	}
}

// releaseLater deletes a tree taken out of byID once the builds still
// reading it are done, without waiting for them.
func (st *stagedTrees) releaseLater(t *stagedTree) {
	st.releasing.Add(1)
	go func() {
		defer st.releasing.Done()
		t.release()
	}()
}

// release deletes a tree nobody else can find, once its readers are done.
func (t *stagedTree) release() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.wd.Release()
}

// drop releases the tree of a removed snapshot.
func (st *stagedTrees) drop(id string) {
	if t := st.take(id); t != nil {
		st.releaseLater(t)
	}
}

// close deletes every tree, waiting for their readers.
func (st *stagedTrees) close() {
	st.mu.Lock()
	trees := st.byID
	st.byID, st.order, st.closed = nil, nil, true
	st.mu.Unlock()
	for _, t := range trees {
		t.release()
	}
	st.releasing.Wait()
}

// StagedLayer is the tree staged for a layer's chain while the layer is
// replayed into it.
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
		t = &stagedTree{tree: tree, wd: wd}
	} else if t = st.take(parents[0]); t == nil {
		return nil
	}
	// The layer holds the tree until Done. Builds still reading the
	// parent's tree finish first (the child's Prepare called off those
	// nobody waits for); no new one can find it.
	t.mu.Lock()
	return &StagedLayer{trees: st, id: id, tree: t}
}

// Done keeps the tree for the snapshot when the layer was stored, or
// drops it.
func (l *StagedLayer) Done(ok bool) {
	l.tree.mu.Unlock()
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
		defer t.release()
	} else {
		if t = st.read(id); t == nil {
			return res, false, nil
		}
		defer func() {
			t.mu.RUnlock()
			if err == nil {
				// Built: the disk is likely an image's top; free the
				// staging space, after the caller has the result.
				if st.take(id) == t {
					st.releaseLater(t)
				}
			}
		}()
	}
	if st.afterRead != nil {
		st.afterRead(id)
	}
	log.G(ctx).WithField("snapshot", id).Debug("building disk from its staged tree")
	req.WorkDir = t.wd.Path
	res, err = build.FromTree(ctx, t.tree, req, nil)
	return res, true, err
}
